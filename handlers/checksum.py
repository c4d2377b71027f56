"""SHA-256 of a file, for the handler (an archive's ONNX file against model_meta.json) and the
scripts (checkpoints, weights, archive contents). Here so that handlers/ imports nothing from
scripts/ and the archive carries it (scripts/ml/archive.py bundles every module in handlers/)."""
from __future__ import annotations

import hashlib
from pathlib import Path


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks (checkpoints and weights run to tens of MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
