"""The systems under load, started as real processes: TorchServe, the API (gunicorn) on SQLite +
local storage or on PostgreSQL + SeaweedFS S3, and the naive server.

Each is a context manager that starts the processes through scripts/serving/processes/, registers their
process trees with the memory sampler, yields a handle with a `send(session, i)` for the load
generator, and stops everything on exit.
"""
from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import requests

from bench.driver import MemorySampler, multipart, run_load
from bench.inputs import SAMPLES, BenchInput, ServeConfig
from control_api.settings import Settings
from scripts.serving.processes import (REPO, VENV_BIN, Gunicorn, PostgresDatabase, Process, SeaweedS3, TorchServe,
                              flask_cli, free_port)

TIMEOUT = (5, 120)
# TorchServe's frontend is Java: HotSpot compiles its request path during the first couple of
# hundred requests, and until then the frontend spends several times its settled CPU on each one
# (docs/benchmarks/speed.md, section 10). Every TorchServe is sent this many real photographs
# before it is handed out, so that no cell compares a cold TorchServe with a warm one.
WARM_UP_REQUESTS = 320
WARM_UP_CONCURRENCY = 8
WARM_UP_PHOTO = SAMPLES / "idrid_01.jpg"


@dataclass
class Handle:
    label: str
    url: str
    send: Callable[[requests.Session, int], requests.Response]
    ok_status: tuple = (200,)
    check: Callable | None = None
    info: dict = field(default_factory=dict)
    pids: dict = field(default_factory=dict)   # label -> root pid, for the soak test's samples
    metrics_url: str | None = None             # the TorchServe behind it, for server-side numbers


def _graded(response: requests.Response) -> bool:
    return b'"gradable"' in response.content


def prediction_sender(url: str, inputs: list[BenchInput], *, fresh_connection: bool = False,
                      auth: dict | None = None):
    """POST /predictions/dr with the raw image, as the API's TorchServe client does (with its
    inference key in `auth`). `fresh_connection` opens a new TCP connection per request instead
    of reusing the session's."""
    auth = auth or {}
    datas = [i.data() for i in inputs]
    types = [i.content_type for i in inputs]

    def send(session: requests.Session, i: int) -> requests.Response:
        if fresh_connection:
            return requests.post(f"{url}/predictions/dr", data=datas[i],
                                 headers={"Content-Type": types[i], "Connection": "close", **auth}, timeout=TIMEOUT)
        return session.post(f"{url}/predictions/dr", data=datas[i], headers={"Content-Type": types[i], **auth},
                            timeout=TIMEOUT)

    return send


# The API's own worker count with nothing configured (control_api/settings.py), for the cells
# that compare the API as deployed; the scaling and soak runs keep their own 2.
API_DEFAULT_WORKERS = Settings.from_env({}).workers


@contextlib.contextmanager
def torchserve(workdir: Path, mar: Path, cfg: ServeConfig, sampler: MemorySampler, label: str | None = None):
    """A TorchServe serving `mar` as model `dr`, with a READY worker; yields the TorchServe.
    Two running at once need their own `label`s: the sampler knows a tree by its label."""
    label = label or f"torchserve {cfg.tag}"
    server = TorchServe(workdir, mar.parent, models=f"dr={mar.name}")
    server.start(timeout=180)
    try:
        server.wait_model_ready("dr", timeout=180)
        warm_up(server)
        sampler.track(label, server.proc.pid)
        server.bench_label = label
        yield server
    finally:
        sampler.untrack(label)
        server.stop()


def warm_up(server: TorchServe, requests_total: int | None = None) -> None:
    """Send `requests_total` (default WARM_UP_REQUESTS) predictions of a 9.7 MP photograph,
    unmeasured; raise when one fails (a TorchServe that cannot grade it would fail every cell)."""
    requests_total = WARM_UP_REQUESTS if requests_total is None else requests_total
    if requests_total <= 0:
        return
    data, auth = WARM_UP_PHOTO.read_bytes(), server.auth()

    def send(session: requests.Session, i: int) -> requests.Response:
        return session.post(f"{server.inference_url}/predictions/dr", data=data,
                            headers={"Content-Type": "image/jpeg", **auth}, timeout=TIMEOUT)

    result = run_load(send, 1, WARM_UP_CONCURRENCY, requests_total, warmup=0, check=_graded, progress=False)
    if result.errors:
        raise RuntimeError(f"TorchServe failed its warm-up: {result.errors}")


