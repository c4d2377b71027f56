"""Does shadow grading slow uploads? Upload latency with shadow off and on, side by side.

    python -m bench.shadow [--rounds 4] [--uploads 30] [--concurrency 2] [--out docs/benchmarks]

One stack (PostgreSQL, SeaweedFS, TorchServe, the API under gunicorn), two registered versions
of the same model (1.0 the default, 1.1 the candidate, one worker each). Rounds alternate the
order (off/on, on/off, ...) so drift on a shared machine falls on both arms. Each arm uploads
`--uploads` distinct photographs at `--concurrency`; after an "on" arm the shadow queue is
drained before the next arm starts, so an "off" arm never carries shadow work left over.
Writes OUT/shadow_c<concurrency>[_pace<s>s].{json,md}.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from bench.driver import stats
from bench.loadtest import LoadStack, model_store, photographs, unique

SETTING_CACHE_S = 6  # control_api.shadow.SETTING_CACHE_SECONDS (5 s) plus a margin


def shadow_counts(stack) -> dict[str, float]:
    text = requests.get(f"{stack.url}/metrics", timeout=10).text
    counts: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("clarity_shadow_gradings_total{"):
            outcome = line.split('outcome="', 1)[1].split('"', 1)[0]
            counts[outcome] = counts.get(outcome, 0) + float(line.rsplit(" ", 1)[1])
    return counts


def arm(stack, headers, patient_id, photos, start: int, n: int, concurrency: int, pace: float = 0) -> list[float]:
    def one(i: int) -> float:
        data = unique(photos[i % len(photos)], i)
        t = time.perf_counter()
        r = requests.post(f"{stack.url}/api/v1/patients/{patient_id}/screenings", headers=headers,
                          files={"image": (f"eye{i}.jpg", data, "image/jpeg")}, data={"eye": "left"}, timeout=180)
        elapsed = time.perf_counter() - t
        if r.status_code != 201:
            raise RuntimeError(f"upload {i}: {r.status_code} {r.text[:200]}")
        return elapsed

    with ThreadPoolExecutor(concurrency) as pool:
        if not pace:
            return list(pool.map(one, range(start, start + n)))
        # Open loop: one upload every `pace` seconds, whatever the answers take (clinic traffic).
        t0 = time.perf_counter()
        futures = []
        for k, i in enumerate(range(start, start + n)):
            time.sleep(max(0.0, t0 + k * pace - time.perf_counter()))
            futures.append(pool.submit(one, i))
        return [f.result() for f in futures]


def run(args) -> dict:
    from scripts.ml import archive
    from scripts.serving.stack import DEMO_CHECKPOINT

    with tempfile.TemporaryDirectory(prefix="clarity-shadow-bench-") as tmp:
        workdir = Path(tmp)
        store, which = model_store(workdir, args.model)
        checkpoint = workdir / "tiny.pt" if (workdir / "tiny.pt").exists() else DEMO_CHECKPOINT
        archive.archive(checkpoint, "1.1", model_store=store)
        with LoadStack(workdir, store, workers=args.api_workers) as stack:
            management = stack.torchserve.management(timeout=300)
            management.call("POST", "/models", url="dr_1.1.mar", initial_workers=1, synchronous="true")
            management.call("PUT", "/models/dr/1.0", min_worker=1, max_worker=1, synchronous="true")
            admin, clinician = stack.key("admin"), stack.key("clinician")
            patient = requests.post(f"{stack.url}/api/v1/patients", headers=clinician,
                                    json={"name": "Shadow Benchmark"}, timeout=30).json()["id"]
            photos = photographs()
            arm(stack, clinician, patient, photos, 10 ** 6, 6, args.concurrency)  # warm-up, not counted
            latencies: dict[str, list[float]] = {"off": [], "on": []}
            rounds = []
            i = 0
            for r_ in range(args.rounds):
                order = ("off", "on") if r_ % 2 == 0 else ("on", "off")
                for mode in order:
                    if mode == "on":
                        requests.put(f"{stack.url}/api/v1/models/shadow", headers=admin,
                                     json={"version": "1.1"}, timeout=30).raise_for_status()
                    else:
                        requests.delete(f"{stack.url}/api/v1/models/shadow", headers=admin, timeout=30)
                    time.sleep(SETTING_CACHE_S)
                    before = shadow_counts(stack)
                    t = time.perf_counter()
                    got = arm(stack, clinician, patient, photos, i, args.uploads, args.concurrency, args.pace)
                    wall = time.perf_counter() - t
                    i += args.uploads
                    deadline = time.monotonic() + 300
                    while mode == "on" and time.monotonic() < deadline:  # drain before the next arm
                        done = sum(shadow_counts(stack).values()) - sum(before.values())
                        if done >= args.uploads:
                            break
                        time.sleep(0.5)
                    after = shadow_counts(stack)
                    latencies[mode] += got
                    rounds.append({"round": r_, "mode": mode, "median_ms": round(statistics.median(got) * 1000, 1),
                                   "wall_s": round(wall, 2),
                                   "shadow": {k: after.get(k, 0) - before.get(k, 0) for k in after}})
            shadow_rows = stack.database.sql("SELECT count(*) FROM shadow_grading")[0][0]
    off = {"n": len(latencies["off"]), **stats(latencies["off"])}
    on = {"n": len(latencies["on"]), **stats(latencies["on"])}
    return {"what": "upload latency (POST .../screenings, 201) with shadow grading off and on",
            "model": which, "rounds": args.rounds, "uploads_per_arm": args.uploads,
            "concurrency": args.concurrency, "api_workers": args.api_workers, "pace_s": args.pace,
            "machine": {"cpus": __import__("os").cpu_count(), "python": platform.python_version()},
            "off": off, "on": on,
            "ratio_on_over_off": {k: round(on[k] / off[k], 3) for k in off if isinstance(off.get(k), (int, float))
                                  and off[k] and k != "n"},
            "per_arm": rounds, "shadow_gradings_stored": shadow_rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.shadow", description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--uploads", type=int, default=30, help="uploads per arm")
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--api-workers", type=int, default=2)
    ap.add_argument("--pace", type=float, default=0,
                    help="seconds between upload starts (open loop); 0: back to back at --concurrency")
    ap.add_argument("--model", choices=("auto", "demo", "tiny"), default="auto")
    ap.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    args = ap.parse_args(argv)
    result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    tag = f"shadow_c{args.concurrency}" + (f"_pace{args.pace:g}s" if args.pace else "")
    (args.out / f"{tag}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"{tag}.md").write_text(markdown(result))
    print(markdown(result))
    return 0


def markdown(r: dict) -> str:
    keys = [k for k in ("p50_ms", "p95_ms", "p99_ms", "mean_ms", "max_ms") if k in r["off"]]
    lines = ["# Shadow grading: upload latency, shadow off vs on", "",
             f"Measured by `python -m bench.shadow --rounds {r['rounds']} --uploads {r['uploads_per_arm']} "
             f"--concurrency {r['concurrency']} --pace {r['pace_s']}` on {r['machine']['cpus']} CPUs (shared machine), model: {r['model']}.",
             "Both arms ran in one run, alternating order per round; the shadow queue was drained after each "
             "\"on\" arm.", "",
             "| | " + " | ".join(keys) + " |", "| --- | " + " | ".join("---" for _ in keys) + " |"]
    for mode in ("off", "on"):
        lines.append(f"| shadow {mode} ({r[mode]['n']} uploads) | " + " | ".join(f"{r[mode][k]:.1f}" for k in keys) + " |")
    lines.append("| on / off | " + " | ".join(f"{r['ratio_on_over_off'].get(k, float('nan')):.3f}" for k in keys) + " |")
    lines += ["", "Per arm (median ms, shadow outcomes during the arm):", ""]
    for a in r["per_arm"]:
        lines.append(f"- round {a['round']} {a['mode']}: {a['median_ms']} ms, {a['shadow'] or '-'}")
    lines += ["", f"Shadow gradings stored: {r['shadow_gradings_stored']}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
