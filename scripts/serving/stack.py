"""The local stack behind `make run` and `make stack`: TorchServe, the API (gunicorn) and the DICOM
receiver together.

    python -m scripts.serving.stack model                 # archive the demo model into model_store/ if missing
    python -m scripts.serving.stack run                   # embedded defaults: SQLite + local image directory
    python -m scripts.serving.stack run --postgres --s3   # local PostgreSQL + a SeaweedFS S3 server

Logs of every process are followed on the console with a prefix; Ctrl-C stops them all. A
process that exits is started again after a backoff (Supervisor) while the others go on, and a
background grader (`flask grade-worker`) grades what was kept pending while TorchServe was away.
Data lives under var/ so a second run finds the patients of the first.
"""
from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
import threading
import time
from pathlib import Path

from scripts.serving.processes import REPO, DicomReceiver, Gunicorn, Process, SeaweedS3, TorchServe, flask_cli
from scripts.serving.model_state import HISTORY_FILE, History

DEMO_CHECKPOINT = REPO / "models" / "demo" / "checkpoint.pt"
DEMO_VERSION = "1.0"
MODEL_NAME = "dr"
# MODEL_PATH: the deployment guide's name for the model store (the container uses it too).
MODEL_STORE = Path(os.environ.get("MODEL_PATH") or REPO / "model_store").resolve()
VAR = Path(os.environ.get("STACK_VAR") or REPO / "var").resolve()  # tests point it elsewhere
STACK_DATABASE = "clarity"
# The settings the running stack gave the API, for the flask commands an operator runs beside it
# (check-storage, reconcile, grade-pending): on `make stack` the images are in SeaweedFS, whose
# endpoint and key no default names. Written at start, removed at stop.
ENV_FILE = "stack.env"


def ensure_demo_model() -> Path:
    """model_store/dr_1.0.mar, archived from the committed demo checkpoint when missing."""
    from scripts.ml.archive import archive, mar_path

    path = mar_path(MODEL_STORE, MODEL_NAME, DEMO_VERSION)
    if path.exists():
        print(f"model archive present: {path}")
        return path
    print(f"archiving the demo model {DEMO_CHECKPOINT.relative_to(REPO)} -> {path.relative_to(REPO)}")
    archive(DEMO_CHECKPOINT, DEMO_VERSION, name=MODEL_NAME, model_store=MODEL_STORE)
    return path


class LogFollower(threading.Thread):
    """Prints the lines appended to a log file with a prefix, like `tail -F`, minus `noise`."""

    def __init__(self, path: Path, prefix: str, stop: threading.Event, noise: tuple[str, ...] = ()):
        super().__init__(daemon=True)
        self.path, self.prefix, self.stop, self.noise = path, prefix, stop, noise

    def run(self) -> None:
        while not self.path.exists() and not self.stop.is_set():
            time.sleep(0.2)
        with open(self.path, errors="replace") as f:
            f.seek(0, os.SEEK_END)
            while not self.stop.is_set():
                line = f.readline()
                if not line:
                    time.sleep(0.2)
                elif not any(n in line for n in self.noise):
                    print(f"{self.prefix} {line.rstrip()}", flush=True)


