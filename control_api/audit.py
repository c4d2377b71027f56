"""Audit trail: one row for every read or write of patient data, denied attempts included.

A view declares its action with @audited(...); the resource ids come from the URL (UUIDs) or
from `audit.target()` when the view creates or lists them. The row is written after the view
has answered, with the outcome taken from the status. If the row cannot be written the
response is replaced by a 503: no patient data leaves without its audit row.
"""
from __future__ import annotations

import logging

import peewee
from flask import current_app, g, request

from .errors import RETRY_AFTER_SECONDS, error_response, request_id
from .models import AuditEvent, utcnow

log = logging.getLogger(__name__)


def audited(action: str, resource_type: str):
    def decorator(view):
        view._audit = (action, resource_type)
        return view

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


def record(response):
    """after_request hook."""
    view = current_app.view_functions.get(request.endpoint) if request.endpoint else None
    spec = getattr(view, "_audit", None)
    if spec is None or "api_key" not in g:
        return response
    try:
        AuditEvent.insert_many(_rows(*spec, response.status_code)).execute()
    except peewee.PeeweeException as exc:
        log.error("audit write failed", extra={"error_type": type(exc).__name__, "action": spec[0]})
        return error_response(503, "audit_unavailable", "The audit trail cannot be written; try again later.",
                              headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
    return response
