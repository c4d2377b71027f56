"""Issue 14 item 1 again on a real-size network: the API end to end against TorchServe direct
when the model costs what a real DR network costs on a CPU (EfficientNet-B0 at 384 px, random
weights, served with ONNX Runtime as `archive --engine onnx` builds it).

On the demo network TorchServe spends 30-60 ms of CPU per photograph, so the API's own
15-20 ms (multipart, hashing, storage, database, HTTP to TorchServe) and SeaweedFS's are a
large share of two shared cores; a real network costs several times more per photograph,
the share a clinic will see once a real model is trained. Both are reported; neither
replaces the other. Same photographs, backends and pairing as bench/clinic.py, keep-alive.
"""
from __future__ import annotations

from pathlib import Path

from bench import systems

NETWORK = "efficientnet_b0 384 px, onnx (random weights)"


def measure(tmp: Path, mar: Path, photos, datas, args, sampler) -> list[dict]:
    """Paired rows (TorchServe direct, API) per backend and concurrency on the archive `mar`."""
    from bench.clinic import DEFAULTS, versus_torchserve

    rows = []
    with systems.torchserve(tmp / "ts-real-network", mar, DEFAULTS, sampler, label="torchserve effnet onnx") as ts:
        for backend in args.backends:
            with systems.api(tmp / f"api-real-network-{backend}", ts, backend, photos[:1], sampler,
                             workers=systems.API_DEFAULT_WORKERS, label=f"api {backend} effnet") as api:
                rows += [{**row, "network": NETWORK} for row in versus_torchserve(ts, api, backend, datas, args)]
    return rows


def section(rows: list[dict]) -> list[str]:
    from bench.clinic_report import TARGET_ADDED_P50_MS, TARGET_RATIO, api_table, cpu_table

    return [f"## API end to end against TorchServe direct on a real-size network ({NETWORK})", "",
            "Item 1's comparison again with the model a real DR network costs on these CPUs (the table above "
            "is the demo network, where the model is a small part of the cost). Random weights: the grades "
            f"mean nothing. Same rule: API / TorchServe >= {TARGET_RATIO} and added p50 <= "
            f"{TARGET_ADDED_P50_MS:g} ms.", "", *api_table(rows), "", *cpu_table(rows, f"CPU per request on {NETWORK}")]
