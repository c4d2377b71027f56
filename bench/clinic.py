"""The clinic's case, like with like in one run: 9-12 MP fundus JPEGs, the same inputs and
concurrency for every system, the cells of a comparison interleaved round by round.

    python -m bench.clinic [--out var/bench/clinic] [--requests 40] [--rounds 2] [--smoke]

`make bench` runs this as a section of bench/run.py, into docs/benchmarks/README.md and
report.json; alone it writes clinic.md and clinic.json to --out. The tables and item 1's
targets are drawn by bench/clinic_report.py.

- api vs torchserve: the API end to end against TorchServe direct, concurrency 1 and 8, on a
  kept-alive connection and on a fresh connection per request, on SQLite + local storage and on
  PostgreSQL + SeaweedFS S3. Every upload's bytes are unique (a trailer after the JPEG end
  marker) so the result cache never answers; the ratio is taken per round, the median reported.
- before/after: the API as it is against bench/sequential_app.py (the upload path before issue
  14's changes), same backend and inputs, interleaved.
- re-send: the same bytes again (the result cache) against new bytes, through the API.
- naive: what a clinic's developer writes first: Flask with the model in-process, the whole JPEG
  decoded and resized (no disc crop, no quality gate), one sync gunicorn worker per core.
- limit: the best in-process configuration (bench/limit.py): one process per core, one thread
  each, decode + preprocessing + forward pass of the same photographs, eager and ONNX Runtime,
  batch 1 and 8, no HTTP.
- engines: TorchServe direct with the eager archive against the ONNX archive of the same
  weights, on the demo network and on EfficientNet-B0 at 384 px (random weights).
- real network: api vs torchserve again with that EfficientNet-B0 ONNX archive behind both
  (bench/real_network.py), keep-alive, every backend and concurrency.
- split cores: api vs torchserve again with TorchServe on half the CPUs and the API's side on the
  other half (bench/split_cores.py), keep-alive, every backend and concurrency.
The demo model is trained on synthetic images: these runs measure the machinery, not accuracy.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import itertools
import json
import os
import statistics
import tempfile
from pathlib import Path

import requests

from bench import inputs as bench_inputs
from bench import real_network, split_cores, systems
from bench.clinic_report import markdown
from bench.driver import MemorySampler, cpu_delta, multipart, run_load
from bench.inputs import ServeConfig
from scripts.serving.processes import REPO

# What scripts/ml/archive.py builds by default: batch 8, 5 ms delay, workers not pinned (TorchServe
# starts one per CPU core) and one torch thread each. The API cells run on it.
DEFAULTS = ServeConfig(batch_size=8, max_batch_delay_ms=5, workers=None, torch_threads=1)
TIMEOUT = (5, 120)
_trailer = itertools.count()


def clinic_photos(cache: Path = bench_inputs.CACHE) -> list[bench_inputs.BenchInput]:
    return [i for i in bench_inputs.inputs(cache) if i.kind == "photograph" and i.format == "JPEG" and i.megapixels >= 9]


def _unique(data: bytes) -> bytes:
    return data + f"clarity-clinic-{next(_trailer):09d}-{os.getpid()}".encode()


def predict_sender(url: str, datas: list[bytes], fresh: bool, same: bool = False, auth: dict | None = None):
    def send(session, i):
        body = datas[i % len(datas)] if same else _unique(datas[i % len(datas)])
        headers = {"Content-Type": "image/jpeg", **(auth or {})}
        if fresh:
            return requests.post(f"{url}/predictions/dr", data=body, headers={**headers, "Connection": "close"},
                                 timeout=TIMEOUT)
        return session.post(f"{url}/predictions/dr", data=body, headers=headers, timeout=TIMEOUT)
    return send


def upload_sender(handle, datas: list[bytes], fresh: bool, same: bool = False):
    url = f"{handle.url}/api/v1/patients/{handle.info['patient_id']}/screenings"
    auth = {"Authorization": f"Bearer {handle.info['token']}"}

    def send(session, i):
        data = datas[i % len(datas)] if same else _unique(datas[i % len(datas)])
        body, content_type = multipart({"eye": "left", "image": ("eye.jpg", data, "image/jpeg")})
        headers = {**auth, "Content-Type": content_type}
        if fresh:
            return requests.post(url, data=body, headers={**headers, "Connection": "close"}, timeout=TIMEOUT)
        return session.post(url, data=body, headers=headers, timeout=TIMEOUT)
    return send


def cell(label: str, send, concurrency: int, n: int, ok=(200,), sampler: MemorySampler | None = None) -> dict:
    """One measured cell; with a sampler, the CPU ms per answered request of each process group
    (bench/driver.py: MemorySampler.cpu_seconds), from the end of the warm-up to the last answer."""
    cpu = {}
    start = (lambda: cpu.update(before=sampler.cpu_seconds())) if sampler else None
    r = run_load(send, 10**9, concurrency, n, ok_status=ok, warmup=concurrency, desc=label, after_warmup=start)
    row = {"label": label, **r.to_dict(), "load_average_1m": round(os.getloadavg()[0], 2)}
    if sampler:
        row["cpu_ms_per_request"] = cpu_delta(cpu["before"], sampler.cpu_seconds(), r.ok)
    return row


def versus_torchserve(ts, api, backend: str, datas, args, fresh_connections=(False,)) -> list[dict]:
    """The API against TorchServe direct, paired, at each concurrency and connection kind
    (False: keep-alive, True: a fresh connection per request)."""
    rows = []
    for c in args.concurrency:
        for fresh in fresh_connections:
            conn = "fresh connection" if fresh else "keep-alive"
            row = paired(f"torchserve direct, {conn}", predict_sender(ts.inference_url, datas, fresh, auth=ts.auth()),
                         f"api {backend}, {conn}", upload_sender(api, datas, fresh), c, args)
            row.update(backend=backend, connection=conn)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "rounds"}), flush=True)
    return rows


def paired(a_label, a_send, b_label, b_send, concurrency, args, ok_b=(201,), ok_a=None) -> dict:
    """A and B interleaved round by round; B's throughput over A's per round, median and range."""
    ok_a = ok_a or ((201,) if "api" in a_label else (200,))
    rounds = []
    for _ in range(args.rounds):
        sampler = getattr(args, "sampler", None)
        rounds.append((cell(a_label, a_send, concurrency, args.requests, ok=ok_a, sampler=sampler),
                       cell(b_label, b_send, concurrency, args.requests, ok=ok_b, sampler=sampler)))
    dead = [c for pair in rounds for c in pair if not c["ok"]]
    if dead:  # a system that answers nothing is broken, not slow: stop here, saying how
        raise RuntimeError(f"{dead[0]['label']}: no request answered {ok_a if dead[0]['label'] == a_label else ok_b}"
                           f" (got {dead[0]['errors']})")
    return {"a": a_label, "b": b_label, "concurrency": concurrency, "rounds": [[a, b] for a, b in rounds],
            **compare(rounds)}


def compare(rounds) -> dict:
    """B against A over (a_cell, b_cell) rounds: B's throughput over A's per round (median and
    range) and B's p50 minus A's (median)."""
    ratios = [b["throughput_rps"] / a["throughput_rps"] for a, b in rounds if a["throughput_rps"]]
    added = [b["p50_ms"] - a["p50_ms"] for a, b in rounds if "p50_ms" in a and "p50_ms" in b]
    return {"throughput_ratio_b_over_a": round(statistics.median(ratios), 3) if ratios else None,
            "ratio_range": [round(min(ratios), 3), round(max(ratios), 3)] if ratios else None,
            "added_p50_ms": round(statistics.median(added), 1) if added else None}


# ------------------------------------------------------------------------------- main

def measure(args) -> dict:
    """Every cell of the clinic's case, as a dict; `args` comes from options(). bench/run.py
    calls this as its clinic section, main() alone."""
    from bench.limit import limit

    photos = clinic_photos(args.cache)
    datas = [ph.data() for ph in photos]
    ck_path, ck_info = bench_inputs.checkpoint(args.cache)
    ck_sha = ck_info["sha256"]
    report = {"started_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "machine": {"cpus": os.cpu_count(), "load_average_at_start": [round(x, 2) for x in os.getloadavg()]},
              "inputs": [ph.to_dict() for ph in photos], "model": ck_info,
              "plan": {"requests_per_cell": args.requests, "rounds": args.rounds,
                       "concurrency": list(args.concurrency), "backends": list(args.backends),
                       "torchserve": DEFAULTS.to_dict(), "limit_seconds": args.limit_seconds},
              "api_vs_torchserve": [], "api_vs_torchserve_split_cores": [], "before_after": [], "resend": [], "naive": [], "engines": []}
    sampler = args.sampler
    with tempfile.TemporaryDirectory(prefix="clarity-clinic-") as tmp:
        tmp = Path(tmp)
        mar = bench_inputs.archive_for(ck_path, ck_sha, DEFAULTS, args.cache)
        with systems.torchserve(tmp / "ts", mar, DEFAULTS, sampler) as ts:
            for backend in args.backends:
                # The API's own defaults (control_api/settings.py): its worker count, 4 threads
                # each, at most threads - 1 predictions in flight per worker.
                workers = systems.API_DEFAULT_WORKERS
                with systems.api(tmp / f"api-{backend}", ts, backend, photos[:1], sampler, workers=workers) as api:
                    report["api_vs_torchserve"] += versus_torchserve(ts, api, backend, datas, args, (False, True))
                    report["api_vs_torchserve_split_cores"] += split_cores.measure(ts, api, backend, datas, args)
                    # Before/after issue 14's upload changes, same backend, same run.
                    with systems.api(tmp / f"before-{backend}", ts, backend, photos[:1], sampler, workers=workers,
                                     app="bench.sequential_app:app", label=f"api {backend} before") as before:
                        for c in args.concurrency:
                            row = paired(f"api {backend} before (bench/sequential_app.py)", upload_sender(before, datas, False),
                                         f"api {backend}", upload_sender(api, datas, False), c, args, ok_b=(201,))
                            row.update(backend=backend)
                            report["before_after"].append(row)
                            print(json.dumps({k: v for k, v in row.items() if k != "rounds"}), flush=True)
                    if backend == "embedded":
                        for c in args.concurrency:
                            row = paired("api new bytes", upload_sender(api, datas, False),
                                         "api same bytes (result cache)", upload_sender(api, datas[:1], False, same=True),
                                         c, args, ok_b=(201,))
                            report["resend"].append(row)
            # The naive server on the same photographs, beside TorchServe direct (same run).
            with contextlib.ExitStack() as stack:
                naive = systems.NaiveServer(tmp / "naive", ck_path, torch_threads=1,
                                            workers=os.cpu_count() or 1, preprocess="resize")
                naive.start(timeout=120)
                stack.callback(naive.stop)
                sampler.track("naive", naive.proc.pid)
                stack.callback(sampler.untrack, "naive")
                for c in args.concurrency:
                    row = paired("torchserve direct, keep-alive",
                                 predict_sender(ts.inference_url, datas, False, auth=ts.auth()),
                                 f"naive (full decode + resize, {naive.workers} sync workers)",
                                 predict_sender(naive.url, datas, False), c, args, ok_b=(200,))
                    report["naive"].append(row)
                    print(json.dumps({k: v for k, v in row.items() if k != "rounds"}), flush=True)
        archives = {}
        report["engines"] = engines(tmp, ck_path, ck_sha, datas, args, sampler, archives)
        report["api_vs_torchserve_real_network"] = real_network.measure(
            tmp, archives["efficientnet_b0 onnx"], photos, datas, args, sampler)
    report["limit"] = limit(ck_path, photos, args.limit_seconds)
    report["finished_at"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    report["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return report


def options(requests: int = 40, rounds: int = 2, concurrency=(1, 8), backends=("embedded", "postgres-s3"),
            limit_seconds: float = 15, sampler: MemorySampler | None = None,
            cache: Path = bench_inputs.CACHE) -> argparse.Namespace:
    """What measure() reads (paired() reads requests, rounds and sampler)."""
    return argparse.Namespace(requests=requests, rounds=rounds, concurrency=list(concurrency),
                              backends=list(backends), limit_seconds=limit_seconds,
                              sampler=sampler or MemorySampler(), cache=cache)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.clinic", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "var" / "bench" / "clinic")
    p.add_argument("--requests", type=int, default=40, help="measured requests per cell")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--concurrency", type=int, nargs="*", default=[1, 8])
    p.add_argument("--backends", nargs="*", default=["embedded", "postgres-s3"])
    p.add_argument("--smoke", action="store_true", help="one round, 8 requests, c=1 and 8, embedded only")
    a = p.parse_args(argv)
    args = options(8, 1, a.concurrency, ["embedded"], 5) if a.smoke else \
        options(a.requests, a.rounds, a.concurrency, a.backends)
    report = measure(args)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "clinic.json").write_text(json.dumps(report, indent=2) + "\n")
    (a.out / "clinic.md").write_text(markdown(report))
    print(a.out / "clinic.md")
    return 0


def engines(tmp: Path, ck_path: Path, ck_sha: str, datas, args, sampler, archives: dict | None = None) -> list[dict]:
    """TorchServe direct, eager archive against the ONNX archive, demo network and EfficientNet-B0;
    `archives` gets each archive built, by "<network> <engine>" (bench/real_network.py reuses one)."""
    from scripts.ml import archive
    from scripts.ml.tiny_model import make_checkpoint

    rows = []
    effnet = make_checkpoint(tmp / "effnet384.pt", arch="efficientnet_b0", input_size=384)
    for name, ck in (("demo", ck_path), ("efficientnet_b0 384 px (random weights)", effnet)):
        store = tmp / f"store-{len(rows)}"
        sends = {}
        servers = contextlib.ExitStack()
        with servers:
            for engine in ("eager", "onnx"):
                mar = archive.archive(ck, engine, model_store=store / engine, engine=engine, batch_size=8,
                                      max_batch_delay=5, torch_threads=1)
                if archives is not None:
                    archives[f"{name.split()[0]} {engine}"] = mar
                server = servers.enter_context(systems.torchserve(
                    tmp / f"ts-{len(rows)}-{engine}", mar, DEFAULTS, sampler, label=f"torchserve {name.split()[0]} {engine}"))
                sends[engine] = predict_sender(server.inference_url, datas, False, auth=server.auth())
            c = max(args.concurrency)
            row = paired(f"{name}: eager", sends["eager"], f"{name}: onnx", sends["onnx"], c, args, ok_b=(200,))
            row["network"] = name
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "rounds"}), flush=True)
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
