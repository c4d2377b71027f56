"""Reproduce the bundled demo model from synthetic images (`make demo-model`).

    python -m scripts.ml.demo_model [--out models/demo] [--work var/demo]

Generates a seeded synthetic training set and a separate held-out synthetic test set, trains a
small network on 2 CPU cores, evaluates it on the test set and writes models/demo/: checkpoint.pt
(float16 weights), MODEL_CARD.md, evaluation.json and the plots. The model has never seen a real
photograph of an eye: it exists to exercise the serving stack, and is NOT for clinical use.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see scripts/ml/train.py

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from scripts.ml import evaluate, synth, train  # noqa: E402
from handlers.checksum import sha256_file  # noqa: E402
from scripts.ml.card import demo_card  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
# The recipe. Changing it changes the committed model: rerun this script and commit its output.
RECIPE = {
    "train_images": 1200, "test_images": 400, "image_size": 384, "seed": 0, "test_seed": 1,
    "arch": "mobilenet_v3_small", "input_size": 160, "epochs": 16, "batch_size": 32, "lr": 3e-3,
    "val_fraction": 0.15,
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "models" / "demo", help="where the model and its card go")
    ap.add_argument("--work", type=Path, default=REPO / "var" / "demo", help="scratch folder (images, train state)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    r = RECIPE
    work, out = args.work, args.out
    load_start = os.getloadavg()[0]
    seconds = {}
    t0 = time.perf_counter()
    for part in ("train", "test"):  # stale images of another recipe must not leak in
        shutil.rmtree(work / part, ignore_errors=True)
    synth.generate(work / "train", r["train_images"], r["seed"], r["image_size"], workers=args.workers,
                   progress=not args.quiet)
    synth.generate(work / "test", r["test_images"], r["test_seed"], r["image_size"], workers=args.workers,
                   progress=not args.quiet)
    seconds["generate"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    ck_path = work / "checkpoint.pt"
    for stale in (ck_path, train.train_state_path(ck_path)):
        stale.unlink(missing_ok=True)
    train.train(train.build_parser().parse_args([
        "--data", str(work / "train"), "--out", str(ck_path), "--name", "clarity-synthetic-demo",
        "--arch", r["arch"], "--input-size", str(r["input_size"]), "--epochs", str(r["epochs"]),
        "--batch-size", str(r["batch_size"]), "--lr", str(r["lr"]), "--val-fraction", str(r["val_fraction"]),
        "--test-fraction", "0", "--seed", str(r["seed"]), "--threads", str(args.threads),
        "--workers", str(args.workers), "--half-weights", *(["--quiet"] if args.quiet else [])]))
    seconds["train"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    result = evaluate.evaluate(ck_path, work / "test", out, threads=args.threads, workers=args.workers,
                               progress=not args.quiet, val_data=(work / "train", None))
    evaluate.record_in_checkpoint(ck_path, result)
    seconds["evaluate"] = time.perf_counter() - t2
    seconds["total"] = time.perf_counter() - t0
    # CPU time actually received, with the preprocessing and generator processes: on a shared
    # machine wall time alone overstates what the recipe costs.
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    seconds["cpu"] = sum(u.ru_utime + u.ru_stime for u in usage)

    shutil.copyfile(ck_path, out / "checkpoint.pt")
    ck = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    # record_in_checkpoint added metrics.test after evaluate hashed the file; the weights are the same
    result["checkpoint"].update(file="checkpoint.pt", sha256=sha256_file(out / "checkpoint.pt"))
    (out / "evaluation.json").write_text(json.dumps(result, indent=2) + "\n")
    run = {"recipe": r, "seconds": seconds, "checkpoint_bytes": (out / "checkpoint.pt").stat().st_size,
           "machine": f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), "
                      f"torch {torch.__version__.split('+')[0]} with {args.threads} threads",
           "load_average": [load_start, os.getloadavg()[0]]}
    (out / "MODEL_CARD.md").write_text(demo_card(ck, result, run))
    print(json.dumps({"seconds": {k: round(v, 1) for k, v in seconds.items()},
                      "checkpoint_bytes": run["checkpoint_bytes"],
                      "quadratic_kappa": result["metrics"]["quadratic_kappa"]}, indent=2))
    print(f"wrote {out}/checkpoint.pt, MODEL_CARD.md, evaluation.json and plots")


if __name__ == "__main__":
    main()