def _postgres_url() -> str:
    """A persistent `clarity` database on the local server (created on first use)."""
    import psycopg2

    admin = os.environ.get("STACK_DATABASE_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    conn = psycopg2.connect(admin, connect_timeout=5)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (STACK_DATABASE,))
            if cur.fetchone() is None:
                cur.execute(f'CREATE DATABASE "{STACK_DATABASE}"')
    finally:
        conn.close()
    return f"{admin.rsplit('/', 1)[0]}/{STACK_DATABASE}"


def write_env_file(path: Path, env: dict) -> Path:
    """`env` as KEY=value lines a POSIX shell can source, readable by the owner only (it holds
    the local S3 server's key)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        os.fchmod(fh.fileno(), 0o600)  # an older file may have had wider permissions
        fh.write("".join(f"{key}={shlex.quote(str(value))}\n" for key, value in sorted(env.items())))
    return path


def _banner(api_url: str, env: dict, dicom: DicomReceiver) -> str:
    # The key must land in the database the API uses; on the embedded defaults that is the
    # settings' own default (var/clarity.db from the repository root), so no prefix is needed.
    env_prefix = f"DATABASE_URL={env['DATABASE_URL']} " if "DATABASE_URL" in env else ""
    env_file = (VAR / ENV_FILE).relative_to(REPO) if VAR.is_relative_to(REPO) else VAR / ENV_FILE
    return f"""
================================================================================
 Clarity in Care is running (Ctrl-C stops everything)
   Console      {api_url}/console/   (sign in with the key of step 1)
   API          {api_url}          docs: {api_url}/api/v1/docs
   TorchServe   http://127.0.0.1:8080 (inference), :8081 (management), :8082/metrics
                token authorization on: keys in {env.get("TORCHSERVE_KEY_FILE", "its key_file.json")}
                (python -m scripts.serving.registry reads var/torchserve/key_file.json from the
                repository root; elsewhere export TORCHSERVE_KEY_FILE=that path)
   DICOM        AE title CLARITY on 127.0.0.1:{dicom.port}, health and metrics on :{dicom.health_port}
                calling AE titles allowed: {dicom.env.get("DICOM_ALLOWED_AE_TITLES") or "none (set DICOM_ALLOWED_AE_TITLES)"}
 The demo model is trained on SYNTHETIC images: its grades are not for clinical use.

 1. Make an API key (shown once):
    {env_prefix}.venv/bin/flask --app control_api keys create --role clinician --label demo
 2. Open the console, paste the key, create a patient, start a visit and drop
    samples/right_normal_600.jpg on the right eye. Or with curl:
    KEY=<the key>
    PATIENT=$(curl -s -X POST {api_url}/api/v1/patients -H "Authorization: Bearer $KEY" \\
      -H 'Content-Type: application/json' -d '{{"name": "Test Patient", "birth_date": "1960-01-01"}}' \\
      | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
    curl -s -X POST {api_url}/api/v1/patients/$PATIENT/screenings -H "Authorization: Bearer $KEY" \\
      -F eye=right -F image=@samples/right_normal_600.jpg
 3. Other flask commands against this stack (check-storage, reconcile, grade-pending) need its
    settings, which {env_file} holds while it runs:
    (set -a; . {env_file}; .venv/bin/flask --app control_api check-storage)
================================================================================
"""


def _interrupt(signum, frame):
    raise KeyboardInterrupt


class Grader(Process):
    """`flask grade-worker`: grades what was kept pending while TorchServe was away."""

    name = "grader"

    def __init__(self, workdir: Path, env: dict, interval: float = 10.0):
        super().__init__(workdir, {**env, "PYTHONPATH": str(REPO)})
        self.interval = interval

    cwd = REPO

    def command(self) -> list[str]:
        return [sys.executable, "-m", "flask", "--app", "control_api", "grade-worker", "--interval",
                str(self.interval)]

    def wait_ready(self, timeout: float) -> None:
        time.sleep(0.5)
        if not self.running:
            raise RuntimeError("grade-worker exited at start")


class Supervisor:
    """Keeps every process of the stack running: one that exits is started again after a
    backoff (1 s, doubling to 60 s; back to 1 s once it has run for 5 minutes). The others
    go on meanwhile, so with TorchServe gone the API still answers (uploads are kept pending,
    202) and the grader grades them once TorchServe is back."""

    MAX_BACKOFF, STABLE = 60.0, 300.0

    def __init__(self, processes: list, after_start: dict | None = None, before_start: dict | None = None):
        self.processes = processes
        self.after_start = after_start or {}  # process -> callable run after it starts (readiness)
        self.before_start = before_start or {}  # process -> callable run before it starts again
        self.backoff = {id(p): 1.0 for p in processes}
        self.started = {id(p): time.monotonic() for p in processes}
        self.due: dict[int, float] = {}
        self.restarts = 0

    def tick(self) -> None:
        now = time.monotonic()
        for p in self.processes:
            key = id(p)
            if p.running:
                if now - self.started[key] > self.STABLE:
                    self.backoff[key] = 1.0
                continue
            if key not in self.due:
                print(f"{p.name} exited; starting it again in {self.backoff[key]:g} s", flush=True)
                self.due[key] = now + self.backoff[key]
                continue
            if now < self.due[key]:
                continue
            del self.due[key]
            self.backoff[key] = min(self.MAX_BACKOFF, self.backoff[key] * 2)
            try:
                p.stop()
                if p in self.before_start:
                    self.before_start[p]()
                p.start()
                if p in self.after_start:
                    self.after_start[p]()
                self.started[key] = time.monotonic()
                self.restarts += 1
                print(f"{p.name} is running again", flush=True)
            except Exception as exc:  # tried again after the next backoff
                print(f"{p.name} did not start: {type(exc).__name__}: {str(exc)[:200]}", flush=True)


def served_models() -> str:
    """TorchServe's --models: the promoted default and the other registered versions, as `promote`
    saved them in the model store (scripts/serving/model_state.py); the demo version when nothing
    was promoted yet. Read at every start, so a restarted TorchServe comes back on the promoted one."""
    saved = History(MODEL_STORE / HISTORY_FILE).serve_models(MODEL_NAME, MODEL_STORE)
    models = saved or f"{MODEL_NAME}=dr_{DEMO_VERSION}.mar"
    print(f"TorchServe models: {models}" + (f" (saved in {MODEL_STORE / HISTORY_FILE})" if saved else ""),
          flush=True)
    return models


def run(args: argparse.Namespace) -> int:
    ensure_demo_model()
    VAR.mkdir(exist_ok=True)
    processes = []
    stop = threading.Event()
    ts = TorchServe(VAR / "torchserve", MODEL_STORE, models=served_models(), ports=tuple(args.torchserve_ports))
    # Embedded defaults (SQLite var/clarity.db, images in var/images) are the settings' own,
    # relative to the repository root where gunicorn and the CLI run.
    env = {**ts.settings_env(), "TORCHSERVE_MODEL_NAME": MODEL_NAME}
    try:
        if args.postgres:
            env["DATABASE_URL"] = _postgres_url()
        if args.s3:
            s3 = SeaweedS3(VAR / "seaweedfs", port=8333)
            processes.append(s3)
            print(f"starting SeaweedFS S3 on {s3.endpoint_url} ...", flush=True)
            s3.start()
            env.update(s3.settings_env())
        print("migrating the database ...", flush=True)
        flask_cli(env, "migrate", capture=False).check_returncode()
        processes.append(ts)
        print("starting TorchServe ...", flush=True)
        ts.start()
        ts.wait_model_ready(MODEL_NAME)
        api = Gunicorn(VAR / "api", env, port=args.port, workers=args.workers)
        processes.append(api)
        print("starting the API (gunicorn) ...", flush=True)
        api.start()
        grader = Grader(VAR / "grader", env)
        processes.append(grader)
        print("starting the background grader ...", flush=True)
        grader.start()
        dicom = DicomReceiver(VAR / "dicom", {**env, "DICOM_ALLOWED_AE_TITLES": os.environ.get(
            "DICOM_ALLOWED_AE_TITLES", "")}, port=args.dicom_port, health_port=args.dicom_port + 1)
        processes.append(dicom)
        print("starting the DICOM receiver ...", flush=True)
        dicom.start()

        # TorchServe's own log repeats every request at DEBUG and carries per-request metrics;
        # the access lines and the model's log say what happened.
        ts_noise = ("[DEBUG]", "[METRICS]", "Backend response time", "Sending response for jobId",
                    "Backend received inference")
        for path, prefix, noise in ((api.log_path, "[api]", ()), (dicom.log_path, "[dicom]", ()),
                                    (ts.log_dir / "ts_log.log", "[torchserve]", ts_noise),
                                    (ts.log_dir / "model_log.log", "[model]", ts_noise)):
            LogFollower(path, prefix, stop, noise).start()
        write_env_file(VAR / ENV_FILE, env)
        print(_banner(api.url, env, dicom), flush=True)

        # Ctrl-C and SIGTERM (docker stop, systemd) both end in the finally block below. SIGINT is
        # set explicitly: a shell starting this in the background would have it ignored.
        signal.signal(signal.SIGTERM, _interrupt)
        signal.signal(signal.SIGINT, _interrupt)
        supervisor = Supervisor(processes, after_start={ts: lambda: ts.wait_model_ready(MODEL_NAME)},
                                before_start={ts: lambda: setattr(ts, "models", served_models())})
        while True:
            time.sleep(0.5)
            supervisor.tick()
    except KeyboardInterrupt:
        print("\nstopping ...", flush=True)
        return 0
    finally:
        stop.set()
        for p in reversed(processes):
            p.stop()
        (VAR / ENV_FILE).unlink(missing_ok=True)  # it names servers that are gone now
        print("stopped.", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("model", help="archive the demo model if model_store/ lacks it")
    run_p = sub.add_parser("run", help="start TorchServe and the API")
    run_p.add_argument("--postgres", action="store_true", help="use the local PostgreSQL server")
    run_p.add_argument("--s3", action="store_true", help="start a SeaweedFS S3 server for the images")
    run_p.add_argument("--port", type=int, default=int(os.environ.get("PORT", 8000)))
    run_p.add_argument("--workers", type=int, default=2)
    run_p.add_argument("--dicom-port", type=int, default=int(os.environ.get("DICOM_PORT", 11112)),
                       help="the DICOM receiver's port; its health port is the next one")
    run_p.add_argument("--torchserve-ports", type=int, nargs=3, default=(8080, 8081, 8082),
                       metavar=("INFERENCE", "MANAGEMENT", "METRICS"))
    args = parser.parse_args(argv)
    if args.command == "model":
        ensure_demo_model()
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
