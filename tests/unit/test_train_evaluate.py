"""Training writes a contract checkpoint and resumes; evaluation writes sane metrics and plots."""
import datetime as dt
import json

import numpy as np
import pytest
import torch

from handlers import fundus, quality
from handlers.network import DRNet
from scripts.ml import evaluate, synth, train
from handlers.checksum import sha256_file

CONTRACT_KEYS = {"format", "arch", "num_classes", "state_dict", "preprocess", "quality", "grade_labels",
                 "referable_threshold", "dataset", "metrics", "history", "code_revision", "created_at"}


def _args(data, out, *extra):
    return train.build_parser().parse_args([
        "--data", str(data), "--out", str(out), "--arch", "mobilenet_v3_small", "--input-size", "64",
        "--epochs", "1", "--batch-size", "8", "--val-fraction", "0.2", "--test-fraction", "0.3",
        "--threads", "1", "--workers", "1", "--half-weights", "--quiet", *extra])


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    synth.generate(out, n=30, seed=2, size=160, workers=1, progress=False)
    return out


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "dr.pt"
    train.train(_args(data_dir, out))
    return out


def test_checkpoint_has_every_contract_key(trained):
    ck = torch.load(trained, map_location="cpu", weights_only=True)  # plain data only: archive loads it so
    assert CONTRACT_KEYS <= set(ck)
    assert ck["format"] == "clarity-dr-checkpoint/1" and ck["arch"] == "mobilenet_v3_small"
    assert ck["num_classes"] == 5 and len(ck["grade_labels"]) == 5 and ck["referable_threshold"] == 2
    assert fundus.PreprocessConfig.from_dict(ck["preprocess"]).input_size == 64
    quality.QualityThresholds.from_dict(ck["quality"])
    ds = ck["dataset"]
    assert {"name", "format", "fingerprint", "synthetic", "counts"} <= set(ds)
    assert ds["synthetic"] is True and ds["format"] == "aptos" and len(ds["fingerprint"]) == 64
    assert sum(ds["counts"]) == 30
    split = ds["split"]
    assert len(split["train"]) + len(split["val"]) + len(split["test"]) == 30
    assert not set(split["test"]) & (set(split["train"]) | set(split["val"]))
    assert [h["epoch"] for h in ck["history"]] == [1]
    assert ck["metrics"]["validation"]["epoch"] == 1
    assert isinstance(ck["code_revision"], str) and ck["code_revision"]
    assert dt.datetime.fromisoformat(ck["created_at"]).tzinfo is not None
    # float16 in the file, float32 once loaded
    assert ck["weights_dtype"] == "float16"
    assert all(v.dtype == torch.float16 for v in ck["state_dict"].values() if v.is_floating_point())
    model, _ = train.load_checkpoint(trained)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    DRNet("mobilenet_v3_small").load_state_dict(ck["state_dict"])  # the serving side's class


def test_resume_continues_the_run(trained, data_dir, tmp_path):
    first = torch.load(trained, weights_only=True)
    ck_path = tmp_path / "dr.pt"
    ck_path.write_bytes(trained.read_bytes())
    train.train_state_path(ck_path).write_bytes(train.train_state_path(trained).read_bytes())
    train.train(_args(data_dir, ck_path, "--epochs", "2", "--resume", str(ck_path)))
    ck = torch.load(ck_path, weights_only=True)
    assert [h["epoch"] for h in ck["history"]] == [1, 2]
    assert ck["history"][0] == first["history"][0]
    assert ck["dataset"]["split"] == first["dataset"]["split"]
    with pytest.raises(SystemExit, match="already finished"):
        train.train(_args(data_dir, ck_path, "--epochs", "2", "--resume", str(ck_path)))
    with pytest.raises(SystemExit, match="input_size"):
        train.train(_args(data_dir, ck_path, "--epochs", "3", "--input-size", "96", "--resume", str(ck_path)))


