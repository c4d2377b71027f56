"""Seeded generator of synthetic fundus photographs with diabetic-retinopathy lesions by ICDR grade.

The images are drawings, not photographs of anyone: they exist so the whole pipeline (training,
evaluation, archiving, serving) can be built and tested without licensed patient data. A model
trained on them has no clinical accuracy. The lesion model is documented in docs/synthetic-data.md.

    python -m scripts.ml.synth --out var/synth --n 1500 --seed 0 --size 512

writes an APTOS-style folder: ``train_images/<id_code>.jpg`` and ``train.csv`` (id_code,diagnosis).
Every image depends only on (seed, index), so the output is identical for any number of workers.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import math
import multiprocessing
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from scripts.ml.synth_anatomy import SUPERSAMPLE, Eye, geometry, smooth_noise, vessels
from scripts.ml.synth_lesions import add_lesions

# Skewed towards grade 0 like screening data, but every grade keeps enough examples to learn from.
DEFAULT_GRADE_MIX = (0.40, 0.15, 0.20, 0.12, 0.13)

# --- compositing ---------------------------------------------------------------------------------

def _tint(img, region, factor, strength=1.0):
    """Darken/redden under a coverage layer: multiply towards a colour factor."""
    if region is None:
        return
    win, cover = region
    img[win] *= 1.0 - (strength * cover)[..., None] * (1.0 - np.asarray(factor, dtype=np.float32))


def _paint(img, region, colour, light=None, strength=1.0):
    """Cover with an own colour (bright lesions, disc), optionally scaled by a light field."""
    if region is None:
        return
    win, cover = region
    target = np.asarray(colour, dtype=np.float32)
    if light is not None:
        target = target * light[win][..., None]
    img[win] += (strength * cover)[..., None] * (target - img[win])


def _window(eye: Eye, centre, radius):
    """Slices of the image around a circle, and pixel-centre coordinate grids inside them."""
    y0, y1 = max(0, int(centre[1] - radius)), min(eye.h, int(centre[1] + radius) + 2)
    x0, x1 = max(0, int(centre[0] - radius)), min(eye.w, int(centre[0] + radius) + 2)
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    return (slice(y0, y1), slice(x0, x1)), xx, yy


def render(seed: int, grade: int, size: int = 512) -> tuple[Image.Image, dict]:
    """One synthetic fundus photograph of the given ICDR grade (0-4).

    The anatomy, lighting and camera come from one random stream and the lesions from another, so
    the same seed gives the same eye at every grade: tests can isolate lesion pixels by difference.
    """
    if grade not in range(5):
        raise ValueError(f"grade must be 0-4, got {grade!r}")
    rng = np.random.default_rng([seed, 0])
    lrng = np.random.default_rng([seed, 1, grade])
    eye, cut = geometry(rng, size)
    img, illum = _retina(rng, eye)
    arteries, veins = vessels(rng, eye)
    _tint(img, arteries.region(0.4), (0.82, 0.5, 0.52))
    _tint(img, veins.region(0.4), (0.62, 0.3, 0.36))
    les = add_lesions(lrng, eye, grade)
    red = les.red.region(0.5)
    _paint_lesions(img, les, red, illum, eye)
    out = _camera(rng, img, illum, eye, size)
    right = bool(rng.random() < 0.5)
    if not right:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    info = {"grade": grade, "eye": "right" if right else "left", "disc_cut": bool(cut),
            "size": [eye.w, eye.h], "fov_radius_px": round(eye.r, 1), "lesions": les.counts,
            "haemorrhages_per_quadrant": les.haem_per_quadrant,
            "red_lesion_pixels": 0 if red is None else int((red[1] > 0.5).sum())}
    return out, info


def _retina(rng, eye: Eye) -> tuple[np.ndarray, np.ndarray]:
    """(float RGB image, illumination field): the healthy retina, macula and optic disc, before
    vessels, lesions and the camera."""
    h, w = eye.h, eye.w
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    dist = np.hypot(xx - eye.cx, yy - eye.cy) / eye.r

    # Retina: orange-red base, choroidal mottling, uneven camera illumination.
    base = np.array([rng.uniform(0.72, 0.95), rng.uniform(0.28, 0.48), rng.uniform(0.08, 0.22)], np.float32)
    img = np.empty((h, w, 3), np.float32)
    img[:] = base
    img *= smooth_noise(rng, (h, w), 10, 0.08)[..., None]
    img *= smooth_noise(rng, (h, w), 40, 0.03)[..., None]
    ga = rng.uniform(0, 2 * np.pi)
    illum = (rng.uniform(0.75, 1.12)
             * (1.0 - rng.uniform(0.2, 0.45) * np.clip(dist, 0, 1.2) ** rng.uniform(2.0, 3.0))
             * (1.0 + rng.uniform(0.0, 0.15) * ((xx - eye.cx) * np.cos(ga) + (yy - eye.cy) * np.sin(ga)) / eye.r))
    illum = illum.astype(np.float32)

    # Macula: a darker, slightly browner area with the darkest spot at the fovea.
    md = ((xx - eye.macula[0]) ** 2 + (yy - eye.macula[1]) ** 2) / (eye.r * rng.uniform(0.12, 0.17)) ** 2
    img *= (1.0 - rng.uniform(0.25, 0.4) * np.exp(-md / 2))[..., None] * np.array([1.0, 0.97, 1.0], np.float32)

    # Optic nerve head: a pale disc with a brighter, slightly temporal cup.
    win, wx, wy = _window(eye, eye.disc, 1.2 * eye.disc_r)
    dd = np.hypot(wx - eye.disc[0], wy - eye.disc[1]) / eye.disc_r
    _paint(img, (win, np.clip((1.12 - dd) / 0.22, 0, 1)),
           (0.98, rng.uniform(0.72, 0.85), rng.uniform(0.5, 0.62)), strength=rng.uniform(0.75, 0.9))
    cup = rng.uniform(0.3, 0.55)
    cd = np.hypot(wx - (eye.disc[0] - 0.12 * eye.disc_r), wy - eye.disc[1]) / (cup * eye.disc_r)
    _paint(img, (win, np.clip((1.2 - cd) / 0.5, 0, 1)), (1.0, 0.95, 0.84), strength=0.85)
    return img, illum


def _paint_lesions(img: np.ndarray, les, red, illum: np.ndarray, eye: Eye) -> None:
    _tint(img, red, (0.5, 0.17, 0.16))
    _tint(img, les.new_vessels.region(0.3), (0.55, 0.22, 0.26))
    _tint(img, les.preretinal_blood.region(0.6), (0.32, 0.06, 0.06))
    # bright lesions keep their colour in dim corners: partly undo the illumination applied below
    compensate = illum ** -0.5
    _paint(img, les.exudate.region(0.5), (1.0, 0.9, 0.45), compensate, strength=0.95)
    _paint(img, les.cotton.region(2.0), (0.96, 0.9, 0.8), compensate, strength=0.8)
    for c, rad in les.haze:  # vitreous blood: a diffuse red veil that hides detail
        win, wx, wy = _window(eye, c, 2.5 * rad)
        _paint(img, (win, np.exp(-((wx - c[0]) ** 2 + (wy - c[1]) ** 2) / rad ** 2)), (0.55, 0.1, 0.06),
               strength=0.45)


def _camera(rng, img: np.ndarray, illum: np.ndarray, eye: Eye, size: int) -> Image.Image:
    """Illumination, colour balance, the round field of view with its notch, sensor noise, gamma, defocus."""
    h, w = eye.h, eye.w
    img *= illum[..., None]
    if rng.random() < 0.5:  # camera colour balance
        img *= np.array([rng.uniform(0.9, 1.05), rng.uniform(0.9, 1.1), rng.uniform(0.85, 1.2)], np.float32)

    # Field of view: a bright circle (cut at top/bottom for some), with the camera's notch.
    fov = Image.new("L", (w * SUPERSAMPLE, h * SUPERSAMPLE), 0)
    d = ImageDraw.Draw(fov)
    s, R = SUPERSAMPLE, eye.r * SUPERSAMPLE
    d.ellipse([eye.cx * s - R, eye.cy * s - R, eye.cx * s + R, eye.cy * s + R], fill=255)
    if rng.random() < 0.7:
        na = rng.uniform(-1.2, -0.4) if rng.random() < 0.7 else rng.uniform(0, 2 * np.pi)
        nx, ny, nw = eye.cx + eye.r * math.cos(na), eye.cy + eye.r * math.sin(na), eye.r * 0.05
        d.rectangle([(nx - nw) * s, (ny - nw) * s, (nx + nw) * s, (ny + nw) * s], fill=255)
    fov_a = np.asarray(fov.reduce(SUPERSAMPLE).filter(ImageFilter.GaussianBlur(0.8 * size / 512)),
                       np.float32)[..., None] / 255.0
    background = rng.uniform(0.0, 0.03)
    img = img * fov_a + background * (1 - fov_a)

    img += rng.standard_normal(img.shape, dtype=np.float32) * rng.uniform(0.004, 0.012)  # sensor noise
    out = Image.fromarray((np.clip(img, 0, 1) ** rng.uniform(0.9, 1.1) * 255 + 0.5).astype(np.uint8))
    if rng.random() < 0.3:  # slight defocus
        out = out.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.8) * size / 512))
    return out


# --- dataset writer ------------------------------------------------------------------------------

def id_code(seed: int, index: int) -> str:
    return hashlib.sha1(f"clarity-synth:{seed}:{index}".encode()).hexdigest()[:12]


def grade_plan(n: int, seed: int, mix=DEFAULT_GRADE_MIX) -> list[int]:
    """Exact per-grade counts from the mix (largest remainder), shuffled with the seed."""
    raw = np.asarray(mix, dtype=np.float64) / np.sum(mix) * n
    counts = np.floor(raw).astype(int)
    counts[np.argsort(raw - counts)[::-1][: n - counts.sum()]] += 1
    grades = np.repeat(np.arange(len(mix)), counts)
    np.random.default_rng([seed, 2]).shuffle(grades)
    return grades.tolist()


def image_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "png":
        img.save(buf, "PNG", optimize=False, compress_level=6)
    else:
        img.save(buf, "JPEG", quality=92, subsampling=0)
    return buf.getvalue()


def _make_one(job):
    seed, index, grade, size, fmt, out_dir = job
    img, _ = render(image_seed(seed, index), grade, size)
    name = id_code(seed, index)
    (Path(out_dir) / f"{name}.{fmt}").write_bytes(_encode(img, fmt))
    return name, grade


def generate(out: Path, n: int, seed: int = 0, size: int = 512, fmt: str = "jpg", workers: int = 1,
             mix=DEFAULT_GRADE_MIX, progress: bool = True) -> Path:
    """Write an APTOS-style folder; returns the path of train.csv."""
    from tqdm import tqdm

    out = Path(out)
    img_dir = out / "train_images"
    img_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(seed, i, g, size, fmt, str(img_dir)) for i, g in enumerate(grade_plan(n, seed, mix))]
    bar = dict(total=n, desc="synth", unit="img", disable=not progress)
    if workers > 1:
        # Torch may already hold threads in this process; a fresh spawn start avoids fork issues.
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            rows = list(tqdm(pool.imap(_make_one, jobs, chunksize=4), **bar))
    else:
        rows = [_make_one(j) for j in tqdm(jobs, **bar)]
    # Marks the folder as synthetic for scripts/ml/datasets.py, so checkpoints and model cards say so.
    (out / "synthetic.json").write_text(json.dumps(
        {"generator": "scripts.ml.synth", "n": n, "seed": seed, "size": size, "format": fmt,
         "grade_mix": list(mix), "note": "Synthetic drawings, not photographs of patients."}, indent=2))
    csv_path = out / "train.csv"
    with open(csv_path, "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["id_code", "diagnosis"])
        wr.writerows(rows)
    return csv_path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="output folder (APTOS layout)")
    ap.add_argument("--n", type=int, default=1500, help="number of images")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=512, help="image height in pixels (width 1.0-1.3x)")
    ap.add_argument("--format", choices=("jpg", "png"), default="jpg")
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--mix", type=float, nargs=5, default=DEFAULT_GRADE_MIX, metavar="P",
                    help="relative share of grades 0..4")
    args = ap.parse_args(argv)
    path = generate(args.out, args.n, args.seed, args.size, args.format, args.workers, tuple(args.mix))
    print(f"wrote {args.n} images and {path}")


if __name__ == "__main__":
    main()
