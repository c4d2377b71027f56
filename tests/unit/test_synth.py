"""The synthetic fundus generator: determinism, lesions by grade, and the quality gate."""
import csv
import io
import json

import numpy as np
import pytest

from handlers import fundus
from scripts.ml import synth

SEEDS = range(6)


def _array(img):
    return np.asarray(img, dtype=np.int16)


def test_render_is_deterministic():
    a, info_a = synth.render(123, 3, 192)
    b, info_b = synth.render(123, 3, 192)
    assert np.array_equal(_array(a), _array(b))
    assert info_a == info_b
    c, _ = synth.render(124, 3, 192)
    assert c.size != a.size or not np.array_equal(_array(a), _array(c))


def test_generate_writes_the_same_folder_for_any_worker_count(tmp_path):
    one = synth.generate(tmp_path / "one", n=6, seed=5, size=128, workers=1, progress=False)
    two = synth.generate(tmp_path / "two", n=6, seed=5, size=128, workers=2, progress=False)
    assert one.read_text() == two.read_text()
    rows = list(csv.DictReader(one.open()))
    assert [r.keys() for r in rows][0] == {"id_code", "diagnosis"}
    assert len(rows) == 6 and len({r["id_code"] for r in rows}) == 6
    for r in rows:
        f1 = tmp_path / "one" / "train_images" / f"{r['id_code']}.jpg"
        f2 = tmp_path / "two" / "train_images" / f"{r['id_code']}.jpg"
        assert f1.read_bytes() == f2.read_bytes()
    marker = json.loads((tmp_path / "one" / "synthetic.json").read_text())
    assert marker["seed"] == 5 and marker["n"] == 6


def test_grade_plan_has_exact_counts_and_depends_on_the_seed():
    plan = synth.grade_plan(200, seed=0)
    assert np.bincount(plan, minlength=5).tolist() == [80, 30, 40, 24, 26]
    assert synth.grade_plan(200, seed=0) == plan
    assert synth.grade_plan(200, seed=1) != plan


def _changed(seed, grade, size=256):
    """Pixels that a grade's lesions changed: the same seed draws the same eye at every grade."""
    base = _array(synth.render(seed, 0, size)[0])
    img = _array(synth.render(seed, grade, size)[0])
    diff = img - base
    darker = (diff[..., 1] < -12).sum()  # red lesions and new vessels absorb green light
    brighter = (diff[..., 1] > 12).sum()  # exudates and cotton-wool spots reflect it
    return int(darker), int(brighter)


def test_lesion_pixels_grow_with_grade():
    counts = np.array([[_changed(s, g) for g in range(5)] for s in SEEDS])  # [seed, grade, kind]
    dark = counts[:, :, 0].mean(axis=0)
    bright = counts[:, :, 1]
    assert dark[0] == 0 and bright[:, 0].sum() == 0  # grade 0 is the lesion-free eye itself
    assert 0 < dark[1] < dark[2] < dark[3], dark
    assert dark[4] > dark[1], dark
    assert bright[:, 1].sum() == 0  # mild: microaneurysms only, nothing bright


@pytest.mark.parametrize("seed", SEEDS)
def test_lesion_model_follows_the_icdr_rules(seed):
    infos = [synth.render(seed, g, 96)[1]["lesions"] for g in range(5)]
    haem_quadrants = [synth.render(seed, g, 96)[1]["haemorrhages_per_quadrant"] for g in range(5)]
    assert not any(infos[0].values())
    mild = infos[1]
    assert mild["microaneurysms"] > 0
    assert not any(v for k, v in mild.items() if k != "microaneurysms")
    moderate = infos[2]
    assert moderate["dot_blot_haemorrhages"] + moderate["flame_haemorrhages"] > 0
    assert sum(q > 0 for q in haem_quadrants[2]) <= 3  # short of the 4-quadrant rule
    assert not (moderate["venous_beading_quadrants"] or moderate["irma_quadrants"]
                or moderate["nv_disc"] or moderate["nv_elsewhere"])
    severe = infos[3]
    four_quadrants = min(haem_quadrants[3]) >= 6
    assert four_quadrants or severe["venous_beading_quadrants"] >= 2 or severe["irma_quadrants"] >= 1
    assert not (severe["nv_disc"] or severe["nv_elsewhere"])
    assert infos[4]["nv_disc"] + infos[4]["nv_elsewhere"] >= 1


def test_synthetic_images_pass_the_quality_gate():
    """A sample including discs cut at the top and bottom and left eyes, through the real gate."""
    seen = {"cut": 0, "left": 0}
    for i in range(12):
        img, info = synth.render(synth.image_seed(0, i), i % 5, 512)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=92)
        prepared = fundus.prepare(buf.getvalue(), fundus.PreprocessConfig(input_size=128))
        assert prepared.quality["gradable"], (i, info, prepared.quality)
        assert prepared.tensor is not None
        seen["cut"] += info["disc_cut"] and prepared.disc.cut_top and prepared.disc.cut_bottom
        seen["left"] += info["eye"] == "left"
    assert seen["cut"] and seen["left"], seen


def test_render_rejects_an_unknown_grade():
    with pytest.raises(ValueError):
        synth.render(0, 5, 64)
