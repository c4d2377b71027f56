"""The quality gate: real photographs pass; non-fundus pictures and degraded photographs do not."""
import dataclasses
from pathlib import Path

import pytest
from PIL import Image

from handlers import fundus, quality
from tests.support import images

REPO = Path(__file__).resolve().parents[2]
SAMPLES = sorted((REPO / "samples").glob("*.jpg"))
CODES = {"no_fundus_detected", "not_fundus_colour", "too_dark", "overexposed", "blurred",
         "too_little_retina", "low_contrast"}


@pytest.fixture(scope="module")
def photos():
    """name -> decoded sample photograph, at the size prepare() decodes it."""
    assert SAMPLES, f"no sample photographs in {REPO / 'samples'}"
    return {p.name: fundus.decode(p.read_bytes(), min_side=quality.ANALYSIS_SIZE) for p in SAMPLES}


def verdict(img: Image.Image, thresholds=fundus.QualityThresholds()) -> dict:
    q = fundus.assess_quality(img, fundus.find_disc(img), thresholds)
    assert set(q) == {"gradable", "score", "reasons"}
    assert 0.0 <= q["score"] <= 1.0 and q["gradable"] == (q["score"] >= 0.5) == (not q["reasons"])
    for reason in q["reasons"]:
        assert set(reason) == {"code", "message"} and reason["code"] in CODES
        assert reason["message"].endswith(".") and len(reason["message"]) > 20
    assert len({r["code"] for r in q["reasons"]}) == len(q["reasons"])
    return q


def codes(q: dict) -> set:
    return {r["code"] for r in q["reasons"]}


def test_every_sample_is_gradable(photos):
    for name, img in photos.items():
        q = verdict(img)
        assert q["gradable"] and q["reasons"] == [], (name, q)


@pytest.mark.parametrize("seed,size", [(0, (800, 600)), (1, (640, 640)), (2, (1200, 900)), (3, (400, 300))])
def test_synthetic_fundus_builder_passes(seed, size):
    """Other tests (handler, API, training) rely on tests.support.images.fundus_like being gradable."""
    assert verdict(images.fundus_like(size, seed=seed))["gradable"]


# ------------------------------------------------------------------ not a fundus photograph

@pytest.mark.parametrize("image,expected", [
    (images.ordinary_photo(), {"no_fundus_detected"}),
    (images.ordinary_photo(seed=5, size=(1024, 768)), {"no_fundus_detected"}),
    (images.ordinary_photo(porthole=True), {"not_fundus_colour"}),
    (images.document_page(), {"no_fundus_detected"}),
    (images.blank_frame(), {"no_fundus_detected"}),
    (images.blank_frame(value=128), {"no_fundus_detected"}),
    (images.blank_frame(value=255), {"no_fundus_detected"}),
], ids=["photo", "photo-2", "vignetted-photo", "document", "black", "grey", "white"])
def test_not_a_fundus_is_ungradable(image, expected):
    q = verdict(image)
    assert not q["gradable"] and codes(q) == expected, q


def test_greyscale_fundus_is_not_a_colour_fundus(photos):
    q = verdict(photos["idrid_05.jpg"].convert("L").convert("RGB"))
    assert codes(q) == {"not_fundus_colour"}


# ------------------------------------------------------------------ poor photographs

