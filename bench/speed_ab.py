"""Before/after a change to the upload path, side by side in one run: the API from another
checkout (BEFORE, e.g. `git archive main | tar -x -C DIR`) against this checkout's, on one
backend, with TorchServe direct beside them, the three cells interleaved round by round.

    python -m bench.speed_ab --before DIR [--after DIR] [--backend postgres-s3] [--requests 24]
                             [--rounds 3] [--concurrency 1 8] [--out FILE]

Same TorchServe, same 9-12 MP JPEGs made unique per upload, the API's default worker count; each
API gets its own database (and SeaweedFS). Ratios are per round (median, range); each cell also
has the CPU ms per request of each process group (bench.clinic_report.cpu_columns).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from bench import clinic, clinic_report, systems
from bench import inputs as bench_inputs
from bench.driver import MemorySampler


def _ratios(rounds: list[dict], a: str, b: str) -> dict:
    return clinic.compare([(x[a], x[b]) for x in rounds])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.speed_ab", description=__doc__.split("\n\n")[0])
    p.add_argument("--before", type=Path, required=True, help="a checkout of the code before the change")
    p.add_argument("--after", type=Path, help="a checkout of the code after it (default: this one)")
    p.add_argument("--backend", default="postgres-s3")
    p.add_argument("--requests", type=int, default=24)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--concurrency", type=int, nargs="*", default=[1, 8])
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    photos = clinic.clinic_photos()
    datas = [ph.data() for ph in photos]
    ck_path, ck_info = bench_inputs.checkpoint()
    sampler = MemorySampler()
    workers = systems.API_DEFAULT_WORKERS
    report = {"backend": args.backend, "before": str(args.before), "after": str(args.after or "this checkout"), "load_average_at_start": os.getloadavg(),
              "requests_per_cell": args.requests, "cells": []}
    with tempfile.TemporaryDirectory(prefix="clarity-ab-") as tmp:
        tmp = Path(tmp)
        mar = bench_inputs.archive_for(ck_path, ck_info["sha256"], clinic.DEFAULTS)
        with systems.torchserve(tmp / "ts", mar, clinic.DEFAULTS, sampler) as ts, \
                systems.api(tmp / "before", ts, args.backend, photos[:1], sampler, workers=workers,
                            label="before", repo=args.before.resolve()) as before, \
                systems.api(tmp / "after", ts, args.backend, photos[:1], sampler, workers=workers,
                            label="after", repo=args.after.resolve() if args.after else None) as after:
            sends = {"torchserve": (clinic.predict_sender(ts.inference_url, datas, False, auth=ts.auth()), (200,)),
                     "before": (clinic.upload_sender(before, datas, False), (201,)),
                     "after": (clinic.upload_sender(after, datas, False), (201,))}
            for c in args.concurrency:
                rounds = []
                for _ in range(args.rounds):
                    rounds.append({who: clinic.cell(who, send, c, args.requests, ok=ok, sampler=sampler)
                                   for who, (send, ok) in sends.items()})
                row = {"concurrency": c, "rounds": rounds,
                       "after_over_before": _ratios(rounds, "before", "after"),
                       "before_over_torchserve": _ratios(rounds, "torchserve", "before"),
                       "after_over_torchserve": _ratios(rounds, "torchserve", "after"),
                       "cpu_ms_per_request": {who: dict(zip([g for g, _ in clinic_report.CPU_GROUPS] + ["other", "machine"],
                                                            clinic_report.cpu_columns({"rounds": [[x[who]] for x in rounds]}, 0)))
                                              for who in sends}}
                report["cells"].append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "rounds"}), flush=True)
    report["load_average_at_end"] = os.getloadavg()
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