def test_evaluate_writes_json_and_plots(trained, data_dir, tmp_path):
    out = tmp_path / "eval"
    result = evaluate.evaluate(trained, data_dir, out, n_boot=100, threads=1, workers=1, progress=False)
    saved = json.loads((out / "evaluation.json").read_text())
    assert saved["metrics"] == json.loads(json.dumps(result["metrics"]))
    for png in ("confusion_matrix.png", "roc_referable.png", "training_curves.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = (out / "predictions.csv").read_text().splitlines()
    assert rows[0].startswith("name,grade,predicted") and len(rows) == 1 + result["data"]["n"]
    ck = torch.load(trained, weights_only=True)
    assert saved["data"]["images"] == "checkpoint test split"
    assert saved["data"]["n"] == len(ck["dataset"]["split"]["test"])
    assert np.sum(saved["confusion_matrix"]["rows_true_cols_predicted"]) == saved["data"]["n"]
    m = saved["metrics"]
    assert -1 <= m["quadratic_kappa"]["value"] <= 1
    for k in ("accuracy", "referable_sensitivity", "referable_specificity", "referable_auc"):
        v, (lo, hi) = m[k]["value"], m[k]["ci95"]
        assert 0 <= lo <= v <= hi <= 1, (k, m[k])
    op = saved["operating_point"]
    assert 0 <= op["threshold"] <= 1 and op["chosen_on"].startswith("checkpoint validation split")
    assert "synthetic" in saved["note"].lower()

    evaluate.record_in_checkpoint(trained, result)
    stored = torch.load(trained, weights_only=True)["metrics"]["test"]
    assert stored["quadratic_kappa"] == m["quadratic_kappa"]


def test_evaluate_refuses_images_seen_in_training(trained, data_dir, tmp_path):
    ck = torch.load(trained, weights_only=True)
    seen = ck["dataset"]["split"]["train"][0]
    grades = dict(line.split(",") for line in (data_dir / "train.csv").read_text().split()[1:])
    subset = tmp_path / "subset.csv"
    subset.write_text(f"id_code,diagnosis\n{seen},{grades[seen]}\n")
    with pytest.raises(SystemExit, match="used in training"):
        evaluate.evaluate(trained, data_dir, tmp_path / "eval", subset, n_boot=10, progress=False)


# --------------------------------------------------------------------------- metric functions

def _probs(grades, p=1.0):
    """Probabilities putting `p` on each given grade and the rest spread evenly."""
    out = np.full((len(grades), 5), (1 - p) / 4)
    out[np.arange(len(grades)), grades] = p
    return out


def test_perfect_predictions_score_one_with_a_degenerate_interval():
    y = np.array([0, 1, 2, 3, 4, 0, 2, 4, 1, 3])
    m = evaluate.point_metrics(y, _probs(y, 0.9))
    for k in ("quadratic_kappa", "accuracy", "referable_sensitivity", "referable_specificity", "referable_auc"):
        assert m[k] == pytest.approx(1.0)
    assert all(m[f"recall_grade_{g}"] == 1.0 for g in range(5))
    ci = evaluate.bootstrap(y, _probs(y, 0.9), n=50, seed=0)
    assert ci["accuracy"] == [1.0, 1.0] and ci["quadratic_kappa"] == [1.0, 1.0]


def test_quadratic_kappa_on_hand_computed_cases():
    # O = {(0,0):1, (0,1):1, (2,2):2}; weights (i-j)^2/16; sum wO = 1/16, sum wE = 7/16 -> 6/7
    m = evaluate.point_metrics(np.array([0, 0, 2, 2]), _probs([0, 1, 2, 2]))
    assert m["quadratic_kappa"] == pytest.approx(6 / 7)
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["recall_grade_0"] == 0.5 and m["recall_grade_2"] == 1.0 and np.isnan(m["recall_grade_1"])
    # complete disagreement at the extremes
    assert evaluate.point_metrics(np.array([0, 4]), _probs([4, 0]))["quadratic_kappa"] == pytest.approx(-1.0)


def _referable_case():
    y = np.array([0, 0, 0, 2, 3, 4])
    scores = np.array([0.1, 0.5, 0.3, 0.4, 0.8, 0.9])  # P(grade >= 2)
    probs = np.zeros((6, 5))
    probs[:, 0] = 1 - scores
    probs[:, 3] = scores
    return y, probs, scores


def test_referable_metrics_and_operating_point():
    y, probs, scores = _referable_case()
    assert np.allclose(evaluate.referable_scores(probs, 2), scores)
    m = evaluate.point_metrics(y, probs)
    # argmax: grade 3 where score > 0.5 -> positives found: 0.8, 0.9; false positive: none
    assert m["referable_sensitivity"] == pytest.approx(2 / 3)
    assert m["referable_specificity"] == pytest.approx(1.0)
    assert m["referable_auc"] == pytest.approx(8 / 9)  # 8 of 9 positive/negative pairs ordered
    op = evaluate.operating_point(y >= 2, scores, 1.0)
    assert op["threshold"] == pytest.approx(0.4)
    assert (op["sensitivity"], op["specificity"]) == (pytest.approx(1.0), pytest.approx(2 / 3))
    op = evaluate.operating_point(y >= 2, scores, 0.6)
    assert op["threshold"] == pytest.approx(0.8) and op["specificity"] == 1.0
    with pytest.raises(ValueError):
        evaluate.operating_point(np.ones(3, bool), np.array([0.1, 0.2, 0.3]), 0.9)


def test_bootstrap_is_seeded_and_brackets_the_estimate():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 5, 200)
    pred = np.where(rng.random(200) < 0.7, y, rng.integers(0, 5, 200))
    probs = _probs(pred, 0.8)
    a = evaluate.bootstrap(y, probs, n=200, seed=3)
    assert a == evaluate.bootstrap(y, probs, n=200, seed=3)
    assert a != evaluate.bootstrap(y, probs, n=200, seed=4)
    m = evaluate.point_metrics(y, probs)
    for k in ("quadratic_kappa", "accuracy", "referable_auc"):
        lo, hi = a[k]
        assert lo < m[k] < hi and hi - lo < 0.3


