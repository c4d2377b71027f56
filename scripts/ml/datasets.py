"""Labelled fundus datasets for training and evaluation.

Reads the label CSVs of APTOS 2019 (`id_code,diagnosis`), EyePACS / Kaggle DR 2015 (`image,level`)
and IDRiD (`Image name,Retinopathy grade`), recognised by their header, into (name, path, grade)
samples; splits them by grade with a seed; fingerprints them; and serves them as a torch Dataset that
preprocesses with `handlers.fundus`, the same functions the TorchServe handler runs.
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
import multiprocessing
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from handlers import fundus

# header (lower-case) of the name column and of the grade column
FORMATS = {
    "aptos": ("id_code", "diagnosis"),
    "eyepacs": ("image", "level"),
    "idrid": ("image name", "retinopathy grade"),
}
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
DEFAULT_CSVS = ("train.csv", "trainLabels.csv", "labels.csv")
SYNTHETIC_MARKER = "synthetic.json"  # written by scripts/ml/synth.py beside its train.csv
NUM_GRADES = 5


@dataclass(frozen=True)
class Sample:
    name: str
    path: Path
    grade: int


@dataclass
class LabelledSet:
    name: str
    format: str
    csv: Path
    samples: list
    synthetic: bool

    def counts(self, samples=None) -> list[int]:
        c = Counter(s.grade for s in (self.samples if samples is None else samples))
        return [c.get(g, 0) for g in range(NUM_GRADES)]

    def describe(self) -> dict:
        """The checkpoint's `dataset` entry (contracts.md section 2)."""
        return {"name": self.name, "format": self.format, "csv": self.csv.name,
                "fingerprint": fingerprint(self.samples), "synthetic": self.synthetic,
                "counts": self.counts()}


# --------------------------------------------------------------------------- labels

def find_csv(data_dir: Path) -> Path:
    data_dir = Path(data_dir)
    for name in DEFAULT_CSVS:
        if (data_dir / name).is_file():
            return data_dir / name
    found = sorted(data_dir.glob("*.csv"))
    if len(found) == 1:
        return found[0]
    raise ValueError(f"{data_dir}: cannot tell which label CSV to use "
                     f"({', '.join(p.name for p in found) or 'none found'}); pass --csv")


def detect_format(header: list[str]) -> str:
    cols = [h.strip().lower() for h in header]
    for fmt, (name_col, grade_col) in FORMATS.items():
        if name_col in cols and grade_col in cols:
            return fmt
    raise ValueError(f"unrecognised label CSV header {header!r}; expected one of "
                     + "; ".join(f"{fmt}: {a!r},{b!r}" for fmt, (a, b) in FORMATS.items()))


def _image_index(roots) -> dict[str, list[Path]]:
    index: dict[str, list[Path]] = {}
    for root in roots:
        for dirpath, _dirs, files in os.walk(root):
            for f in files:
                stem, ext = os.path.splitext(f)
                if ext.lower() in IMAGE_EXTS:
                    index.setdefault(stem, []).append(Path(dirpath) / f)
    return index


def _pick(name: str, paths: list[Path], csv_path: Path) -> Path:
    """One file per name; APTOS keeps train_images/ and test_images/ side by side, so prefer the
    folder named like the CSV (train.csv -> train_images/)."""
    if len(set(paths)) == 1:
        return paths[0]
    prefix = csv_path.stem.lower().removesuffix("labels")
    near = [p for p in paths if p.parent.name.lower().startswith(prefix)]
    if len(near) == 1:
        return near[0]
    raise ValueError(f"image {name!r} is ambiguous: {', '.join(map(str, paths[:4]))}")


