"""Liveness and readiness probes and Prometheus metrics: no API key, since load balancers,
orchestrators and scrapers call them. Keep them off the public network."""
from __future__ import annotations

import logging

from flask import Response, jsonify

from .. import metrics, migrations, schemas
from ..auth import public
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


@blp.route("/readyz", methods=["GET"])
@public
@blp.alt_response(200, schema=schemas.Readiness, description="Every dependency answers", success=True)
@blp.alt_response(503, schema=schemas.NotReady, description="`checks` names what failed")
def readyz():
    """Every dependency answers: database (and schema version), image storage, and a READY
    TorchServe worker for the model. 503 names what failed."""
    results = {}
    for name, check in CHECKS.items():
        try:
            problem = check()
        except Exception as exc:  # any failure of a dependency means not ready
            problem = f"{type(exc).__name__}"
            log.warning("readiness check failed", extra={"check": name, "error_type": type(exc).__name__})
        results[name] = {"ok": problem is None, **({"problem": problem} if problem else {})}
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
