"""The background grader (`flask grade-worker`): every `interval` seconds, one grade-pending
pass over the pending screenings. Runs beside the API in every deployment (`make run`,
docker-compose's `grader` service, the ECS task's `grader` container).

Several graders, and grade-pending runs by hand, may run at once: each screening is claimed
before it is graded (grading.claim), so none is graded twice. A database or storage outage
ends a pass, not the worker: it logs and tries again after the interval.
"""
from __future__ import annotations

import logging
import signal
import threading

from . import grading

log = logging.getLogger(__name__)


def run(client, storage, *, interval: float = 30.0, once: bool = False, say=lambda line: None) -> None:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    log.info("grader started", extra={"interval_s": interval})
    while not stop.is_set():
        try:
            counts = grading.grade_pending(client, storage, say=say)
            if any(counts[k] for k in ("graded", "ungradable", "failed", "retry")):
                log.info("grading pass", extra=counts)
        except Exception as exc:  # the database or storage is away: try again next pass
            log.warning("grading pass failed", extra={"error_type": type(exc).__name__})
        finally:
            from .db import db

            if not db.is_closed():
                db.close()
        if once:
            break
        stop.wait(interval)
    log.info("grader stopped")
