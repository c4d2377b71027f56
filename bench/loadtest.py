"""Load test of the whole stack, started here on loopback: PostgreSQL (a scratch database on the
local server), SeaweedFS S3, TorchServe and the API under gunicorn.

    python -m bench.loadtest --screenings 2000 --concurrency 16 [--out docs/load] [--workers 2]

It uploads photographs (the samples/ JPEGs, each made unique by a trailer after the JPEG end
marker) with an Idempotency-Key, samples the RSS of every process, then checks that nothing was
lost: every 201/202 has its row with the client's SHA-256, every object reads back with that
SHA-256 (`flask check-storage`), no object lacks a row and no screening was graded twice.
Pending screenings (TorchServe too slow) are graded afterwards with `flask grade-pending`.
Exit status 1 on any error or loss. Results go to OUT/load_<screenings>x<concurrency>.{json,md}.

The model is the demo model when models/demo/checkpoint.pt exists, otherwise the tiny random
model the test fixtures serve. Either way it is trained on synthetic (or no) data: its grades
mean nothing clinically, and this command measures the machinery, not the model.

The fault tests check what is stored with the same `consistency` (tests/support/harness.py).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import requests

from bench.driver import stats
from scripts.serving.processes import REPO, Gunicorn, PostgresDatabase, SeaweedS3, TorchServe, api_key, flask_cli
from scripts.serving.stack import DEMO_CHECKPOINT

SAMPLES = REPO / "samples"
MODEL_VERSION = "1.0"


class LoadStack:
    """PostgreSQL (a scratch database), SeaweedFS S3, TorchServe and the API under gunicorn, all
    started here on loopback and stopped on exit. (The tests' tests.support.harness.PrivateStack
    starts the same processes, sharing some between test modules.)"""

    def __init__(self, workdir: Path, model_store: Path, *, workers: int = 2, api_env: dict | None = None):
        self.workdir, self.model_store, self.workers = Path(workdir), Path(model_store), workers
        self.api_env = dict(api_env or {})
        self._running = contextlib.ExitStack()

    def __enter__(self) -> "LoadStack":
        on_exit = self._running
        try:
            self.database = PostgresDatabase(prefix="clarity_stack").create()
            on_exit.callback(self.database.drop)
            self.s3 = on_exit.enter_context(SeaweedS3(self.workdir / "seaweedfs"))
            self.torchserve = on_exit.enter_context(TorchServe(
                self.workdir / "torchserve", self.model_store, models=f"dr=dr_{MODEL_VERSION}.mar",
                env={"DR_TORCH_THREADS": "1"}))
            self.torchserve.wait_model_ready("dr", MODEL_VERSION, timeout=120)
            self.env = {"DATABASE_URL": self.database.url, **self.s3.settings_env(),
                        **self.torchserve.settings_env(), "LOG_LEVEL": "INFO",
                        "UPLOAD_RATE_LIMIT": "100000/minute", **self.api_env}
            migrated = self.cli("migrate")
            if migrated.returncode != 0:
                raise RuntimeError(f"flask migrate failed: {migrated.stderr}")
            self.api = on_exit.enter_context(Gunicorn(self.workdir / "gunicorn", self.env, workers=self.workers))
        except BaseException:
            on_exit.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._running.close()

    @property
    def url(self) -> str:
        return self.api.url

    def cli(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        """`flask --app control_api ARGS` with the API's environment."""
        return flask_cli(self.env, *args, timeout=timeout)

    def key(self, role: str) -> dict:
        """Headers with a new API key of this role."""
        return {"Authorization": f"Bearer {api_key(self.env, role, f'stack {role}')}"}

    def consistency(self, expected: dict[str, str] | None = None) -> dict:
        return consistency(stored_rows(self.database), self.s3.object_keys("screenings/"), expected)

    def check_storage(self) -> subprocess.CompletedProcess:
        """`flask check-storage`: every object read back and hashed against its row."""
        return self.cli("check-storage")


# -------------------------------------------------------------------- what is stored

def stored_rows(database: PostgresDatabase) -> dict[str, dict]:
    """screening id -> {image_key, sha256, status, gradings}, read from PostgreSQL directly."""
    rows = database.sql("SELECT s.id, s.image_key, s.image_sha256, s.status, count(g.id) "
                        "FROM screening s LEFT JOIN grading g ON g.screening_id = s.id GROUP BY s.id")
    return {str(i): {"image_key": k, "sha256": sha, "status": st, "gradings": n} for i, k, sha, st, n in rows}


