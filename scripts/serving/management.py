"""The one TorchServe management client for the tools: the models CLI (registry.py), the process
managers (processes/) and the serving image's health check (deploy/healthcheck.py) all ask
TorchServe about models through it, and "a READY worker" is counted here only.

The control API keeps its own client (control_api/torchserve.py): the API image carries no scripts/.
The serving image carries this file and registry.py (Dockerfile.serve), and the key handling both
clients share (control_api/torchserve_keys.py: standard library and requests only).

TorchServe's token authorization is on: the management key comes from TorchServe's key file
(TORCHSERVE_KEY_FILE, or key_file= / --key-file), and an expired one is renewed and the call sent
once more.
"""
from __future__ import annotations

import os
import time

import requests
from tenacity import retry, retry_if_exception_type, stop_after_attempt, wait_exponential

from control_api.torchserve_keys import KeyFileError, TorchServeKeys, refused

DEFAULT_MANAGEMENT = os.environ.get("TORCHSERVE_MANAGEMENT_URL", "http://127.0.0.1:8081")
# `make run` keeps TorchServe's key file here; the README runs the tools from the repository root.
MAKE_RUN_KEY_FILE = "var/torchserve/key_file.json"
DEFAULT_KEY_FILE = (os.environ.get("TORCHSERVE_KEY_FILE")
                    or (MAKE_RUN_KEY_FILE if os.path.exists(MAKE_RUN_KEY_FILE) else ""))


def ready_workers(description: dict) -> int:
    """How many workers of one described version are READY (/ping says Healthy before the model
    loads: a READY worker is what readiness means)."""
    return sum(1 for w in description.get("workers") or [] if w.get("status") == "READY")


def any_ready(descriptions: list[dict]) -> bool:
    """Whether any of the described versions has a READY worker."""
    return any(ready_workers(d) for d in descriptions)


class ManagementError(Exception):
    """A failed management call, worded for the person at the terminal."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


_HINTS = {
    405: "model API disabled: set enable_model_api=true in TorchServe's config.properties",
    403: "refused by TorchServe",
    404: "not found",
    409: "conflict",
    400: "rejected",
    507: "TorchServe is out of resources",
}


class Management:
    """A thin client for TorchServe's management API; connection errors are retried, nothing else."""

    def __init__(self, url: str = DEFAULT_MANAGEMENT, timeout: float = 30, key_file: str | None = None):
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.session = requests.Session()
        self.keys = TorchServeKeys(DEFAULT_KEY_FILE if key_file is None else key_file, self.url)

    @retry(retry=retry_if_exception_type(requests.ConnectionError), stop=stop_after_attempt(4),
           wait=wait_exponential(multiplier=0.5, max=4), reraise=True)
    def _send(self, method: str, path: str, key: str | None, **params) -> requests.Response:
        return self.session.request(method, f"{self.url}{path}", params=params or None,
                                    headers=self.keys.headers(key), timeout=self.timeout)

    def _authorized(self, method: str, path: str, **params) -> requests.Response:
        """The call with the management key; once more with a renewed key if TorchServe refused it."""
        key = self.keys.key("management")
        r = self._send(method, path, key, **params)
        if refused(r):
            self.keys.renew("management", key)
            r = self._send(method, path, self.keys.key("management"), **params)
        return r

    def call(self, method: str, path: str, **params):
        try:
            r = self._authorized(method, path, **params)
        except requests.ConnectionError as exc:
            raise ManagementError(f"TorchServe management API not reachable at {self.url}: {exc}") from None
        except KeyFileError as exc:
            raise ManagementError(f"TorchServe management key: {exc}") from None
        except requests.Timeout:
            raise ManagementError(f"{method} {path}: TorchServe did not answer within {self.timeout:g}s "
                                  "(busy? see its ts_log.log)") from None
        if r.status_code >= 400:
            try:
                detail = r.json().get("message") or r.text
            except ValueError:
                detail = r.text.strip() or r.reason
            hint = ("TorchServe refused the management key (--key-file / TORCHSERVE_KEY_FILE)" if refused(r)
                    else _HINTS.get(r.status_code, f"HTTP {r.status_code}"))
            raise ManagementError(f"{method} {path}: {hint}: {detail}", r.status_code)
        try:
            return r.json()
        except ValueError:
            return r.text

    def describe(self, name: str, version: str | None = None) -> list[dict]:
        """GET /models/NAME[/VERSION]: the default version's (or VERSION's) description, in a list."""
        return self.call("GET", f"/models/{name}" + (f"/{version}" if version else ""))

    def wait_ready(self, name: str, version: str | None = None, timeout: float = 120, interval: float = 0.5,
                   say=None) -> None:
        """Until a worker of NAME (VERSION, else the default) is READY; ManagementError after `timeout`.
        `say`, when given, hears the workers' states every 5 s (the models CLI's progress)."""
        started = time.monotonic()
        last_said = None
        while True:
            described = self.describe(name, version)
            if any_ready(described):
                return
            states = [w.get("status") for d in described for w in d.get("workers") or []]
            now = time.monotonic()
            if now - started > timeout:
                raise ManagementError(f"{name} {version or '(default)'}: no worker READY after {timeout:.0f}s "
                                      f"({len(states)} workers: {', '.join(states) or 'none'}; "
                                      "see TorchServe's model_log.log)")
            if say and (last_said is None or now - last_said >= 5):
                last_said = now
                summary = ", ".join(f"{states.count(s)} {s}" for s in sorted(set(states))) or "no workers yet"
                say(f"waiting for {name} {version or '(default)'}: {summary} ({now - started:.0f}s of {timeout:.0f}s)")
            time.sleep(interval)