def torchserve_handle(server: TorchServe, cfg: ServeConfig, inputs: list[BenchInput], **kw) -> Handle:
    workers = server.model_status("dr")[0].get("workers", [])
    return Handle(server.bench_label, server.inference_url,
                  prediction_sender(server.inference_url, inputs, auth=server.auth(), **kw),
                  check=_graded, info={"config": cfg.to_dict(), "workers": len(workers)},
                  pids={server.bench_label: server.proc.pid}, metrics_url=server.metrics_url)


def flask_stdout(env: dict, *args: str) -> str:
    """`flask --app control_api ARGS` with this environment; its stdout, or an error when it fails."""
    run = flask_cli(env, *args, timeout=300)
    if run.returncode != 0:
        raise RuntimeError(f"flask {' '.join(args)} failed:\n{run.stdout}{run.stderr}")
    return run.stdout


class BenchGunicorn(Gunicorn):
    """The API's gunicorn with extra command-line settings (they override gunicorn.conf.py)."""

    def __init__(self, *args, extra_args: tuple = (), repo: Path | None = None, **kw):
        super().__init__(*args, **kw)
        self.extra_args = list(extra_args)
        if repo is not None:  # another checkout's code (bench/speed_ab.py: before/after a change)
            self.cwd = repo
            self.env["PYTHONPATH"] = str(repo)

    def command(self) -> list[str]:
        return [str(VENV_BIN / "gunicorn"), "-c", str(self.cwd / "gunicorn.conf.py"), *self.extra_args, self.app]


def api_env(workdir: Path, ts: TorchServe, backend: str) -> tuple[dict, list]:
    """(environment, services to stop afterwards) for the API on `backend`:
    "embedded" = SQLite + local storage (the defaults), "postgres-s3" = PostgreSQL + SeaweedFS S3."""
    # Without a TorchServe (the scaling cells) the API points at a port where nothing listens.
    nowhere = {"TORCHSERVE_INFERENCE_URL": "http://127.0.0.1:9", "TORCHSERVE_MANAGEMENT_URL": "http://127.0.0.1:9"}
    env = {**(ts.settings_env() if ts else nowhere),
           "TORCHSERVE_MODEL_NAME": "dr", "TORCHSERVE_TIMEOUT_SECONDS": "60",
           # The benchmark is one API key uploading hundreds of images a minute.
           "UPLOAD_RATE_LIMIT": "1000000/minute", "LOG_LEVEL": "INFO"}
    cleanup = []
    if backend == "embedded":
        env.update(DATABASE_URL=f"sqlite:///{workdir / 'clarity.db'}", STORAGE_BACKEND="local",
                   LOCAL_STORAGE_DIR=str(workdir / "images"))
    elif backend == "postgres-s3":
        pg = PostgresDatabase(prefix="clarity_bench").create()
        cleanup.append(pg.drop)
        s3 = SeaweedS3(workdir / "seaweedfs")
        try:
            s3.start(timeout=60)
        except BaseException:
            pg.drop()
            raise
        cleanup.append(s3.stop)
        env.update(DATABASE_URL=pg.url, **s3.settings_env())
        env["_seaweed_pid"] = str(s3.proc.pid)
    elif backend == "postgres":
        pg = PostgresDatabase(prefix="clarity_bench").create()
        cleanup.append(pg.drop)
        env.update(DATABASE_URL=pg.url, STORAGE_BACKEND="local", LOCAL_STORAGE_DIR=str(workdir / "images"))
    else:
        raise ValueError(backend)
    return env, cleanup


