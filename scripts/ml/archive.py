"""Build a versioned TorchServe archive (model_store/<name>_<version>.mar) from a training checkpoint.

    python -m scripts.ml.archive --checkpoint CK --version 1.1 [--name dr] [--model-store model_store]
        [--batch-size 8 --max-batch-delay 5 --response-timeout 60 --torch-threads 1 --workers N]
        [--engine eager|onnx|onnx-int8 [--calibration-dir TRAIN_IMAGES]]

The archive holds the handler with every sibling module in handlers/ (network.py the model file), the weights as a
plain float32 state dict, model_meta.json (what the handler needs), model-config.yaml (batching,
timeout, torch threads; workers only with --workers) and MODEL_CARD.md; with --engine onnx
(or onnx-int8) also the network exported as model.onnx for ONNX Runtime (handlers/engine.py).
The card is also written beside the .mar. Versions are immutable: an existing archive is never
overwritten.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from handlers import engine as engines
from handlers import fundus, quality
from handlers.network import ARCHS, DRNet
from handlers.checksum import sha256_file
from scripts.ml.card import GENERAL_DISCLAIMER, SYNTHETIC_DISCLAIMER, archive_card

REPO = Path(__file__).resolve().parents[2]
HANDLERS = REPO / "handlers"
HANDLER_FILE = HANDLERS / "dr_handler.py"
MODEL_FILE = HANDLERS / "network.py"
CHECKPOINT_FORMAT = "clarity-dr-checkpoint/1"
META_FORMAT = "clarity-dr-model/1"
WEIGHTS_FILE = "weights.pt"
_VERSION = re.compile(r"^[0-9A-Za-z][0-9A-Za-z._-]{0,63}$")
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")


class ArchiveError(Exception):
    """A refusal with a message meant for the person running the command."""


def mar_path(model_store: Path, name: str, version: str) -> Path:
    return Path(model_store) / f"{name}_{version}.mar"


def load_checkpoint(path: Path) -> dict:
    """The checkpoint dict (docs/contracts.md §2), checked before anything is written."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ArchiveError(f"checkpoint not found: {path}") from None
    except Exception as exc:
        raise ArchiveError(f"{path} is not a readable checkpoint: {exc}") from None
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
        raise ArchiveError(f"{path} is not a {CHECKPOINT_FORMAT} checkpoint")
    missing = [k for k in ("arch", "state_dict", "preprocess", "quality", "grade_labels",
                           "referable_threshold", "dataset") if k not in ck]
    if missing:
        raise ArchiveError(f"{path} lacks {', '.join(missing)}")
    if ck["arch"] not in ARCHS:
        raise ArchiveError(f"{path}: unknown arch {ck['arch']!r}")
    if "synthetic" not in (ck["dataset"] or {}):
        raise ArchiveError(f"{path}: dataset.synthetic is not recorded; the card must say it")
    try:  # the handler will parse these: fail here rather than in a worker
        fundus.PreprocessConfig.from_dict(ck["preprocess"])
        quality.QualityThresholds.from_dict(ck["quality"])
    except (TypeError, ValueError) as exc:
        raise ArchiveError(f"{path}: {exc}") from None
    return ck


def float32_state_dict(ck: dict) -> tuple[dict, int]:
    """(float32 state dict, parameter count), after checking the weights fit the architecture."""
    model = DRNet(arch=ck["arch"], num_classes=len(ck["grade_labels"]))
    try:
        model.load_state_dict(ck["state_dict"])
    except RuntimeError as exc:
        raise ArchiveError(f"the checkpoint's weights do not fit {ck['arch']}: {exc}") from None
    state = {k: (v.float() if v.is_floating_point() else v).contiguous()
             for k, v in model.state_dict().items()}
    return state, sum(p.numel() for p in model.parameters())


def calibration_batches(folder: Path, ck: dict, limit: int = 64, batch: int = 8) -> list:
    """Preprocessed gradable crops of up to `limit` images in `folder`, in batches, for int8 ranges."""
    cfg = fundus.PreprocessConfig.from_dict(ck["preprocess"])
    thresholds = quality.QualityThresholds.from_dict(ck["quality"])
    tensors = []
    for path in sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png")):
        try:
            prepared = fundus.prepare(path.read_bytes(), cfg, thresholds)
        except fundus.ImageRejected:
            continue
        if prepared.tensor is not None:
            tensors.append(prepared.tensor)
        if len(tensors) >= limit:
            break
    if not tensors:
        raise ArchiveError(f"no gradable calibration images in {folder}")
    return [torch.stack(tensors[i:i + batch]) for i in range(0, len(tensors), batch)]


