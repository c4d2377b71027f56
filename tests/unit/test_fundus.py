"""handlers/fundus.py: decoding, bad input, the disc fit, cropping and the tensor (fast, no services)."""
import dataclasses
import io
import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from handlers import fundus, quality
from tests.support import images

REPO = Path(__file__).resolve().parents[2]
SAMPLES = sorted((REPO / "samples").glob("*.jpg"))
CFG = fundus.PreprocessConfig()


@pytest.fixture(scope="module")
def decoded():
    """name -> (bytes, decoded image) for every sample photograph."""
    out = {}
    for path in SAMPLES:
        data = path.read_bytes()
        out[path.name] = data, fundus.decode(data, min_side=quality.ANALYSIS_SIZE)
    return out


def test_samples_present():
    assert SAMPLES, f"no sample photographs in {REPO / 'samples'}"


# ------------------------------------------------------------------ the real photographs

@pytest.mark.parametrize("path", SAMPLES, ids=lambda p: p.name)
def test_sample_prepares(path):
    p = fundus.prepare(path.read_bytes(), CFG)
    assert p.quality["gradable"], p.quality
    assert p.tensor is not None and p.tensor.shape == (3, 224, 224) and p.tensor.dtype == torch.float32
    assert torch.isfinite(p.tensor).all()
    assert p.display.mode == "RGB" and p.display.size == (224, 224)
    assert set(p.timings_ms) == {"decode", "preprocess"} and all(v >= 0 for v in p.timings_ms.values())
    w, h = p.disc.image_size
    assert 0.4 < p.disc.r / w < 0.6 and abs(p.disc.cx - w / 2) < 0.1 * w


def test_idrid_disc_is_cut_at_top_and_bottom(decoded):
    _, img = decoded["idrid_01.jpg"]
    disc = fundus.find_disc(img)
    assert disc.cut_top and disc.cut_bottom
    assert 0.85 < disc.visible_fraction < 0.97
    _, img = decoded["right_normal_600.jpg"]
    disc = fundus.find_disc(img)
    assert not (disc.cut_top or disc.cut_bottom) and disc.visible_fraction == 1.0


def test_prepare_matches_the_training_path(decoded):
    """Serving (prepare) and training (decode, find_disc, preprocess_image) give the same tensor."""
    data, img = decoded["idrid_05.jpg"]
    tensor, display = fundus.preprocess_image(img, fundus.find_disc(img), CFG)
    p = fundus.prepare(data, CFG)
    assert torch.equal(p.tensor, tensor)
    assert p.display.tobytes() == display.tobytes()


def test_verdict_does_not_depend_on_input_size(decoded):
    data, _ = decoded["idrid_23.jpg"]
    small = fundus.prepare(data, CFG)
    big = fundus.prepare(data, fundus.PreprocessConfig(input_size=320))
    assert big.tensor.shape == (3, 320, 320) and big.display.size == (320, 320)
    assert big.quality == small.quality


# ------------------------------------------------------------------ decoding

def test_draft_mode_shrinks_a_9mp_jpeg_while_decoding():
    data = images.encode(images.fundus_like((850, 712)).resize((3400, 2848)))
    for min_side in (512, 224):
        img = fundus.decode(data, min_side=min_side)
        assert img.size[0] < 3400 and img.size[1] < 2848
        assert min(img.size) >= min_side
    assert fundus.decode(data, min_side=512).size == (850, 712)  # 1/4 is the largest scale that fits
    assert fundus.decode(data, min_side=3000).size == (3400, 2848)


def test_real_idrid_decodes_small(decoded):
    data, img = decoded["idrid_12.jpg"]
    assert Image.open(io.BytesIO(data)).size == (3798, 2848)
    assert min(img.size) >= quality.ANALYSIS_SIZE and img.size[0] < 3798 // 4


def test_png_is_reduced_too():
    img = fundus.decode(images.encode(images.fundus_like((1600, 1200)), "PNG"), min_side=300)
    assert img.size == (400, 300)


@pytest.mark.parametrize("name", list(images.bad_inputs()))
def test_bad_input_is_rejected(name):
    data, code, status = images.bad_inputs()[name]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing (e.g. DecompressionBombWarning) may leak out
        with pytest.raises(fundus.ImageRejected) as info:
            fundus.decode(data, min_side=224)
    err = info.value
    assert (err.code, err.status) == (code, status)
    assert isinstance(err, ValueError) and err.message
    assert err.to_dict() == {"code": code, "message": err.message}


def test_bomb_guard_stays_on():
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(fundus.ImageRejected):
        fundus.decode(images.png_bomb(), min_side=224)
    assert Image.MAX_IMAGE_PIXELS == before and before is not None


