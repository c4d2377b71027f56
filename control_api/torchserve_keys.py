"""TorchServe's token authorization keys, read from the key file TorchServe writes.

TorchServe 0.12 (token authorization on) writes `key_file.json` into its working directory at
start, mode 0600, and deletes it at stop:

    {"management": {"key": "...", "expiration time": "..."},
     "inference": {"key": "...", "expiration time": "..."},
     "API": {"key": "..."}}

The inference key opens the inference API, the management key the management API, and the API
key (which never expires) only `GET <management>/token?type=inference|management`, which
replaces that key, in TorchServe and in the file, and so invalidates the previous one at once.
Keys expire `token_expiration_min` (default 60) after they were issued; a wrong, expired or
missing key is answered 400 InvalidKeyException, on every route but /metrics.

Every process that talks to TorchServe (gunicorn workers, the grader, the DICOM receiver, the
tools) reads the same file. When a key is refused, `renew` takes an exclusive lock on a lock file
beside the key file, re-reads the file (another process may have renewed, or TorchServe
restarted with new keys) and asks /token for a new key only when the file still holds the key
that was refused: one renewal per expiry, not one per process, each invalidating the others'.

This module needs only the standard library and requests: the serving image carries it for the
tools (scripts/serving/management.py, deploy/healthcheck.py). Keys never appear in a message.
"""
from __future__ import annotations

import fcntl
import json
import os
import threading
import time
from contextlib import contextmanager

import requests

KINDS = ("inference", "management")


class KeyFileError(Exception):
    """The key file is missing or unreadable, or TorchServe would not renew a key."""


def refused(response: requests.Response) -> bool:
    """TorchServe refused the request's key (wrong, expired or none): 400 InvalidKeyException."""
    if response.status_code != 400:
        return False
    try:
        body = response.json()
    except ValueError:
        return False
    return isinstance(body, dict) and body.get("type") == "InvalidKeyException"


class TorchServeKeys:
    """The keys in one TorchServe key file. `path` empty: TorchServe takes no key (none sent)."""

    def __init__(self, path: str | os.PathLike | None, management_url: str, timeout: float = 5.0):
        self.path = os.fspath(path) if path else ""
        self.management_url = management_url.rstrip("/")
        self.timeout = timeout
        self._keys: dict[str, str] = {}
        self._guard = threading.Lock()

    def key(self, kind: str) -> str | None:
        """The key for `kind` (inference or management) as last read; read now if never read."""
        if not self.path:
            return None
        with self._guard:
            if kind not in self._keys:
                self._keys = self._read()
            return self._keys[kind]

    def headers(self, key: str | None) -> dict:
        return {"Authorization": f"Bearer {key}"} if key else {}

    def renew(self, kind: str, refused_key: str | None) -> None:
        """After TorchServe refused `refused_key`: take the key in the file if it differs, else ask
        TorchServe for a new one. Raises KeyFileError when neither gives a key."""
        if not self.path:
            raise KeyFileError("TorchServe requires a key and none is configured (TORCHSERVE_KEY_FILE)")
        with self._locked():
            keys = self._read()
            if keys[kind] == refused_key:
                answer = requests.get(f"{self.management_url}/token", params={"type": kind},
                                      headers=self.headers(keys["API"]), timeout=self.timeout)
                if answer.status_code != 200:
                    raise KeyFileError(f"TorchServe refused to renew its {kind} key ({answer.status_code}): "
                                       f"is {self.path} the file of the TorchServe at {self.management_url}?")
                keys = self._read()
        with self._guard:
            self._keys = keys

    def _read(self) -> dict[str, str]:
        # TorchServe rewrites the file in place (truncate, then write): a read in between sees
        # it empty or cut short, so a file that does not parse is read again shortly after.
        for attempt in range(5):
            try:
                with open(self.path, encoding="utf-8") as f:
                    data = json.load(f)
                return {"inference": data["inference"]["key"], "management": data["management"]["key"],
                        "API": data["API"]["key"]}
            except (OSError, ValueError, KeyError, TypeError) as exc:
                problem = type(exc).__name__
                time.sleep(0.05 * (attempt + 1))
        raise KeyFileError(f"TorchServe key file {self.path} unreadable: {problem}")

    @contextmanager
    def _locked(self):
        # A lock file of its own: TorchServe replaces the key file's content under us. Where it
        # cannot be created (a read-only mount), renewals go unlocked: at worst two processes
        # renew at once and one retries once more.
        try:
            fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            yield
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock
