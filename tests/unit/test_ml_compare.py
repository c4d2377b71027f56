"""Evaluation that reads clearly: two models side by side with paired tests, the referable
definitions named, and a loud warning when a model answers one grade for everything."""
import json

import numpy as np
import pytest

from scripts.ml import archive, compare, evaluate, synth, train
from scripts.ml.tiny_model import make_checkpoint


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    synth.generate(out, n=16, seed=5, size=160, workers=1, progress=False)
    return out


def test_two_models_side_by_side_on_one_folder(folder, tmp_path, capsys):
    a = make_checkpoint(tmp_path / "a.pt", seed=1)
    b = archive.archive(make_checkpoint(tmp_path / "b.pt", seed=2), "2.0", model_store=tmp_path / "store")
    assert compare.main([str(a), str(b), "--data", str(folder), "--out", str(tmp_path / "out"),
                         "--bootstrap", "50", "--workers", "1", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "paired QWK difference B - A" in text and "exact McNemar" in text
    assert "referable = predicted grade >= each model's referable_threshold" in text
    result = json.loads((tmp_path / "out" / "comparison.json").read_text())
    assert result["data"]["compared"] + result["data"]["left_out_by_quality_gate"] == 16
    assert [m["model"].split()[0] for m in result["models"]] == ["a.pt", "dr_2.0.mar"]
    same = compare.compare(a, a, folder, n_boot=20, workers=1, progress=False)
    assert same["paired"]["quadratic_kappa"]["b_minus_a"] == 0
    assert same["paired"]["referable_mcnemar"]["p_value"] == 1.0
    assert same["paired"]["grade_agreement_between_models"] == 1.0


def test_exact_mcnemar():
    a = np.array([True] * 10 + [False] * 2)
    b = np.array([False] * 10 + [True] * 2)
    result = compare.mcnemar_exact(a, b)
    assert (result["only_a_right"], result["only_b_right"]) == (10, 2)
    assert result["p_value"] == pytest.approx(0.0386, abs=1e-3)  # 2 * P(X <= 2), X ~ Bin(12, 0.5)


def test_the_referable_definitions_are_named():
    ci = {"value": 0.5, "ci95": [0.4, 0.6]}
    result = {"metrics": {k: ci for k in ("quadratic_kappa", "accuracy", "referable_sensitivity",
                                          "referable_specificity", "referable_auc")},
              "operating_point": {"threshold": 0.3, "target_sensitivity": 0.9, "chosen_on": "the validation split",
                                  "test_sensitivity": ci, "test_specificity": ci},
              "referable_threshold": 2, "predicted_counts": [10, 0, 0, 0, 0],
              "data": {"n": 10, "name": "t", "images": "separate test folder", "synthetic": True}}
    text = evaluate.text_summary(result)
    assert "referable = predicted grade >= 2 (what serving answers):" in text
    assert "referable = P(grade >= 2) >= 0.3000, an operating point for 90% sensitivity chosen on the " \
           "validation split (NOT used in serving):" in text
    assert "ONE grade for every held-out image" in text


def test_collapse_warning_is_loud():
    text = train.collapse_warning(0, "epoch 3")
    assert "WARNING" in text and "EVERY" in text and "No DR" in text and "promote" in text