def read_labels(csv_path: Path, data_dir: Path | None = None) -> tuple[str, list[Sample]]:
    """(format, samples) from a label CSV; image files are looked up under data_dir (or the CSV's
    folder) by name, with or without an extension in the CSV."""
    csv_path = Path(csv_path)
    roots = {Path(data_dir or csv_path.parent).resolve(), csv_path.parent.resolve()}
    roots = {r for r in roots if not any(o != r and o in r.parents for o in roots)}  # walk each file once
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.reader(f))
    if not rows:
        raise ValueError(f"{csv_path} is empty")
    fmt = detect_format(rows[0])
    cols = [h.strip().lower() for h in rows[0]]
    ni, gi = (cols.index(c) for c in FORMATS[fmt])
    index = _image_index(sorted(roots))
    samples, missing, seen = [], [], set()
    for line, row in enumerate(rows[1:], start=2):
        if len(row) <= max(ni, gi) or not row[ni].strip():
            continue  # IDRiD's sheets end in blank rows
        raw = row[ni].strip()
        stem, ext = os.path.splitext(raw)
        name = stem if ext.lower() in IMAGE_EXTS else raw
        try:
            grade = int(float(row[gi]))
        except ValueError:
            raise ValueError(f"{csv_path}:{line}: grade {row[gi]!r} is not a number") from None
        if not 0 <= grade < NUM_GRADES:
            raise ValueError(f"{csv_path}:{line}: grade {grade} is outside 0-{NUM_GRADES - 1}")
        if name in seen:
            raise ValueError(f"{csv_path}:{line}: image {name!r} is listed twice")
        seen.add(name)
        paths = index.get(name)
        if not paths:
            missing.append(name)
            continue
        samples.append(Sample(name, _pick(name, paths, csv_path), grade))
    if missing:
        raise ValueError(f"{len(missing)} images listed in {csv_path.name} were not found under "
                         f"{', '.join(map(str, sorted(roots)))} (first: {', '.join(missing[:5])})")
    if not samples:
        raise ValueError(f"{csv_path} lists no images")
    return fmt, samples


def load(data_dir: Path, csv_path: Path | None = None) -> LabelledSet:
    data_dir = Path(data_dir)
    csv_path = Path(csv_path) if csv_path else find_csv(data_dir)
    fmt, samples = read_labels(csv_path, data_dir)
    synthetic = (data_dir / SYNTHETIC_MARKER).is_file() or (csv_path.parent / SYNTHETIC_MARKER).is_file()
    return LabelledSet(data_dir.resolve().name, fmt, csv_path, samples, synthetic)


def fingerprint(samples) -> str:
    """sha256 over sorted (name, grade, file size): changes with any label, image added/removed or
    replaced by a file of another size, and not with the folder's location."""
    h = hashlib.sha256()
    for name, grade, size in sorted((s.name, s.grade, s.path.stat().st_size) for s in samples):
        h.update(json.dumps([name, grade, size]).encode() + b"\n")
    return h.hexdigest()


def stratified_split(samples, fractions: dict[str, float], seed: int = 0) -> dict[str, list[Sample]]:
    """{"train": [...], **{part: [...] for part in fractions}}, each grade divided in the same
    proportions (largest remainder per grade); the order of the input does not matter."""
    if sum(fractions.values()) >= 1:
        raise ValueError("split fractions must leave something to train on")
    rng = np.random.default_rng(seed)
    out = {"train": [], **{k: [] for k in fractions}}
    by_grade: dict[int, list[Sample]] = {}
    for s in sorted(samples, key=lambda s: s.name):
        by_grade.setdefault(s.grade, []).append(s)
    for grade in sorted(by_grade):
        group = by_grade[grade]
        order = rng.permutation(len(group))
        start = 0
        for part, frac in fractions.items():
            n = int(math.floor(frac * len(group) + 0.5))
            out[part].extend(group[i] for i in order[start:start + n])
            start += n
        out["train"].extend(group[i] for i in order[start:])
    return out


def select(samples, names) -> list[Sample]:
    """The samples with these names (for re-creating a split stored in a checkpoint)."""
    by_name = {s.name: s for s in samples}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise ValueError(f"{len(missing)} images of the stored split are missing (first: {missing[:5]})")
    return [by_name[n] for n in names]


# --------------------------------------------------------------------------- images

def load_crop(path: Path, cfg: fundus.PreprocessConfig, thresholds: fundus.QualityThresholds):
    """(rgb S x S uint8, mask S x S bool) of the disc crop, or the quality verdict when ungradable.

    `fundus.prepare` stopped before `to_tensor`, so that augmentation can sit between the crop and
    the normalisation.
    """
    p = fundus.prepare(Path(path).read_bytes(), cfg, thresholds, normalise=False)
    if not p.quality["gradable"]:
        return p.quality
    return np.asarray(p.display, dtype=np.uint8), fundus.input_mask(p.disc.image_size, p.disc, cfg)


def _load_job(job):
    path, cfg, thresholds = job
    try:
        return load_crop(path, cfg, thresholds)
    except fundus.ImageRejected as exc:
        return {"gradable": False, "reasons": [exc.to_dict()]}


