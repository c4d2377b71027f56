"""What every local process shares: a process group started, waited on and stopped (Process), free
loopback ports, waiting, and the API's command line."""
from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import requests

REPO = Path(__file__).resolve().parents[3]
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
