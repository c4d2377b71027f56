"""Liveness and readiness probes and Prometheus metrics: no API key, since load balancers,
orchestrators and scrapers call them. Keep them off the public network."""
from __future__ import annotations

import logging
import threading
import time

from flask import Response, current_app, jsonify

from .. import metrics, migrations, schemas
from ..auth import ADMIN, public, roles
from ..db import db
from ..errors import error_response
from ..storage import get_storage
from ..torchserve import get_client
from . import Blueprint

log = logging.getLogger(__name__)

blp = Blueprint("health", __name__, description="Probes")


@blp.route("/healthz", methods=["GET"])
@public
@blp.alt_response(200, schema=schemas.Health, description="The process answers", success=True)
def healthz():
    """The process answers. Checks nothing else, so a dependency outage never restarts it."""
    return jsonify({"status": "ok"})


def _database() -> str | None:
    version = migrations.current_version(db.obj)
    if version != migrations.LATEST:
        return f"schema is at version {version}, expected {migrations.LATEST} (run `flask migrate`)"
    return None


def _storage() -> str | None:
    get_storage().check()
    return None


def _torchserve() -> str | None:
    if not get_client().ready():
        return "model has no READY worker"
    return None


CHECKS = {"database": _database, "storage": _storage, "torchserve": _torchserve}


# /readyz is public (load balancers call it) and was a database query, an S3 HEAD and a
# TorchServe management call per request: a cheap way to load every dependency. Now each
# process checks at most once per READY_TTL seconds (one thread checks, the others answer
# from the last result), and the public answer is only ready / not ready: which dependency
# failed, and how, is for admins (GET /api/v1/readiness) and the logs.
READY_TTL = 5.0


def _check_all() -> dict:
    results = {}
    for name, check in CHECKS.items():
        try:
            problem = check()
        except Exception as exc:  # any failure of a dependency means not ready
            problem = f"{type(exc).__name__}"
            log.warning("readiness check failed", extra={"check": name, "error_type": type(exc).__name__})
        results[name] = {"ok": problem is None, **({"problem": problem} if problem else {})}
    return results


def _cached_checks() -> dict:
    cache = current_app.extensions["clarity"].setdefault("readiness", {"at": 0.0, "results": None,
                                                                        "lock": threading.Lock()})
    if cache["results"] is not None and time.monotonic() - cache["at"] < READY_TTL:
        return cache["results"]
    if not cache["lock"].acquire(blocking=cache["results"] is None):
        return cache["results"]  # another thread is checking: answer from the last result
    try:
        cache.update(results=_check_all(), at=time.monotonic())
    finally:
        cache["lock"].release()
    return cache["results"]


@blp.route("/readyz", methods=["GET"])
@public
@blp.alt_response(200, schema=schemas.Health, description="Every dependency answers", success=True)
@blp.alt_response(503, schema=schemas.Error, description="A dependency does not answer")
def readyz():
    """Every dependency answers: database (and schema version), image storage, and a READY
    TorchServe worker for the model. Checked at most every 5 s per process; which one failed
    is in GET /api/v1/readiness (admin) and the logs, not in this public answer."""
    results = _cached_checks()
    if not all(r["ok"] for r in results.values()):
        return error_response(503, "not_ready", "Not ready.")
    return jsonify({"status": "ready"})


@blp.route("/api/v1/readiness", methods=["GET"])
@roles(*ADMIN)
@blp.alt_response(200, schema=schemas.Readiness, description="Every dependency answers", success=True)
@blp.alt_response(503, schema=schemas.NotReady, description="`checks` names what failed")
def readiness_details():
    """Readiness with each dependency's check, run now (admin only)."""
    results = _check_all()
    failed = [name for name, r in results.items() if not r["ok"]]
    if failed:
        return error_response(503, "not_ready", f"Not ready: {', '.join(failed)}.", extra={"checks": results})
    return jsonify({"status": "ready", "checks": results})


@blp.route("/metrics", methods=["GET"])
@public
@blp.doc(summary="Prometheus metrics (text exposition format)")
@blp.alt_response(200, content_type="text/plain", description="Prometheus text exposition format", success=True)
def scrape():
    return Response(metrics.render(), mimetype=metrics.CONTENT_TYPE)