@pytest.mark.parametrize("side", [10000, 40000])
def test_pillows_guard_applies_even_when_the_caller_allows_more(side):
    """10000^2 makes Pillow warn and 40000^2 makes it raise; both become a 413, never a decode."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(fundus.ImageRejected) as info:
            fundus.decode(images.png_bomb(side, side), min_side=224, max_pixels=10 ** 10)
    assert info.value.code == "image_too_large" and info.value.status == 413
    assert not caught, [str(w.message) for w in caught]


def test_max_pixels_is_the_callers_limit():
    data = images.encode(images.fundus_like((400, 300)))
    assert fundus.decode(data, min_side=224, max_pixels=120_000).size == (400, 300)
    with pytest.raises(fundus.ImageRejected) as info:
        fundus.decode(data, min_side=224, max_pixels=119_999)
    assert info.value.code == "image_too_large" and info.value.status == 413


@pytest.mark.parametrize("name", list(images.awkward_inputs()))
def test_awkward_image_decodes_to_rgb(name):
    img = fundus.decode(images.awkward_inputs()[name], min_side=64)
    assert img.mode == "RGB" and min(img.size) >= 64


def _mean(img, box=None):
    return np.asarray(img.crop(box) if box else img, np.float32).reshape(-1, 3).mean(axis=0)


def test_exif_orientation_is_applied():
    img = fundus.decode(images.exif_rotated_jpeg(), min_side=64)
    assert img.size == (120, 200)
    assert np.allclose(_mean(img, (0, 0, 120, 90)), (255, 0, 0), atol=8)       # red on top
    assert np.allclose(_mean(img, (0, 110, 120, 200)), (0, 0, 255), atol=8)    # blue below


def test_sixteen_bit_is_scaled_not_clipped():
    img = fundus.decode(images.png16(), min_side=64)
    row = np.asarray(img)[0, :, 0]
    assert row[0] == 0 and row[-1] == 255 and 110 < row[len(row) // 2] < 145
    assert np.all(np.diff(row.astype(int)) >= 0)


def test_multipage_tiff_uses_the_first_page():
    img = fundus.decode(images.multipage_tiff(), min_side=64)
    assert np.allclose(_mean(img), (200, 0, 0), atol=1)


def test_transparency_becomes_black():
    rgba = Image.new("RGBA", (128, 96), (200, 80, 30, 255))
    rgba.paste((200, 80, 30, 0), (0, 0, 64, 96))
    img = fundus.decode(images.encode(rgba, "PNG"), min_side=64)
    assert np.allclose(_mean(img, (0, 0, 64, 96)), 0)
    assert np.allclose(_mean(img, (64, 0, 128, 96)), (200, 80, 30))


@pytest.mark.parametrize("name", ["cmyk_jpeg", "palette_png", "grayscale_jpeg"])
def test_converted_colours_stay_close(name):
    source = images.fundus_like((160, 120))
    img = fundus.decode(images.awkward_inputs()[name], min_side=64)
    expected = _mean(source.convert("L").convert("RGB") if name == "grayscale_jpeg" else source)
    assert np.allclose(_mean(img), expected, atol=6)


# ------------------------------------------------------------------ the disc

@pytest.mark.parametrize("center,diameter", [((0.5, 0.5), 1.06), ((0.5, 0.5), 0.9), ((0.42, 0.55), 1.2),
                                             ((0.45, 0.5), 0.7)])
def test_find_disc_recovers_a_known_circle(center, diameter):
    w, h = 800, 600
    img = fundus.decode(images.encode(images.fundus_like((w, h), center=center, diameter=diameter)),
                        min_side=224)
    disc = fundus.find_disc(img)
    s = img.width / w
    r = diameter * h / 2 * s
    assert abs(disc.r - r) < 0.02 * r
    assert np.hypot(disc.cx - center[0] * w * s, disc.cy - center[1] * h * s) < 0.02 * r
    assert disc.fit > 0.97 and disc.border < 0.05
    assert disc.cut_top == disc.cut_bottom == (diameter * h / 2 > center[1] * h)


def test_find_disc_ignores_text_in_the_border():
    img = images.fundus_like((800, 600), diameter=0.9)
    draw = ImageDraw.Draw(img)
    for y in (10, 40, 540, 570):
        draw.text((10, y), "2024-05-01 OD 45deg", fill=(255, 255, 255), font_size=22)
    disc = fundus.find_disc(img)
    assert abs(disc.r - 270) < 0.02 * 270 and np.hypot(disc.cx - 400, disc.cy - 300) < 0.02 * 270


def test_find_disc_scales_to_the_image_it_was_found_in(decoded):
    _, img = decoded["idrid_37.jpg"]
    disc = fundus.find_disc(img)
    half = img.reduce(2)
    small = fundus.find_disc(half)
    assert small.image_size == half.size and abs(small.r * 2 - disc.r) < 0.02 * disc.r
    # a disc found on a copy crops the original the same way
    a = np.asarray(fundus.crop_disc(img, small, 224), np.float32)
    b = np.asarray(fundus.crop_disc(img, disc, 224), np.float32)
    assert np.abs(a - b).mean() < 6


@pytest.mark.parametrize("image", [images.blank_frame(), images.blank_frame(value=128),
                                   images.blank_frame(value=255), images.document_page()],
                         ids=["black", "grey", "white", "document"])
def test_no_disc_in_frames_without_a_round_field(image):
    assert fundus.find_disc(image) is None


# ------------------------------------------------------------------ crop, mask and tensor

def test_crop_pads_cut_discs_with_black_and_masks_them(decoded):
    _, img = decoded["idrid_01.jpg"]
    disc = fundus.find_disc(img)
    crop = fundus.crop_disc(img, disc, 224)
    mask = fundus.retina_mask(img.size, disc, 224, None)
    a = np.asarray(crop)
    assert crop.size == (224, 224)
    assert not mask[0].any() and not mask[-1].any() and mask[112].mean() > 0.97  # cut top and bottom
    assert a[0].max() == 0 and a[-1].max() == 0
    assert a[mask].mean() > 60


def test_tensor_fill_outside_the_mask(decoded):
    _, img = decoded["right_normal_600.jpg"]
    disc = fundus.find_disc(img)
    mean, std = np.asarray(CFG.mean), np.asarray(CFG.std)
    for ben_graham, fill in ((True, 128.0), (False, 0.0)):
        cfg = dataclasses.replace(CFG, ben_graham=ben_graham)
        tensor, _ = fundus.preprocess_image(img, disc, cfg)
        corner = tensor[:, 0, 0].numpy()
        assert np.allclose(corner, (fill / 255 - mean) / std, atol=1e-5)


def test_ben_graham_centres_the_retina_on_grey(decoded):
    _, img = decoded["idrid_12.jpg"]
    disc = fundus.find_disc(img)
    tensor, _ = fundus.preprocess_image(img, disc, CFG)
    mask = fundus.retina_mask(img.size, disc, 224, CFG.mask_radius)
    x = (tensor.numpy() * np.asarray(CFG.std)[:, None, None] + np.asarray(CFG.mean)[:, None, None]) * 255
    assert np.allclose(x[:, mask].mean(axis=1), 128, atol=6)
    # the rows where the frame cuts the disc: no bright halo, and no pixels half made of padding
    rows = np.flatnonzero(mask.any(axis=1))
    for r in (rows[0], rows[-1]):
        assert 90 < x[:, r, mask[r]].mean() < 150


def test_plain_normalisation_without_ben_graham(decoded):
    _, img = decoded["idrid_49.jpg"]
    disc = fundus.find_disc(img)
    cfg = fundus.PreprocessConfig(ben_graham=False, circular_mask=False)
    tensor, display = fundus.preprocess_image(img, disc, cfg)
    expected = (np.asarray(display, np.float32) / 255 - cfg.mean) / cfg.std
    mask = fundus.retina_mask(img.size, disc, 224, None)
    assert np.allclose(tensor.numpy().transpose(1, 2, 0)[mask], expected[mask], atol=1e-5)


# ------------------------------------------------------------------ configs and packaging

@pytest.mark.parametrize("cls", [fundus.PreprocessConfig, fundus.QualityThresholds])
def test_config_round_trips_through_json(cls):
    cfg = cls()
    assert cls.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert cls.from_dict({}) == cfg
    with pytest.raises(ValueError, match="unknown"):
        cls.from_dict({"no_such_setting": 1})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.__setattr__(dataclasses.fields(cls)[0].name, 1)


def test_importable_as_a_top_level_module(tmp_path):
    """Inside the .mar the handler files sit side by side and `handlers` is not a package."""
    for name in ("fundus.py", "quality.py"):
        (tmp_path / name).write_bytes((REPO / "handlers" / name).read_bytes())
    code = ("import os, sys; sys.modules['handlers'] = None\n"
            "import fundus\n"
            f"p = fundus.prepare(open({str(SAMPLES[0])!r}, 'rb').read())\n"
            "assert fundus.quality.__file__.startswith(os.getcwd()), fundus.quality.__file__\n"
            "print(p.quality['gradable'], tuple(p.tensor.shape))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin"}, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True (3, 224, 224)"
