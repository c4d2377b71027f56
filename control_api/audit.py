"""Audit trail: one row for every read or write of patient data, denied attempts included.

A view declares its action with @audited(action, resource_type); the resource ids come from the
URL (UUIDs) or from `audit.target()` when the view creates or lists them.

The view runs inside one database transaction, and its audit row is inserted in that same
transaction just before it commits: the change and its record commit together or not at all.
If the row cannot be written the change is rolled back and the answer is 503: no change is
kept and no patient data leaves without its audit row. When the view fails (an error answer,
a rollback), nothing was changed, and the after_request hook records the refusal or failure
in a transaction of its own.

The request id in the row is the server's own (app._start), never the client's X-Request-ID.
"""
from __future__ import annotations

import functools
import logging

import peewee
from flask import Response, current_app, g, request

from .db import db
from .errors import RETRY_AFTER_SECONDS, ApiError, error_response, request_id
from .models import AuditEvent, utcnow

log = logging.getLogger(__name__)


class AuditUnavailable(ApiError):
    def __init__(self):
        super().__init__(503, "audit_unavailable", "The audit trail cannot be written; try again later.",
                         headers={"Retry-After": str(RETRY_AFTER_SECONDS)})


def audited(action: str, resource_type: str):
    def decorator(view):
        @functools.wraps(view)
        def in_one_transaction(*args, **kwargs):
            with db.atomic():
                result = view(*args, **kwargs)
                if "api_key" in g:
                    _write(action, resource_type, _status(result))
            return result

        in_one_transaction._audit = (action, resource_type)
        return in_one_transaction

    return decorator


def target(resource_id=None, patient_id=None, *, patient_ids=None) -> None:
    """Name what the view touched when the URL does not (created rows, listed patients)."""
    if resource_id is not None:
        g.audit_resource_id = resource_id
    if patient_id is not None:
        g.audit_patient_id = patient_id
    if patient_ids is not None:
        g.audit_patient_ids = list(patient_ids)


def outcome(status: int) -> str:
    if status < 400:
        return "success"
    return {401: "denied", 403: "denied", 404: "not_found"}.get(status, "rejected" if status < 500 else "error")


def _status(result) -> int:
    if isinstance(result, Response):
        return result.status_code
    if isinstance(result, tuple) and len(result) > 1 and isinstance(result[1], int):
        return result[1]
    return 200


def _rows(action: str, resource_type: str, status: int) -> list[dict]:
    args = request.view_args or {}
    key = g.api_key
    common = {"at": utcnow(), "actor_key_id": key.id, "actor_prefix": key.prefix, "action": action,
              "resource_type": resource_type, "request_id": request_id(), "outcome": outcome(status)}
    if "audit_patient_ids" in g:  # a listing: one row per patient shown
        return [{**common, "resource_id": pid, "patient_id": pid} for pid in g.audit_patient_ids] or \
            [{**common, "resource_id": None, "patient_id": None}]
    patient_id = g.get("audit_patient_id", args.get("patient_id"))
    resource_id = g.get("audit_resource_id", args.get(f"{resource_type}_id"))
    return [{**common, "resource_id": resource_id, "patient_id": patient_id}]


def _write(action: str, resource_type: str, status: int) -> None:
    try:
        AuditEvent.insert_many(_rows(action, resource_type, status)).execute()
    except peewee.PeeweeException as exc:
        log.error("audit write failed", extra={"error_type": type(exc).__name__, "action": action})
        raise AuditUnavailable() from None
    g.audit_written = True


def record(response):
    """after_request hook: the row of a request whose view did not finish (an error answer)."""
    view = current_app.view_functions.get(request.endpoint) if request.endpoint else None
    spec = getattr(view, "_audit", None)
    if spec is None or "api_key" not in g or g.get("audit_written"):
        return response
    try:
        with db.atomic():
            _write(*spec, response.status_code)
    except (AuditUnavailable, peewee.PeeweeException):
        exc = AuditUnavailable()
        return error_response(exc.status, exc.code, exc.message, headers=exc.headers)
    return response
