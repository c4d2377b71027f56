"""Benchmarks: every figure of issue 14 and the cost of every hop, measured in one run.

    python -m bench.run [--smoke] [--out DIR] [--only preprocess,engine,torchserve,clinic,scaling]
                            [--requests N] [--rounds N] [--soak-requests N] [--max-rows N]

Sections, in this order, in one process:
- preprocess: in-process, on the photographs in samples/ and resized 1/3/9 MP JPEG and PNG copies
              (cached under var/bench/): preprocessing split into its steps, draft-mode vs full JPEG
              decode, the forward pass alone (threads, TorchScript vs eager), the API's own work per
              upload;
- engine:     eager vs ONNX Runtime fp32 and int8 in-process (bench/engine.py), with agreement;
- torchserve: POST /predictions at each concurrency on those 13 inputs, for batch sizes 1, 4 and 8
              on the archive's defaults and the settings those defaults replaced (before/after
              pairs); connection reuse;
- clinic:     the clinic's case (bench/clinic.py): 9-12 MP JPEGs, the API against TorchServe direct
              per backend x connection x concurrency (also with the API tier on its own cores),
              before/after the upload changes, the result cache's re-send, the naive baseline
              against TorchServe direct, eager vs ONNX archives in TorchServe, and the limit (the
              best in-process configuration on the same photographs);
- scaling:    listing and summary latency at 1k..1M screenings in PostgreSQL with EXPLAIN plans,
              and process memory over a long run of uploads (the soak).
It writes report.json, README.md (targets computed from this run's cells) and PNG plots to --out
(docs/benchmarks by default).
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import psutil
from tqdm import tqdm

from bench import clinic as bench_clinic, inputs as bench_inputs, limit as bench_limit, report as bench_report, \
    systems as bench_systems
from bench.inputs import ServeConfig
from bench.driver import MemorySampler, run_load, scrape, server_side
from scripts.serving.processes import REPO

SECTIONS = ("preprocess", "engine", "torchserve", "clinic", "scaling")
OUT = REPO / "docs" / "benchmarks"


@dataclass
class Plan:
    concurrency: tuple             # the TorchServe batch matrix's
    requests: int
    serve_configs: list            # the batch-size matrix
    variants: dict                 # settings the archive's defaults replaced -> what changed
    api_config: ServeConfig        # the TorchServe behind the API cells
    api_backends: tuple
    repeats: int                   # per preprocessing step and input
    rows: tuple                    # scaling: screenings in PostgreSQL
    soak_requests: int
    soak_every: int
    scaling_calls: int             # timed API calls per endpoint and size
    clinic_requests: int           # per clinic cell
    clinic_rounds: int             # interleaved rounds per clinic comparison
    limit_seconds: float           # per limit row (engine x batch)
    engine_rounds: int
    engine_heldout: int            # synthetic images for the ONNX agreement
    engine_sizes: tuple            # EfficientNet-B0 input sizes
    clinic_concurrency: tuple = (1, 8)
    torchserve_warm_up: int = bench_systems.WARM_UP_REQUESTS  # unmeasured requests per TorchServe started
    thread_counts: tuple = (1, os.cpu_count() or 1)   # torch threads for the forward-pass rows
    smoke: bool = False
    notes: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"concurrency": list(self.concurrency), "requests_per_cell": self.requests,
                "torchserve_configs": [c.to_dict() for c in self.serve_configs],
                "torchserve_variants": [{**c.to_dict(), "replaced_by_defaults": what}
                                        for c, what in self.variants.items()],
                "api_torchserve_config": self.api_config.to_dict(), "api_backends": list(self.api_backends),
                "preprocess_repeats": self.repeats, "scaling_rows": list(self.rows),
                "soak_requests": self.soak_requests, "soak_sample_every": self.soak_every,
                "scaling_calls": self.scaling_calls, "forward_torch_threads": list(self.thread_counts),
                "clinic_requests_per_cell": self.clinic_requests, "clinic_rounds": self.clinic_rounds,
                "clinic_concurrency": list(self.clinic_concurrency), "limit_seconds": self.limit_seconds,
                "engine_rounds": self.engine_rounds, "engine_heldout": self.engine_heldout,
                "engine_sizes": list(self.engine_sizes), "torchserve_warm_up_requests": self.torchserve_warm_up,
                "smoke": self.smoke}


DEFAULTS = bench_clinic.DEFAULTS  # the archive's defaults: the clinic's cells run on them
# The archive defaults these replaced (commit 4395ee9), one setting at a time and all together:
# the before halves of the before/after pairs. Torch's default thread count is one per core.
CORES = os.cpu_count() or 1
BEFORE_DELAY = ServeConfig(8, 50, None, 1)
BEFORE_THREADS = ServeConfig(8, 5, 1, CORES)
BEFORE_ALL = ServeConfig(8, 50, 1, CORES)


def full_plan() -> Plan:
    return Plan(
        concurrency=(1, 4, 8, 16), requests=104,  # 104 = 8 passes over the 13 inputs
        serve_configs=[ServeConfig(1, 5, None, 1), ServeConfig(4, 5, None, 1), DEFAULTS],
        variants={BEFORE_DELAY: "maxBatchDelay 50 → 5 ms",
                  BEFORE_THREADS: f"1 worker × {CORES} torch threads → 1 worker per core × 1 thread",
                  BEFORE_ALL: "all of the old archive defaults → the new ones"},
        api_config=DEFAULTS, api_backends=("embedded", "postgres-s3"),
        repeats=5, rows=(1_000, 10_000, 100_000, 1_000_000),
        soak_requests=10_000, soak_every=500, scaling_calls=40,
        clinic_requests=40, clinic_rounds=2, limit_seconds=15,
        engine_rounds=5, engine_heldout=400, engine_sizes=(384, 512))


def smoke_plan() -> Plan:
    return Plan(
        concurrency=(1, 4), requests=8, serve_configs=[DEFAULTS], variants={}, api_config=DEFAULTS,
        api_backends=("embedded", "postgres-s3"), repeats=1,
        rows=(1_000,), soak_requests=40, soak_every=10, scaling_calls=5, thread_counts=(1,),
        clinic_requests=8, clinic_rounds=1, limit_seconds=3,
        engine_rounds=1, engine_heldout=16, engine_sizes=(384,), torchserve_warm_up=16, smoke=True)


def machine() -> dict:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return {"cpu_model": model, "logical_cores": os.cpu_count(), "physical_cores": psutil.cpu_count(logical=False),
            "ram_gb": round(psutil.virtual_memory().total / 2**30, 1), "platform": platform.platform(),
            "gpu": _gpu()}


def _gpu() -> str | None:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:
        return None


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str:
    run = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
    return run.stdout.strip() if run.returncode == 0 else "unknown"


def versions() -> dict:
    java = subprocess.run(["java", "-version"], capture_output=True, text=True)
    dirty = [line[3:] for line in _git("status", "--porcelain").splitlines()
             if line[3:].startswith(("handlers/", "control_api/", "scripts/", "bench/", "config.properties", "gunicorn.conf.py"))]
    return {"python": platform.python_version(), "torch": _version("torch"), "torchvision": _version("torchvision"),
            "torchserve": _version("torchserve"), "torch-model-archiver": _version("torch-model-archiver"),
            "pillow": _version("pillow"), "numpy": _version("numpy"), "gunicorn": _version("gunicorn"),
            "flask": _version("flask"), "peewee": _version("peewee"), "onnxruntime": _version("onnxruntime"),
            "java": (java.stderr.splitlines() or ["unknown"])[0], "git_sha": _git("rev-parse", "HEAD"),
            "git_uncommitted_code": dirty}


class Bench:
    def __init__(self, plan: Plan, cache: Path, only: tuple, argv: list | None = None):
        self.plan, self.cache, self.only = plan, cache, only
        self.argv = list(argv or [])  # the command line the report says generated it
        self.sampler = MemorySampler(interval=0.5)
        self.work = Path(tempfile.mkdtemp(prefix="run-", dir=cache))
        self.report: dict = {"cells": [], "optimisations": {}}

    def cell(self, handle, section: str, concurrency: int, n: int, inputs, **extra) -> dict:
        load = os.getloadavg()[0]
        before = {}

        def start():
            self.sampler.mark()
            if handle.metrics_url:
                before.update(scrape(handle.metrics_url))

        result = run_load(handle.send, len(inputs), concurrency, n, ok_status=handle.ok_status, check=handle.check,
                          desc=f"{handle.label} c={concurrency}", after_warmup=start)
        row = {"section": section, "system": handle.label, **extra, **result.to_dict(),
               "inputs": len(inputs), "load_avg_1m_before": round(load, 2), "memory_mb": self.sampler.mark()}
        if handle.metrics_url:
            row["torchserve_side"] = server_side(before, scrape(handle.metrics_url))
        self.report["cells"].append(row)
        msg = (f"  {handle.label:<32} c={concurrency:<3} {row['throughput_rps']:7.2f} req/s  "
               f"p50 {row.get('p50_ms', float('nan')):8.1f} ms  p99 {row.get('p99_ms', float('nan')):8.1f} ms")
        if result.errors:
            msg += f"  ERRORS {result.errors}"
        tqdm.write(msg)
        return row

    # ------------------------------------------------------------------ sections

    def preprocess(self, inputs, ck_path) -> None:
        plan = self.plan
        tqdm.write("preprocess: in-process steps and forward pass")
        model, cfg, thresholds = bench_limit.load_model(ck_path, threads=1)
        out = {"preprocess": bench_limit.preprocess_split(inputs, cfg, thresholds, plan.repeats),
               "draft_agreement": bench_limit.draft_agreement(inputs, model, cfg, thresholds)}
        out["forward"] = bench_limit.forward_variants(model, cfg, max(3, plan.repeats * 4), plan.thread_counts)
        bench_limit.torch.set_num_threads(1)
        out["api_hops"] = bench_limit.api_hops(inputs, self.work / "hops", plan.repeats)
        self.report["in_process"] = out

    def torchserve_section(self, inputs, ck_path, ck_sha) -> None:
        plan = self.plan
        for cfg in list(plan.serve_configs) + list(plan.variants):
            tqdm.write(f"torchserve {cfg.tag}")
            mar = bench_inputs.archive_for(ck_path, ck_sha, cfg, self.cache)
            with bench_systems.torchserve(self.work / f"ts-{cfg.tag}", mar, cfg, self.sampler) as server:
                handle = bench_systems.torchserve_handle(server, cfg, inputs)
                variant = cfg not in plan.serve_configs
                for c in plan.concurrency:
                    self.cell(handle, "torchserve", c, plan.requests, inputs, config=cfg.tag, variant=variant,
                              batch_size=cfg.batch_size, torchserve_workers=handle.info["workers"])
                if cfg == plan.api_config:
                    self._connection_reuse(server, cfg, inputs)

    def _connection_reuse(self, server, cfg, inputs) -> None:
        """One small image at concurrency 1: keep-alive session vs a new connection per request."""
        small = [min(inputs, key=lambda i: i.bytes)]
        rows = {}
        for fresh in (False, True):
            handle = bench_systems.torchserve_handle(server, cfg, small, fresh_connection=fresh)
            handle.label = f"{handle.label} {'new connection' if fresh else 'keep-alive'}"
            rows["new_connection" if fresh else "keep_alive"] = self.cell(
                handle, "connection", 1, self.plan.requests, small, config=cfg.tag)
        self.report["optimisations"]["connection_reuse"] = {"input": small[0].name, **rows}

    def clinic_section(self) -> None:
        """bench/clinic.py's cells, the issue's like-with-like figures, into this run's report."""
        plan = self.plan
        tqdm.write("clinic: 9-12 MP JPEGs, paired cells")
        self.report["clinic"] = bench_clinic.measure(bench_clinic.options(
            plan.clinic_requests, plan.clinic_rounds, plan.clinic_concurrency, plan.api_backends,
            plan.limit_seconds, sampler=self.sampler, cache=self.cache))

    def engine_section(self, ck_path) -> None:
        from bench import engine as bench_engine  # imports onnxruntime and the training code

        plan = self.plan
        tqdm.write("engine: eager vs ONNX Runtime in-process")
        self.report["engine"] = bench_engine.measure(ck_path, plan.engine_rounds, plan.engine_heldout,
                                                     plan.engine_sizes)

    def scaling_section(self, inputs, ck_path, ck_sha) -> None:
        from bench import scaling as bench_scaling

        self.report["scaling"] = {
            "rows": bench_scaling.rows_scaling(self.work / "scaling", self.plan.rows, self.plan.scaling_calls,
                                               self.sampler),
        }
        small = [i for i in inputs if i.megapixels < 1.5 and i.format == "JPEG"]
        mar = bench_inputs.archive_for(ck_path, ck_sha, self.plan.api_config, self.cache)
        self.report["scaling"]["soak"] = bench_scaling.soak(
            self.work / "soak", mar, self.plan.api_config, small, self.plan.soak_requests, self.plan.soak_every,
            self.sampler)

    # ------------------------------------------------------------------ the run

    def run(self) -> dict:
        started = time.time()
        self.sampler.start()
        report = self.report
        report["meta"] = {"started_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                          "command": " ".join(["python -m bench.run", *self.argv]),
                          "sections": list(self.only), "load_avg_start": [round(x, 2) for x in os.getloadavg()]}
        report["machine"] = machine()
        report["versions"] = versions()
        report["settings"] = self.plan.to_dict()
        all_inputs = bench_inputs.inputs(self.cache)
        inputs = bench_inputs.smoke_inputs(all_inputs) if self.plan.smoke else all_inputs
        report["inputs"] = [i.to_dict() for i in inputs]
        ck_path, ck_info = bench_inputs.checkpoint(self.cache)
        report["model"] = ck_info
        steps = [("preprocess", lambda: self.preprocess(inputs, ck_path)),
                 # Single-threaded in-process timings first, before any server has loaded the machine:
                 # in the run after the clinic cells ONNX Runtime measured 44 ms per image where it
                 # measures 33-36 ms on a quiet machine (docs/benchmarks/speed.md).
                 ("engine", lambda: self.engine_section(ck_path)),
                 ("torchserve", lambda: self.torchserve_section(inputs, ck_path, ck_info["sha256"])),
                 ("clinic", self.clinic_section),
                 ("scaling", lambda: self.scaling_section(inputs, ck_path, ck_info["sha256"]))]
        report["meta"]["section_s"] = {}
        try:
            for name, step in steps:
                if name in self.only:
                    t = time.time()
                    step()
                    report["meta"]["section_s"][name] = round(time.time() - t, 1)
        except Exception:  # keep what was measured; the report says where it stopped
            report["error"] = traceback.format_exc()
            tqdm.write(report["error"])
        finally:
            self.sampler.stop()
            report["memory_lifetime_mb"] = self.sampler.peaks()
            report["meta"].update(
                finished_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                duration_s=round(time.time() - started, 1),
                load_avg_end=[round(x, 2) for x in os.getloadavg()])
            shutil.rmtree(self.work, ignore_errors=True)
        return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="a few requests per cell, small matrix (a few minutes)")
    p.add_argument("--out", type=Path, default=OUT, help="where report.json, README.md and the plots go")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--requests", type=int, help="measured requests per load cell (TorchServe matrix and clinic)")
    p.add_argument("--rounds", type=int, help="interleaved rounds per clinic comparison and engine row")
    p.add_argument("--soak-requests", type=int, help="uploads in the memory soak (default 10000)")
    p.add_argument("--max-rows", type=int, help="largest screening count in the scaling test (default 1000000)")
    p.add_argument("--cache", type=Path, default=bench_inputs.CACHE, help="inputs, archives and scratch files")
    args = p.parse_args(argv)
    only = tuple(s.strip() for s in args.only.split(",") if s.strip())
    unknown = set(only) - set(SECTIONS)
    if unknown:
        p.error(f"unknown section(s) {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS)}")
    plan = smoke_plan() if args.smoke else full_plan()
    if args.requests:
        plan.requests = plan.clinic_requests = args.requests
    if args.rounds:
        plan.clinic_rounds = plan.engine_rounds = args.rounds
    if args.soak_requests:
        plan.soak_requests = args.soak_requests
        plan.soak_every = max(1, min(plan.soak_every, args.soak_requests // 10))
    if args.max_rows:
        plan.rows = tuple(r for r in plan.rows if r <= args.max_rows) or (args.max_rows,)
    args.cache.mkdir(parents=True, exist_ok=True)
    warm_up, bench_systems.WARM_UP_REQUESTS = bench_systems.WARM_UP_REQUESTS, plan.torchserve_warm_up
    try:  # every TorchServe this run starts gets the plan's warm-up
        report = Bench(plan, args.cache, only, sys.argv[1:] if argv is None else argv).run()
    finally:
        bench_systems.WARM_UP_REQUESTS = warm_up
    paths = bench_report.write(report, args.out)
    for path in paths:
        print(path)
    return 1 if report.get("error") else 0


if __name__ == "__main__":
    sys.exit(main())