def consistency(rows: dict[str, dict], keys: set[str], expected: dict[str, str] | None = None) -> dict:
    """What is wrong with what is stored (every list empty means consistent), from the rows
    (`stored_rows`) and the image keys in S3.

    - rows_without_object: a screening whose image is not in S3;
    - objects_without_row: an image no screening refers to (an orphan);
    - ungraded: a screening that is graded/ungradable without a grading;
    - graded_twice: more than one grading (nothing here re-grades on purpose);
    - lost / sha_mismatch: when `expected` (screening id -> the client's SHA-256) is given,
      accepted screenings without a row, or whose row holds another hash.
    SHA-256 of the bytes in S3 against the rows is `flask check-storage`'s job.
    """
    row_keys = {r["image_key"] for r in rows.values()}
    report = {
        "rows": len(rows), "objects": len(keys),
        "rows_without_object": sorted(i for i, r in rows.items() if r["image_key"] not in keys),
        "objects_without_row": sorted(keys - row_keys),
        "ungraded": sorted(i for i, r in rows.items() if r["status"] in ("graded", "ungradable")
                           and r["gradings"] == 0),
        "graded_twice": sorted(i for i, r in rows.items() if r["gradings"] > 1),
    }
    if expected is not None:
        report["lost"] = sorted(i for i in expected if i not in rows)
        report["sha_mismatch"] = sorted(i for i, sha in expected.items() if i in rows and rows[i]["sha256"] != sha)
    return report


def problems(report: dict) -> list[str]:
    """The non-empty lists of a consistency() report."""
    return [name for name, value in report.items() if isinstance(value, list) and value]


# -------------------------------------------------------------------- model and images

def model_store(workdir: Path, model: str = "auto") -> tuple[Path, str]:
    """A model store holding dr_1.0.mar: the demo model if it exists (or `model` is "demo"),
    else the tests' tiny model."""
    from scripts.ml import archive

    store = workdir / "model_store"
    store.mkdir(parents=True, exist_ok=True)
    if model == "demo" or (model == "auto" and DEMO_CHECKPOINT.exists()):
        checkpoint, which = DEMO_CHECKPOINT, "demo (models/demo/checkpoint.pt, trained on synthetic images)"
    else:
        # The same seeded random model the test fixtures serve: grades are meaningless, the
        # machinery (decode, quality gate, batching, storage) is what is measured.
        from scripts.ml.tiny_model import make_checkpoint

        checkpoint = make_checkpoint(workdir / "tiny.pt")
        which = "tiny random mobilenet_v3_small @128 (no demo checkpoint found)"
    # The archive defaults, as deployed: batch 8, 5 ms delay, one 1-thread worker per core.
    archive.archive(checkpoint, MODEL_VERSION, model_store=store)
    return store, which


def photographs() -> list[bytes]:
    paths = sorted(SAMPLES.glob("*.jpg"))
    if not paths:
        raise SystemExit(f"no sample photographs in {SAMPLES}")
    return [p.read_bytes() for p in paths]


def unique(photo: bytes, i: int) -> bytes:
    """The photograph with bytes after its JPEG end marker: decoders ignore them, the SHA-256
    differs per upload, so a lost or swapped image cannot hide behind an identical twin."""
    return photo + f"clarity-load-{i:08d}".encode()


# -------------------------------------------------------------------- memory