def write_engine(engine: str, state: dict, ck: dict, stage: Path, calibration_dir: Path | None) -> dict | None:
    """Export the network for `engine` into `stage`; the `engine` entry of model_meta.json."""
    if engine == "eager":
        return None
    model = DRNet(arch=ck["arch"], num_classes=len(ck["grade_labels"]))
    model.load_state_dict(state)
    size = int(ck["preprocess"]["input_size"])
    path = engines.export_onnx(model, size, stage / engines.ONNX_FILE)
    if engine == "onnx-int8":
        fp32 = path.rename(stage / "model.fp32.onnx")
        path = engines.quantize_int8(fp32, stage / engines.ONNX_FILE, calibration_batches(calibration_dir, ck))
        fp32.unlink()
    return {"name": engine, "file": path.name, "sha256": sha256_file(path), "opset": engines.OPSET}


def model_meta(ck: dict, name: str, version: str, weights_sha256: str) -> dict:
    """model_meta.json: everything the handler reads, nothing it would have to guess."""
    synthetic = bool(ck["dataset"]["synthetic"])
    return {
        "format": META_FORMAT,
        "name": name,
        "version": version,
        "arch": ck["arch"],
        "num_classes": len(ck["grade_labels"]),
        "weights_file": WEIGHTS_FILE,
        "weights_sha256": weights_sha256,
        "preprocess": fundus.PreprocessConfig.from_dict(ck["preprocess"]).to_dict(),
        "quality": quality.QualityThresholds.from_dict(ck["quality"]).to_dict(),
        "grade_labels": list(ck["grade_labels"]),
        "referable_threshold": int(ck["referable_threshold"]),
        "synthetic": synthetic,
        "disclaimer": SYNTHETIC_DISCLAIMER if synthetic else GENERAL_DISCLAIMER,
        "dataset": {k: ck["dataset"].get(k) for k in ("name", "format", "fingerprint", "synthetic", "counts")},
        # Held-out metrics and grade counts (scripts.ml.evaluate's summary): the card's numbers, read
        # back by the promotion gate and by the API's drift alerts (predicted grade shares).
        "held_out": (ck.get("metrics") or {}).get("test"),
        "code_revision": ck.get("code_revision", "unknown"),
        "trained_at": ck.get("created_at"),
        "archived_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def model_config_yaml(batch_size: int, max_batch_delay: int, workers: int | None, response_timeout: int,
                      torch_threads: int | None) -> str:
    # Without minWorkers/maxWorkers TorchServe starts default_workers_per_model, which is unset in
    # config.properties so that it means one worker per CPU core the frontend sees (cgroup-aware).
    lines = [f"minWorkers: {workers}", f"maxWorkers: {workers}"] if workers else []
    lines += [f"batchSize: {batch_size}", f"maxBatchDelay: {max_batch_delay}", f"responseTimeout: {response_timeout}"]
    if torch_threads:
        lines += ["handler:", f"  torch_threads: {torch_threads}"]
    return "\n".join(lines) + "\n"


