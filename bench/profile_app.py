"""The control API with a stopwatch on every step of a request, for bench.profile.

    PROFILE_DIR=DIR gunicorn -c gunicorn.conf.py bench.profile_app:app

Each step's time is exclusive (a step inside another is taken out of the outer one), so the
steps and `other` add up to the request's wall time inside the worker. One JSON line per
request goes to DIR/phases-<pid>.jsonl. A request with the header `X-Profile: 1` is also
recorded by pyinstrument into DIR/pyinstrument-<n>.txt. Nothing here changes what the API does.
"""
from __future__ import annotations

import concurrent.futures
import functools
import json
import logging
import os
import threading
import time
from pathlib import Path

import peewee
import werkzeug.formparser

from control_api import audit, auth, images, storage, torchserve
from control_api import upload

PROFILE_DIR = Path(os.environ.get("PROFILE_DIR", "var/bench/profile"))
_local = threading.local()


def _frames() -> list:
    if not hasattr(_local, "stack"):
        _local.stack, _local.phases = [], {}
    return _local.stack


def timed(phase: str, fn):
    """fn, with its exclusive time added to `phase` of the current request."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        stack = _frames()
        frame = [time.perf_counter(), 0.0]  # start, time spent in nested steps
        stack.append(frame)
        try:
            return fn(*args, **kwargs)
        finally:
            stack.pop()
            elapsed = time.perf_counter() - frame[0]
            _local.phases[phase] = _local.phases.get(phase, 0.0) + elapsed - frame[1]
            if stack:
                stack[-1][1] += elapsed
    return wrapper


def _patch(owner, name: str, phase: str) -> None:
    setattr(owner, name, timed(phase, getattr(owner, name)))


_patch(werkzeug.formparser.FormDataParser, "parse", "multipart parsing")
_patch(images, "inspect", "image header check")
_patch(upload, "sha256_hex", "sha256")
_patch(storage, "sha256_hex", "sha256")  # the backends check the hash again before writing
_patch(os, "fsync", "fsync")
_patch(storage.LocalStorage, "put", "image write")
_patch(storage.S3Storage, "put", "image write")
_patch(peewee.Database, "commit", "db commit")
_patch(peewee.Database, "execute_sql", "db statements")
_patch(torchserve.TorchServeClient, "predict", "torchserve call")
# Since issue 14 the upload asks TorchServe in a background thread: what the request itself
# spends on it is the wait for that answer.
_patch(concurrent.futures.Future, "result", "torchserve call")
_patch(concurrent.futures, "wait", "torchserve call")
_patch(audit, "record", "audit row")  # before create_app registers it
_patch(auth, "authenticate", "auth")
_patch(logging.Logger, "handle", "logging")

from control_api.wsgi import app as _flask_app  # noqa: E402  (after the patches, on purpose)


class Stopwatch:
    """WSGI middleware: the whole request, and optionally a pyinstrument profile of it."""

    def __init__(self, wsgi):
        self.wsgi = wsgi
        self.count = 0
        PROFILE_DIR.mkdir(parents=True, exist_ok=True)
        self.out = PROFILE_DIR / f"phases-{os.getpid()}.jsonl"

    def __call__(self, environ, start_response):
        _frames().clear()
        _local.phases = {}
        profiler = None
        if environ.get("HTTP_X_PROFILE") == "1":
            from pyinstrument import Profiler
            profiler = Profiler(interval=0.0005)
            profiler.start()
        start = time.perf_counter()
        body = b"".join(self.wsgi(environ, start_response))  # the whole answer, like the server
        total = time.perf_counter() - start
        if profiler is not None:
            profiler.stop()
            self.count += 1
            (PROFILE_DIR / f"pyinstrument-{os.getpid()}-{self.count}.txt").write_text(
                profiler.output_text(unicode=True, color=False, show_all=False))
        phases = {k: round(v * 1000, 3) for k, v in _local.phases.items()}
        phases["other (flask, schemas, views)"] = round(total * 1000 - sum(phases.values()), 3)
        line = {"method": environ["REQUEST_METHOD"], "path": environ.get("PATH_INFO", ""),
                "total_ms": round(total * 1000, 3), "phases_ms": phases}
        with open(self.out, "a") as f:
            f.write(json.dumps(line) + "\n")
        return [body]


app = Stopwatch(_flask_app)