@dataclass(frozen=True)
class Augment:
    """Label-preserving changes for fundus photographs: any rotation and mirror (the grade does not
    depend on orientation or eye side), a little zoom, and the small exposure and white-balance
    differences between cameras."""
    rotation: float = 180.0
    scale: tuple = (0.95, 1.08)
    brightness: float = 0.15
    contrast: float = 0.15
    saturation: float = 0.1
    hue: float = 0.02

    def __call__(self, rgb: Image.Image, mask: Image.Image):
        # torch's global generator: DataLoader seeds it differently in every worker
        u = torch.rand(8).tolist()
        angle = (2 * u[0] - 1) * self.rotation
        scale = self.scale[0] + u[1] * (self.scale[1] - self.scale[0])
        rgb = TF.affine(rgb, angle=angle, translate=[0, 0], scale=scale, shear=[0.0, 0.0],
                        interpolation=TF.InterpolationMode.BILINEAR, fill=0)
        mask = TF.affine(mask, angle=angle, translate=[0, 0], scale=scale, shear=[0.0, 0.0],
                         interpolation=TF.InterpolationMode.NEAREST, fill=0)
        if u[2] < 0.5:
            rgb, mask = TF.horizontal_flip(rgb), TF.horizontal_flip(mask)
        if u[3] < 0.5:
            rgb, mask = TF.vertical_flip(rgb), TF.vertical_flip(mask)
        rgb = TF.adjust_brightness(rgb, 1 + (2 * u[4] - 1) * self.brightness)
        rgb = TF.adjust_contrast(rgb, 1 + (2 * u[5] - 1) * self.contrast)
        rgb = TF.adjust_saturation(rgb, 1 + (2 * u[6] - 1) * self.saturation)
        rgb = TF.adjust_hue(rgb, (2 * u[7] - 1) * self.hue)
        return rgb, mask


class FundusDataset(torch.utils.data.Dataset):
    """(tensor [3, S, S], grade) per gradable image.

    With `preload`, every image is decoded and cropped once (in `workers` processes) and kept as
    uint8 in memory; ungradable images are then dropped and listed in `rejected`. Without it,
    images are read on access and an ungradable one yields None (see `collate`).
    """

    def __init__(self, samples, cfg: fundus.PreprocessConfig,
                 thresholds: fundus.QualityThresholds = fundus.QualityThresholds(),
                 augment: Augment | None = None, preload: bool = True, workers: int = 1,
                 progress: bool = False):
        self.cfg, self.thresholds, self.augment = cfg, thresholds, augment
        self.samples = list(samples)
        self.rejected: list[tuple[Sample, dict]] = []
        self._cache = None
        if preload:
            self._preload(workers, progress)

    def _preload(self, workers: int, progress: bool):
        from tqdm import tqdm

        jobs = [(s.path, self.cfg, self.thresholds) for s in self.samples]
        bar = dict(total=len(jobs), desc="preprocess", unit="img", disable=not progress, leave=False)
        if workers > 1 and len(jobs) > 16:
            with multiprocessing.get_context("spawn").Pool(workers) as pool:
                results = list(tqdm(pool.imap(_load_job, jobs, chunksize=8), **bar))
        else:
            results = [_load_job(j) for j in tqdm(jobs, **bar)]
        kept, cache = [], []
        for s, r in zip(self.samples, results):
            if isinstance(r, dict):
                self.rejected.append((s, r))
            else:
                kept.append(s)
                cache.append((r[0], np.packbits(r[1])))
        self.samples, self._cache = kept, cache

    def __len__(self):
        return len(self.samples)

    @property
    def grades(self) -> list[int]:
        return [s.grade for s in self.samples]

    def __getitem__(self, i):
        s = self.samples[i]
        size = self.cfg.input_size
        if self._cache is not None:
            rgb, packed = self._cache[i]
            mask = np.unpackbits(packed, count=size * size).reshape(size, size).astype(bool)
        else:
            r = _load_job((s.path, self.cfg, self.thresholds))
            if isinstance(r, dict):
                return None
            rgb, mask = r
        if self.augment is not None:
            img, m = self.augment(Image.fromarray(rgb), Image.fromarray(mask.astype(np.uint8) * 255))
            rgb, mask = np.asarray(img), np.asarray(m) > 0
        return fundus.to_tensor(Image.fromarray(rgb), mask, self.cfg), s.grade


def collate(batch):
    """Default collation without the ungradable images (None) of a non-preloaded dataset."""
    batch = [b for b in batch if b is not None]
    if not batch:
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    return torch.utils.data.default_collate(batch)
