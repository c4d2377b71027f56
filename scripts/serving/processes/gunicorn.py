"""The control API under gunicorn, ready once /healthz answers."""
from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

from scripts.serving.processes.base import REPO, VENV_BIN, Process, free_port


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