# --------------------------------------------------------------------------- the demo model

def test_demo_model_pipeline_writes_model_and_card(tmp_path, monkeypatch):
    """The `make demo-model` pipeline end to end, with a tiny recipe."""
    from scripts.ml import demo_model

    tiny = dict(demo_model.RECIPE, train_images=30, test_images=12, image_size=160, input_size=64, epochs=1,
                batch_size=8, val_fraction=0.2)
    monkeypatch.setattr(demo_model, "RECIPE", tiny)
    out = tmp_path / "demo"
    demo_model.main(["--out", str(out), "--work", str(tmp_path / "work"), "--threads", "1", "--workers", "1",
                     "--quiet"])
    for name in ("checkpoint.pt", "MODEL_CARD.md", "evaluation.json", "predictions.csv",
                 "confusion_matrix.png", "training_curves.png"):
        assert (out / name).is_file(), name
    assert not list(out.glob("*train-state*"))
    _check_demo_folder(out, n_test=12)


def _check_demo_folder(out, n_test):
    ck = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert CONTRACT_KEYS <= set(ck) and ck["dataset"]["synthetic"] is True
    assert ck["weights_dtype"] == "float16"
    assert {"quadratic_kappa", "referable_auc"} <= set(ck["metrics"]["test"])
    result = json.loads((out / "evaluation.json").read_text())
    assert result["checkpoint"]["sha256"] == sha256_file(out / "checkpoint.pt")
    assert result["data"]["n"] == n_test and result["data"]["images"] == "separate test folder"
    assert result["data"]["synthetic"] is True
    card = (out / "MODEL_CARD.md").read_text()
    assert "Not for clinical use" in card and "synthetic" in card.lower()
    assert "no validated clinical" in card.lower().replace("**", "")
    assert f"{result['metrics']['quadratic_kappa']['value']:.3f}" in card


def test_committed_demo_model_is_consistent():
    """models/demo/ is what `make demo-model` wrote: small, synthetic, and its card matches its files."""
    from scripts.ml.train import REPO

    out = REPO / "models" / "demo"
    assert (out / "checkpoint.pt").stat().st_size < 5_000_000
    _check_demo_folder(out, n_test=400)
    model, ck = train.load_checkpoint(out / "checkpoint.pt")
    assert ck["arch"] == "mobilenet_v3_small" and ck["preprocess"]["input_size"] == 160