@contextlib.contextmanager
def api(workdir: Path, ts: TorchServe | None, backend: str, inputs: list[BenchInput], sampler: MemorySampler, *,
        workers: int = 2, extra_args: tuple = (), app: str = "control_api.wsgi:app", label: str | None = None,
        repo: Path | None = None):
    """The control API under gunicorn, migrated, with one clinician key and one patient."""
    label = label or f"api {backend}"
    workdir.mkdir(parents=True, exist_ok=True)
    env, cleanup = api_env(workdir, ts, backend)
    seaweed_pid = env.pop("_seaweed_pid", None)
    server = None
    try:
        flask_stdout(env, "migrate")
        token = flask_stdout(env, "keys", "create", "--role", "clinician", "--label", "benchmark").strip().splitlines()[-1]
        server = BenchGunicorn(workdir / "gunicorn", env, workers=workers, extra_args=extra_args, app=app, repo=repo)
        server.start(timeout=90)
        auth = {"Authorization": f"Bearer {token}"}
        r = requests.post(f"{server.url}/api/v1/patients", headers=auth, timeout=30,
                          json={"name": "Benchmark Patient", "birth_date": "1960-01-01"})
        r.raise_for_status()
        patient = r.json()["id"]
        bodies = [multipart({"eye": "left", "image": (i.name, i.data(), i.content_type)}) for i in inputs]
        url = f"{server.url}/api/v1/patients/{patient}/screenings"

        def send(session: requests.Session, i: int) -> requests.Response:
            body, content_type = bodies[i]
            return session.post(url, data=body, headers={**auth, "Content-Type": content_type}, timeout=TIMEOUT)

        sampler.track(label, server.proc.pid)
        database = env["DATABASE_URL"].rsplit("/", 1)[-1] if env["DATABASE_URL"].startswith("postgres") else None
        if database:
            sampler.track_postgres(label, database)  # its backends' CPU (clinic.py's cells)
        pids = {label: server.proc.pid}
        if seaweed_pid:
            sampler.track(f"{label} seaweedfs", int(seaweed_pid))  # one per API: before/after cells
            pids["seaweedfs"] = int(seaweed_pid)
        yield Handle(label, server.url, send, ok_status=(201,),
                     info={"backend": backend, "gunicorn_workers": workers,
                           "gunicorn_threads": int(env.get("GUNICORN_THREADS", 4)),
                           "extra_args": list(extra_args), "app": app,
                           "token": token, "patient_id": patient, "env": env},
                     pids=pids, metrics_url=ts.metrics_url if ts else None)
    finally:
        sampler.untrack(label)
        sampler.untrack(f"{label} seaweedfs")
        sampler.untrack_postgres(env["DATABASE_URL"].rsplit("/", 1)[-1])
        if server is not None:
            server.stop()
        for stop in reversed(cleanup):
            try:
                stop()
            except Exception as exc:  # keep stopping the rest
                print(f"cleanup failed: {exc}", file=sys.stderr)


class NaiveServer(Process):
    """bench/naive_server.py under gunicorn with `workers` synchronous workers: each handles one
    request at a time (bench/clinic.py starts one per core)."""

    name = "naive"

    def __init__(self, workdir: Path, checkpoint: Path, torch_threads: int | None = None,
                 workers: int = 1, preprocess: str | None = None):
        env = {"NAIVE_CHECKPOINT": str(checkpoint), "PYTHONPATH": str(REPO)}
        if torch_threads:
            env["NAIVE_TORCH_THREADS"] = str(torch_threads)
        if preprocess:
            env["NAIVE_PREPROCESS"] = preprocess
        super().__init__(workdir, env)
        self.workers = workers
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ready_url = f"{self.url}/ping"

    def command(self) -> list[str]:
        return [str(VENV_BIN / "gunicorn"), "-w", str(self.workers), "-k", "sync", "-b", f"127.0.0.1:{self.port}",
                "--timeout", "120", "--chdir", str(REPO), "bench.naive_server:app"]