class RssSampler(threading.Thread):
    """Samples the resident memory of every process of the stack, by role, every `interval` s."""

    def __init__(self, stack: LoadStack, interval: float = 0.5):
        super().__init__(daemon=True)
        self.stack, self.interval = stack, interval
        self.samples: dict[str, list[float]] = {}
        self.done = threading.Event()

    def roles(self) -> dict[str, list]:
        import psutil

        found: dict[str, list] = {}

        def add(role, proc):
            found.setdefault(role, []).append(proc)

        master = psutil.Process(self.stack.api.proc.pid)
        add("api: gunicorn master", master)
        for n, worker in enumerate(sorted(master.children(), key=lambda p: p.pid), 1):
            add(f"api: gunicorn worker {n}", worker)
        ts = psutil.Process(self.stack.torchserve.proc.pid)
        workers = 0
        for proc in [ts, *ts.children(recursive=True)]:
            cmd = " ".join(proc.cmdline())
            if "java" in proc.name():
                add("torchserve: frontend (java)", proc)
            elif "model_service_worker" in cmd:
                workers += 1
                add(f"torchserve: model worker {workers}", proc)
        add("s3: seaweedfs (weed mini)", psutil.Process(self.stack.s3.proc.pid))
        backends = self.stack.database.sql("SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                                  "AND pid <> pg_backend_pid()")
        for (pid,) in backends:
            add("postgresql: backends of this database (sum)", psutil.Process(pid))
        add("load client (this process)", psutil.Process())
        return found

    def sample(self) -> None:
        import psutil

        for role, procs in self.roles().items():
            total = 0
            for proc in procs:
                try:
                    total += proc.memory_info().rss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
            self.samples.setdefault(role, []).append(total / 2 ** 20)

    def run(self) -> None:
        while not self.done.is_set():
            try:
                self.sample()
            except Exception:  # a process between restarts; the next sample will see it
                pass
            self.done.wait(self.interval)

    def stop(self) -> dict:
        self.done.set()
        self.join(10)
        self.sample()
        return {role: {"start_mb": round(v[0], 1), "peak_mb": round(max(v), 1), "end_mb": round(v[-1], 1),
                       "samples": len(v)} for role, v in self.samples.items()}


# -------------------------------------------------------------------- the run

def drive(stack: LoadStack, screenings: int, concurrency: int, patients: int, progress: bool = True) -> dict:
    """Upload `screenings` photographs with `concurrency` clients; returns what the clients saw."""
    from tqdm import tqdm

    headers = stack.key("clinician")
    patient_ids = []
    for n in range(patients):
        # Distinctive fake PHI: tests grep logs for these markers.
        body = {"name": f"Loadtest Phimarker {n}", "birth_date": "1937-07-19",
                "medical_record_number": f"MRN-PHIMARK-LOAD-{n:05d}"}
        response = requests.post(f"{stack.url}/api/v1/patients", headers=headers, json=body, timeout=30)
        response.raise_for_status()
        patient_ids.append(response.json()["id"])
    photos = photographs()
    local = threading.local()

    def upload(i: int) -> dict:
        if not hasattr(local, "session"):
            local.session = requests.Session()
        data = unique(photos[i % len(photos)], i)
        pid = patient_ids[i % len(patient_ids)]
        started = time.perf_counter()
        outcome = {"i": i, "sha256": hashlib.sha256(data).hexdigest()}
        try:
            response = local.session.post(
                f"{stack.url}/api/v1/patients/{pid}/screenings",
                headers={**headers, "Idempotency-Key": f"load-{i}"},
                files={"image": (f"eye{i}.jpg", data, "image/jpeg")},
                data={"eye": "left" if i % 2 else "right"}, timeout=180)
            outcome["status"] = response.status_code
            if response.status_code in (201, 202):
                outcome["id"] = response.json()["id"]
                outcome["screening_status"] = response.json()["status"]
            else:
                outcome["error"] = response.text[:300]
        except requests.RequestException as exc:
            outcome["status"] = None
            outcome["error"] = type(exc).__name__
        outcome["seconds"] = time.perf_counter() - started
        return outcome

    results = []
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        futures = [pool.submit(upload, i) for i in range(screenings)]
        with tqdm(total=screenings, unit="upload", disable=not progress, file=sys.stderr) as bar:
            for future in as_completed(futures):
                results.append(future.result())
                bar.update(1)
    return {"results": results, "wall_s": time.perf_counter() - started}


def run(args: argparse.Namespace) -> dict:
    keep = args.keep or args.workdir is not None
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="clarity-load-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        return _run(args, workdir)
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)


def _run(args: argparse.Namespace, workdir: Path) -> dict:
    store, which_model = model_store(workdir, args.model)
    load_before = os.getloadavg()
    stack = LoadStack(workdir, store, workers=args.workers,
                         api_env={"TORCHSERVE_TIMEOUT_SECONDS": str(args.torchserve_timeout)})
    with stack:
        # What TorchServe actually runs (archive config, workers it started), for the report.
        model = stack.torchserve.model_status("dr", MODEL_VERSION)[0]
        served = {"torchserve_workers": len(model["workers"]), "batch_size": model["batchSize"],
                  "max_batch_delay_ms": model["maxBatchDelay"]}
        sampler = RssSampler(stack)
        sampler.sample()
        sampler.start()
        driven = drive(stack, args.screenings, args.concurrency, args.patients, progress=not args.quiet)
        memory = sampler.stop()
        load_after = os.getloadavg()
        results = driven["results"]
        accepted = {r["id"]: r["sha256"] for r in results if r["status"] in (201, 202)}
        statuses: dict[str, int] = {}
        for r in results:
            statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
        pending = sum(1 for r in results if r.get("screening_status") == "pending")
        graded_after = None
        if pending:
            graded = stack.cli("grade-pending")
            graded_after = graded.stdout.strip().splitlines()[-1:] if graded.returncode == 0 else graded.stderr
        report = stack.consistency(accepted)
        extra_rows = report["rows"] - len(accepted)  # rows nobody was told about (each upload is new)
        check = stack.check_storage()
        seconds = [r["seconds"] for r in results if r["status"] in (201, 202)]
        errors = [r for r in results if r["status"] not in (201, 202)]
        lost = len(report["lost"]) + len(report["sha_mismatch"]) + len(report["rows_without_object"])
        result = {
            "command": f"python -m bench.loadtest --screenings {args.screenings} --concurrency {args.concurrency}",
            "at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                        "load_average_before": [round(x, 2) for x in load_before],
                        "load_average_after": [round(x, 2) for x in load_after]},
            "model": which_model,
            "stack": {"gunicorn_workers": args.workers, "gunicorn_threads": 4, **served,
                      "database": "PostgreSQL (local server)",
                      "storage": "SeaweedFS S3", "torchserve_timeout_s": args.torchserve_timeout},
            "screenings": args.screenings, "concurrency": args.concurrency, "patients": args.patients,
            "statuses": statuses,
            "errors": len(errors),
            "error_examples": [{k: r.get(k) for k in ("status", "error")} for r in errors[:5]],
            "pending_after_upload": pending,
            "grade_pending": graded_after,
            "lost": lost,
            "consistency": {k: (len(v) if isinstance(v, list) else v) for k, v in report.items()},
            "rows_not_accepted": extra_rows,
            "check_storage": {"exit": check.returncode, "summary": (check.stdout.strip().splitlines() or [""])[-1]},
            "wall_s": round(driven["wall_s"], 1),
            "throughput_per_s": round(len(seconds) / driven["wall_s"], 2) if driven["wall_s"] else None,
            "latency_s": _in_seconds(stats(seconds)),
            "rss": memory,
        }
        result["ok"] = (result["errors"] == 0 and lost == 0 and not problems(report) and extra_rows == 0
                        and check.returncode == 0)
    return result


