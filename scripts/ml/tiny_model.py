"""A tiny DR model with random (seeded) weights: what the tests serve, and what `python -m
bench.loadtest --model tiny` serves when no demo checkpoint exists. Its grades mean nothing; it
exercises the machinery (decode, quality gate, batching, storage), never accuracy."""
from __future__ import annotations

import datetime as dt
from pathlib import Path

import torch

from handlers import fundus
from handlers.network import DRNet
from scripts.ml import archive

GRADE_LABELS = ["No DR", "Mild NPDR", "Moderate NPDR", "Severe NPDR", "Proliferative DR"]
TINY_ARCH, TINY_INPUT = "mobilenet_v3_small", 128


def make_checkpoint(path: Path, arch: str = TINY_ARCH, input_size: int = TINY_INPUT,
                    synthetic: bool = True, seed: int = 0) -> Path:
    """A checkpoint with every key of docs/contracts.md §2 and random (seeded) weights."""
    torch.manual_seed(seed)
    model = DRNet(arch=arch, num_classes=len(GRADE_LABELS))
    torch.save({
        "format": archive.CHECKPOINT_FORMAT,
        "arch": arch,
        "num_classes": len(GRADE_LABELS),
        "state_dict": model.state_dict(),
        "preprocess": fundus.PreprocessConfig(input_size=input_size).to_dict(),
        "quality": fundus.QualityThresholds().to_dict(),
        "grade_labels": GRADE_LABELS,
        "referable_threshold": 2,
        "dataset": {"name": "test-random", "format": "none", "fingerprint": "0" * 64,
                    "synthetic": synthetic, "counts": {"train": 0, "val": 0}},
        "metrics": {"val": {"quadratic_kappa": 0.0, "accuracy": 0.2}},
        "history": [],
        "code_revision": "test",
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }, path)
    return path
