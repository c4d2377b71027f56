"""TorchServe on a CUDA GPU: eager PyTorch against the ONNX engine, batch 1, 8 and 32.

    python -m bench.gpu [--out var/bench/gpu.json] [--size 512] [--requests 400] [--workers 4]

Ready for a GPU machine; NOT RUN in this project so far (no GPU was lent to the task that wrote
it). For the ONNX rows the machine needs `onnxruntime-gpu` (same version as the pinned
onnxruntime) in place of `onnxruntime`; without its CUDA provider the handler falls back to
eager and the row says so (`engine_in_worker`).

The network is EfficientNet-B0 at `--size` px with random weights (speed does not depend on
them). One TorchServe with the GPU; each (engine, batch) archive is registered alone, loaded
closed-loop at concurrency 2 x batch with the real 9-11 MP sample JPEGs, then unregistered, so
every row runs on the same server, inputs and GPU. Decoding a 10 MP JPEG stays on the CPU in the
worker, so `--workers` (CPU processes sharing the GPU) bounds throughput as much as the GPU does.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import requests
import torch

from scripts.ml import archive
from bench.driver import run_load
from bench.systems import WARM_UP_REQUESTS
from scripts.serving.processes import REPO, TorchServe

BATCHES = (1, 8, 32)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("var/bench/gpu.json"))
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--requests", type=int, default=400)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--engines", nargs="*", default=["eager", "onnx"])
    p.add_argument("--cpu-smoke", action="store_true", help="run on the CPU to check the script itself")
    args = p.parse_args(argv)
    if not torch.cuda.is_available() and not args.cpu_smoke:
        raise SystemExit("no CUDA device: this benchmark is for a GPU machine")
    from scripts.ml.tiny_model import make_checkpoint

    photos = [path.read_bytes() for path in sorted((REPO / "samples").glob("idrid_*.jpg"))]
    rows = []
    with tempfile.TemporaryDirectory(prefix="clarity-gpu-") as tmp:
        tmp = Path(tmp)
        ck = make_checkpoint(tmp / "effnet.pt", arch="efficientnet_b0", input_size=args.size)
        store = tmp / "store"
        for engine in args.engines:
            for batch in BATCHES:
                archive.archive(ck, f"{engine}-b{batch}", model_store=store, batch_size=batch,
                                max_batch_delay=5, workers=args.workers, engine=engine)
        server = TorchServe(tmp / "ts", store, env={"DR_TORCH_THREADS": "1"})
        server.start(timeout=120)
        try:
            for engine in args.engines:
                for batch in BATCHES:
                    # The first cell also warms TorchServe's Java frontend (bench/systems.py, warm_up).
                    warmup = max(4 * batch, WARM_UP_REQUESTS if not rows else 0)
                    rows.append(cell(server, engine, batch, photos, args, warmup))
                    print(json.dumps(rows[-1]), flush=True)
        finally:
            server.stop()
    eager = {r["batch"]: r["throughput_rps"] for r in rows if r["engine"] == "eager"}
    for r in rows:
        r["throughput_vs_eager"] = round(r["throughput_rps"] / eager[r["batch"]], 2) if eager.get(r["batch"]) else None
    result = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (smoke run)", "cpus": os.cpu_count(), "input_px": args.size,
              "workers": args.workers, "photos": len(photos), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(args.out)
    return 0


def cell(server: TorchServe, engine: str, batch: int, photos: list[bytes], args, warmup: int) -> dict:
    version = f"{engine}-b{batch}"
    mgmt = server.management_url
    r = requests.post(f"{mgmt}/models", params={"url": f"dr_{version}.mar", "initial_workers": args.workers,
                                               "synchronous": "true"}, timeout=600, headers=server.auth("management"))
    r.raise_for_status()
    try:
        server.wait_model_ready("dr", version, timeout=600)
        url = f"{server.inference_url}/predictions/dr/{version}"
        auth = server.auth()
        seen = {}

        def send(session, i):
            response = session.post(url, data=photos[i], headers={"Content-Type": "image/jpeg", **auth}, timeout=120)
            if response.status_code == 200:
                seen["inference_ms"] = (response.json().get("timings_ms") or {}).get("inference")
            return response

        result = run_load(send, len(photos), concurrency=2 * batch, requests_total=args.requests,
                          warmup=warmup, desc=version)
        log = "\n".join(p.read_text(errors="replace") for p in server.log_dir.glob("model_log*.log"))
        in_worker = "onnx" if f"engine {engine}" in log and engine != "eager" else "eager"
        return {"engine": engine, "engine_in_worker": in_worker, "batch": batch, **result.to_dict(),
                "last_batch_inference_ms": seen.get("inference_ms"), "at": time.strftime("%H:%M:%S")}
    finally:
        requests.delete(f"{mgmt}/models/dr/{version}", timeout=120, headers=server.auth("management"))


if __name__ == "__main__":
    raise SystemExit(main())