def _in_seconds(ms: dict) -> dict:
    """The benchmarks' latency summary (bench_load.stats, in ms) in seconds; None when nothing succeeded."""
    return {k: round(ms[f"{k}_ms"] / 1000, 3) if ms else None for k in ("p50", "p95", "p99", "max", "mean")}


def markdown(r: dict) -> str:
    lines = [
        f"# Load test: {r['screenings']} screenings at concurrency {r['concurrency']}", "",
        f"`{r['command']}` at {r['at']}. **{'PASS' if r['ok'] else 'FAIL'}**.", "",
        f"- Machine: {r['machine']['cpus']} CPUs, shared; load average before "
        f"{r['machine']['load_average_before']}, after {r['machine']['load_average_after']}.",
        f"- Model: {r['model']}. Grades mean nothing clinically; the run measures the machinery.",
        f"- Stack: gunicorn {r['stack']['gunicorn_workers']} workers x {r['stack']['gunicorn_threads']} threads, "
        f"TorchServe {r['stack']['torchserve_workers']} worker(s) (batch {r['stack']['batch_size']}, "
        f"{r['stack']['max_batch_delay_ms']} ms), {r['stack']['database']}, {r['stack']['storage']}.", "",
        "| measure | value |", "| --- | --- |",
        f"| HTTP statuses | {', '.join(f'{k}: {v}' for k, v in sorted(r['statuses'].items()))} |",
        f"| errors (not 201/202) | {r['errors']} |",
        f"| pending after upload (202) | {r['pending_after_upload']} |",
        f"| lost images (no row, wrong SHA-256, or no object) | {r['lost']} |",
        f"| objects without rows / rows without objects | {r['consistency']['objects_without_row']} / "
        f"{r['consistency']['rows_without_object']} |",
        f"| screenings graded twice | {r['consistency']['graded_twice']} |",
        f"| `flask check-storage` | exit {r['check_storage']['exit']}: {r['check_storage']['summary']} |",
        f"| wall time | {r['wall_s']} s |",
        f"| throughput | {r['throughput_per_s']} screenings/s |",
        f"| latency p50 / p95 / p99 / max | {r['latency_s']['p50']} / {r['latency_s']['p95']} / "
        f"{r['latency_s']['p99']} / {r['latency_s']['max']} s |", "",
        "## Memory (RSS, MiB)", "", "| process | start | peak | end |", "| --- | --- | --- | --- |",
    ]
    for role, m in r["rss"].items():
        lines.append(f"| {role} | {m['start_mb']} | {m['peak_mb']} | {m['end_mb']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--screenings", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--patients", type=int, default=50)
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers")
    parser.add_argument("--torchserve-timeout", type=float, default=30.0,
                        help="TORCHSERVE_TIMEOUT_SECONDS for the API (the production default)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "load")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--model", choices=("auto", "demo", "tiny"), default="auto",
                        help="auto: the demo model if models/demo/checkpoint.pt exists, else the tiny one")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, data)")
    parser.add_argument("--workdir", type=Path, help="work directory to use and keep (default: a temporary one)")
    args = parser.parse_args(argv)
    result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"load_{args.screenings}x{args.concurrency}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    print(f"written: {stem}.json, {stem}.md")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