DEGRADATIONS = {
    "blurred": (images.blurred, "blurred"),
    "darkened": (images.darkened, "too_dark"),
    "overexposed": (images.overexposed, "overexposed"),
    "hazy": (images.hazy, "low_contrast"),
    "sliver": (images.sliver, "too_little_retina"),
    "top_strip": (lambda img: img.crop((0, 0, img.width, img.height // 4)), "too_little_retina"),
    "small_in_frame": (lambda img: _shrunk(img, 0.4), "too_little_retina"),
}


def _shrunk(img, scale):
    frame = Image.new("RGB", img.size)
    frame.paste(img.resize((round(img.width * scale), round(img.height * scale))), (0, 0))
    return frame


@pytest.mark.parametrize("degradation", list(DEGRADATIONS))
@pytest.mark.parametrize("name", [p.name for p in SAMPLES])
def test_degraded_photograph_is_ungradable(photos, name, degradation):
    make, code = DEGRADATIONS[degradation]
    q = verdict(make(photos[name]))
    assert not q["gradable"] and codes(q) == {code}, q


def test_no_disc_gives_score_zero(photos):
    q = fundus.assess_quality(photos["idrid_01.jpg"], None)
    assert q == {"gradable": False, "score": 0.0, "reasons": [
        {"code": "no_fundus_detected", "message": q["reasons"][0]["message"]}]}


@pytest.mark.parametrize("degrade,levels", [
    (images.blurred, [0.0, 0.003, 0.005, 0.008, 0.012, 0.02]),
    (images.darkened, [1.0, 0.5, 0.3, 0.2, 0.12, 0.06]),
    (images.overexposed, [1.0, 1.5, 2.0, 2.5, 3.0, 4.0]),
    (images.hazy, [1.0, 0.6, 0.4, 0.3, 0.2, 0.1]),
], ids=["blur", "dark", "bright", "haze"])
def test_score_falls_as_the_photograph_gets_worse(photos, degrade, levels):
    for name in ("idrid_37.jpg", "right_normal_600.jpg"):
        img = photos[name]
        scores = [verdict(degrade(img, x) if x not in (0.0, 1.0) else img)["score"] for x in levels]
        assert scores == sorted(scores, reverse=True) and scores[0] >= 0.5 > scores[-1], (name, scores)


# ------------------------------------------------------------------ determinism, size, thresholds

def test_verdict_is_deterministic(photos):
    img = images.blurred(photos["idrid_49.jpg"], 0.004)
    assert verdict(img) == verdict(img.copy())


@pytest.mark.parametrize("name,factor", [("idrid_12.jpg", 4), ("idrid_01.jpg", 6),
                                         ("right_normal_600.jpg", 2)])
def test_verdict_does_not_depend_on_the_source_size(photos, name, factor):
    """The same photograph at full resolution, as decoded, and reduced (the disc still at least
    ANALYSIS_SIZE wide) gets the same measurements and verdict."""
    full = Image.open(REPO / "samples" / name).convert("RGB")
    for img in (full, photos[name], full.reduce(factor)):
        m = fundus.quality_metrics(img, fundus.find_disc(img))
        ref = fundus.quality_metrics(photos[name], fundus.find_disc(photos[name]))
        for key in ("brightness", "red_dominance", "contrast", "retina_visible"):
            assert m[key] == pytest.approx(ref[key], rel=0.03), (key, img.size)
        assert m["sharpness"] == pytest.approx(ref["sharpness"], rel=0.15), img.size
        assert verdict(img)["gradable"]


def test_thresholds_are_configurable(photos):
    img = photos["idrid_23.jpg"]
    blurry = images.blurred(img)
    assert codes(verdict(blurry)) == {"blurred"}
    lenient = fundus.QualityThresholds(min_sharpness=0.0)
    assert verdict(blurry, lenient)["gradable"]
    strict = dataclasses.replace(fundus.QualityThresholds(), min_brightness=0.9)
    assert codes(verdict(img, strict)) == {"too_dark"}
    assert verdict(img, fundus.QualityThresholds.from_dict(strict.to_dict())) == verdict(img, strict)


def test_prepare_returns_no_tensor_when_ungradable(photos):
    data = images.encode(images.darkened(photos["idrid_01.jpg"]))
    p = fundus.prepare(data)
    assert p.tensor is None and codes(p.quality) == {"too_dark"}
    assert p.display.size == (224, 224) and p.disc is not None
    p = fundus.prepare(images.encode(images.document_page()))
    assert p.tensor is None and p.display is None and p.disc is None
    assert codes(p.quality) == {"no_fundus_detected"}
