"""Inference engines side by side: eager PyTorch, ONNX Runtime fp32 and static int8.

    python -m bench.engine [--out var/bench/engine.json] [--rounds 3] [--heldout 400]

Speed: the demo network (models/demo/checkpoint.pt) and EfficientNet-B0 at 384 and 512 px
(random weights: speed does not depend on them), batch 1 and 8, one thread, the engines
interleaved round by round so that a busy machine slows all of them alike; the ratio is taken
per round and the median reported. Agreement (demo network, trained weights): grades on every
photograph in samples/, the largest probability difference on `--heldout` synthetic images
from a seed training never used, and for int8 the QWK and referable agreement with fp32.
int8 is calibrated on crops of training images (the training seed).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.limit import load_model
from handlers import engine as engines
from handlers import fundus
from handlers.network import DRNet
from scripts.ml import synth
from scripts.ml.train import qwk

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "models" / "demo" / "checkpoint.pt"
HELDOUT_SEED = 9001  # training used seed 0
CALIBRATION = 64
REAL_SIZE_NETWORK = "efficientnet_b0 (random weights)"  # the speed rows item 2's target is judged on


def synthetic_tensors(seed: int, n: int, cfg, thresholds) -> list[torch.Tensor]:
    """Gradable crops of n synthetic photographs, JPEG-encoded and prepared as served."""
    out = []
    for i, grade in enumerate(synth.grade_plan(n, seed)):
        img, _ = synth.render(synth.image_seed(seed, i), grade, 512)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=92)
        prepared = fundus.prepare(buf.getvalue(), cfg, thresholds)
        if prepared.tensor is not None:
            out.append(prepared.tensor)
    return out


def engines_for(model, size: int, tmp: Path, calibration: list[torch.Tensor]) -> dict:
    fp32 = engines.export_onnx(model, size, tmp / f"{size}.onnx")
    int8 = engines.quantize_int8(fp32, tmp / f"{size}.int8.onnx", calibration)
    return {"eager": engines.Eager(model), "onnx": engines.OnnxRuntime(fp32, 1),
            "onnx-int8": engines.OnnxRuntime(int8, 1, "onnx-int8")}


def time_per_image(fn, batch: torch.Tensor, calls: int) -> float:
    fn(batch)  # warm
    start = time.perf_counter()
    for _ in range(calls):
        fn(batch)
    return (time.perf_counter() - start) / calls / len(batch)


def speed(name: str, model, size: int, calibration, tmp: Path, rounds: int) -> list[dict]:
    runs = engines_for(model, size, tmp, calibration)
    rows = []
    for batch_size in (1, 8):
        x = torch.randn(batch_size, 3, size, size)
        calls = max(2, int(8 / batch_size * (160 / size) ** 2 * 4))
        seconds = {k: [] for k in runs}
        for _ in range(rounds):
            for key, fn in runs.items():
                seconds[key].append(time_per_image(fn, x, calls))
        for key in runs:
            ratios = [e / s for e, s in zip(seconds["eager"], seconds[key])]
            rows.append({"network": name, "input_px": size, "batch": batch_size, "engine": key,
                         "ms_per_image": round(statistics.median(seconds[key]) * 1000, 2),
                         "images_per_s": round(1 / statistics.median(seconds[key]), 2),
                         "speedup_vs_eager": round(statistics.median(ratios), 2),
                         "speedup_range": [round(min(ratios), 2), round(max(ratios), 2)]})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def probabilities(fn, tensors: list[torch.Tensor]) -> np.ndarray:
    return np.concatenate([torch.softmax(fn(torch.stack(tensors[i:i + 8])).float(), 1).numpy()
                           for i in range(0, len(tensors), 8)])


def agreement(model, runs: dict, cfg, thresholds, heldout: list[torch.Tensor]) -> dict:
    samples = {}
    for path in sorted((REPO / "samples").glob("*.jpg")):
        prepared = fundus.prepare(path.read_bytes(), cfg, thresholds)
        if prepared.tensor is None:
            continue
        x = prepared.tensor[None]
        samples[path.name] = {k: int(fn(x).argmax(1)[0]) for k, fn in runs.items()}
    p = {k: probabilities(fn, heldout) for k, fn in runs.items()}
    g = {k: v.argmax(1) for k, v in p.items()}
    out = {"samples": samples, "heldout_images": len(heldout)}
    for key in ("onnx", "onnx-int8"):
        out[key] = {
            "sample_grades_identical": all(s["eager"] == s[key] for s in samples.values()),
            "max_probability_difference": float(np.abs(p[key] - p["eager"]).max()),
            "grade_agreement": float((g[key] == g["eager"]).mean()),
            "quadratic_kappa_vs_eager": float(qwk(g["eager"], g[key])),
            "referable_agreement": float(((g[key] >= 2) == (g["eager"] >= 2)).mean()),
        }
    return out


def measure(checkpoint: Path = DEMO, rounds: int = 3, heldout: int = 400, sizes=(384, 512)) -> dict:
    """Speed rows and the demo network's agreement, as engine.json holds them (bench/run.py's
    engine section, or main() alone). `checkpoint` is the demo network with trained weights."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    demo, cfg, thresholds = load_model(checkpoint, threads=1)
    load = [os.getloadavg()]
    calibration_crops = synthetic_tensors(0, CALIBRATION, cfg, thresholds)
    calibration = [torch.stack(calibration_crops[i:i + 8]) for i in range(0, len(calibration_crops), 8)]
    result = {"conditions": {"cpus": os.cpu_count(), "threads_per_engine": 1, "rounds": rounds,
                             "torch": torch.__version__, "onnxruntime": __import__("onnxruntime").__version__}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rows = speed(f"demo {demo.arch}", demo, cfg.input_size, calibration, tmp, rounds)
        load.append(os.getloadavg())
        held = synthetic_tensors(HELDOUT_SEED, heldout, cfg, thresholds)
        runs = engines_for(demo, cfg.input_size, tmp, calibration)
        result["agreement_demo"] = agreement(demo, runs, cfg, thresholds, held)
        print(json.dumps(result["agreement_demo"]), flush=True)
        for size in sizes:
            net = DRNet(arch="efficientnet_b0").eval()
            # Calibration for a random-weight network: crops at its size (ranges only, speed row).
            cal = [torch.nn.functional.interpolate(b, size=size, mode="bilinear") for b in calibration[:2]]
            rows += speed(REAL_SIZE_NETWORK, net, size, cal, tmp, rounds)
            load.append(os.getloadavg())
    torch.set_num_threads(threads)
    result["speed"] = rows
    result["conditions"]["load_average_1_5_15"] = [[round(x, 2) for x in row] for row in load]
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.engine", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("var/bench/engine.json"))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--heldout", type=int, default=400)
    p.add_argument("--sizes", type=int, nargs="*", default=[384, 512])
    args = p.parse_args(argv)
    result = measure(DEMO, args.rounds, args.heldout, args.sizes)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