def archive(checkpoint: Path, version: str, *, name: str = "dr", model_store: Path = REPO / "model_store",
            batch_size: int = 8, max_batch_delay: int = 5, workers: int | None = None,
            response_timeout: int = 60, torch_threads: int | None = 1, engine: str = "eager",
            calibration_dir: Path | None = None, require_held_out: bool = False) -> Path:
    """Write <model_store>/<name>_<version>.mar and its card <name>_<version>.md; return the .mar path."""
    if not _NAME.match(name):
        raise ArchiveError(f"invalid model name {name!r}: letters, digits, '_' and '-'")
    if not _VERSION.match(version):
        raise ArchiveError(f"invalid version {version!r}: letters, digits, '.', '_' and '-'")
    if min(batch_size, workers or 1, response_timeout) < 1 or max_batch_delay < 0:
        raise ArchiveError("batch size, workers and response timeout must be >= 1, batch delay >= 0")
    if engine not in engines.ENGINES:
        raise ArchiveError(f"unknown engine {engine!r}; choose one of {', '.join(engines.ENGINES)}")
    if engine == "onnx-int8" and calibration_dir is None:
        raise ArchiveError("--engine onnx-int8 needs --calibration-dir (training images)")
    model_store = Path(model_store)
    target = mar_path(model_store, name, version)
    card_path = target.with_suffix(".md")
    if target.exists():
        raise ArchiveError(f"{target} already exists: archived versions are immutable, choose a new --version")
    ck = load_checkpoint(Path(checkpoint))
    if require_held_out and not (ck.get("metrics") or {}).get("test"):
        raise ArchiveError(f"{checkpoint} has no held-out metrics: run `python -m scripts.ml.evaluate --checkpoint "
                           f"{checkpoint} --data DIR --out DIR` first (it stores them in the checkpoint), or pass "
                           "--without-held-out-metrics for a test archive")
    state, n_params = float32_state_dict(ck)

    model_store.mkdir(parents=True, exist_ok=True)
    # Staging inside the store keeps the final move a same-filesystem link.
    with tempfile.TemporaryDirectory(prefix=".staging-", dir=model_store) as tmp:
        stage = Path(tmp)
        weights = stage / WEIGHTS_FILE
        torch.save(state, weights)
        meta = model_meta(ck, name, version, sha256_file(weights))
        engine_meta = write_engine(engine, state, ck, stage, calibration_dir)
        if engine_meta:
            meta["engine"] = engine_meta
        (stage / "model_meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        card = archive_card(ck, meta, n_params)
        (stage / "MODEL_CARD.md").write_text(card)
        (stage / "model-config.yaml").write_text(
            model_config_yaml(batch_size, max_batch_delay, workers, response_timeout, torch_threads))
        siblings = sorted(p for p in HANDLERS.glob("*.py")
                          if p not in (HANDLER_FILE, MODEL_FILE) and p.name != "__init__.py")
        extra = [str(p) for p in siblings] + [str(stage / "model_meta.json"), str(stage / "MODEL_CARD.md")]
        extra += [str(stage / engine_meta["file"])] if engine_meta else []
        out = stage / "out"
        out.mkdir()
        cmd = [sys.executable, "-m", "model_archiver.model_packaging",
               "--model-name", name, "--version", version,
               "--model-file", str(MODEL_FILE), "--serialized-file", str(weights),
               "--handler", str(HANDLER_FILE), "--extra-files", ",".join(extra),
               "--config-file", str(stage / "model-config.yaml"), "--export-path", str(out)]
        # The archiver copies files into $TMPDIR/<model name>: a private TMPDIR keeps parallel runs apart.
        run = subprocess.run(cmd, env={**os.environ, "TMPDIR": str(stage)}, capture_output=True, text=True)
        if run.returncode != 0:
            raise ArchiveError(f"torch-model-archiver failed:\n{run.stdout}{run.stderr}")
        try:
            os.link(out / f"{name}.mar", target)  # fails instead of replacing a concurrent winner
        except FileExistsError:
            raise ArchiveError(f"{target} already exists: archived versions are immutable") from None
        shutil.copyfile(stage / "MODEL_CARD.md", card_path)
    return target


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.ml.archive", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, type=Path)
    p.add_argument("--version", required=True)
    p.add_argument("--name", default="dr")
    p.add_argument("--model-store", type=Path, default=Path("model_store"))
    p.add_argument("--batch-size", type=int, default=8)
    # Defaults from docs/benchmarks/findings.md: a 5 ms delay beat 50 ms at low concurrency (batches
    # still fill under load), and one single-threaded worker per core beat fewer, wider workers.
    p.add_argument("--max-batch-delay", type=int, default=5, help="milliseconds")
    p.add_argument("--workers", type=int, default=None,
                   help="workers per model (default: TorchServe's, one per CPU core)")
    p.add_argument("--response-timeout", type=int, default=60, help="seconds")
    p.add_argument("--torch-threads", type=int, default=1,
                   help="torch threads per worker (DR_TORCH_THREADS overrides it at run time)")
    p.add_argument("--engine", choices=engines.ENGINES, default="eager",
                   help="CPU inference engine (onnx: ONNX Runtime; Grad-CAM stays eager)")
    p.add_argument("--calibration-dir", type=Path, default=None,
                   help="training images whose crops calibrate --engine onnx-int8")
    p.add_argument("--without-held-out-metrics", action="store_true",
                   help="archive a checkpoint that scripts.ml.evaluate has not measured (test fixtures only: "
                        "the card says so and promote refuses the version)")
    args = p.parse_args(argv)
    try:
        path = archive(args.checkpoint, args.version, name=args.name, model_store=args.model_store,
                       batch_size=args.batch_size, max_batch_delay=args.max_batch_delay,
                       workers=args.workers, response_timeout=args.response_timeout,
                       torch_threads=args.torch_threads, engine=args.engine,
                       calibration_dir=args.calibration_dir, require_held_out=not args.without_held_out_metrics)
    except ArchiveError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
