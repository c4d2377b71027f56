"""Every error is JSON: {"error": {"code", "message", "request_id"}} with the right status.

Dependencies being down (database, storage, TorchServe) answer 503, never 500. Messages
and log lines name ids and error types only: database errors can quote row values (a unique
violation on PostgreSQL quotes the medical record number), so their text is never echoed.
"""
from __future__ import annotations

import logging
import traceback
import uuid

import peewee
from flask import g, jsonify
from werkzeug.exceptions import HTTPException

from .storage import ObjectMissing, StorageError, StorageUnavailable
from .torchserve import TorchServeUnavailable

log = logging.getLogger(__name__)

RETRY_AFTER_SECONDS = 30


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, *, headers: dict | None = None,
                 details=None):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = headers or {}
        self.details = details


def request_id() -> str:
    if "request_id" not in g:
        g.request_id = uuid.uuid4().hex
    return g.request_id


def error_response(status: int, code: str, message: str, *, headers: dict | None = None, details=None,
                   extra: dict | None = None):
    body = {"code": code, "message": message, "request_id": request_id()}
    if details is not None:
        body["details"] = details
    response = jsonify({"error": body, **(extra or {})})
    response.status_code = status
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def _code(exc: HTTPException) -> str:
    return (exc.name or "error").lower().replace(" ", "_").replace("'", "")


def handle_http_exception(exc: HTTPException):
    data = getattr(exc, "data", None) or {}
    headers = dict(data.get("headers") or {})
    if exc.code == 405 and exc.valid_methods:
        headers["Allow"] = ", ".join(exc.valid_methods)
    details = data.get("messages") or data.get("errors")
    if exc.code == 413:
        return error_response(413, "payload_too_large", "The request body is larger than the limit.",
                              headers=headers)
    if exc.code == 429:
        from .ratelimit import seconds_until_reset

        headers["Retry-After"] = str(seconds_until_reset())
        return error_response(429, "rate_limited", f"Rate limit exceeded ({exc.description}).",
                              headers=headers)
    if details is not None:
        # webargs/marshmallow validation: say which fields are wrong (never echoes values).
        return error_response(exc.code, "invalid_request", "The request is not valid.",
                              headers=headers, details=details)
    message = data.get("message") or exc.description or exc.name
    return error_response(exc.code or 500, _code(exc), message, headers=headers)


def handle_api_error(exc: ApiError):
    return error_response(exc.status, exc.code, exc.message, headers=exc.headers, details=exc.details)


def handle_database_error(exc: peewee.DatabaseError):
    if isinstance(exc, (peewee.OperationalError, peewee.InterfaceError)):
        log.error("database unavailable", extra={"error_type": type(exc).__name__})
        return error_response(503, "database_unavailable", "The database is unavailable; try again later.",
                              headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
    log.error("database error", extra={"error_type": type(exc).__name__,
                                       "pgcode": getattr(getattr(exc, "orig", None), "pgcode", None)})
    return error_response(500, "internal_error", "Internal error.")


def handle_storage_error(exc: StorageError):
    log.error("storage error", extra={"error_type": type(exc).__name__, "detail": str(exc)})
    if isinstance(exc, StorageUnavailable):
        return error_response(503, exc.code, "Image storage is unavailable; try again later.",
                              headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
    if isinstance(exc, ObjectMissing):
        return error_response(404, exc.code, "The stored image is missing.")
    return error_response(500, exc.code, "The stored image failed its integrity check.")


def handle_torchserve_unavailable(exc: TorchServeUnavailable):
    log.warning("torchserve unavailable", extra={"detail": str(exc)})
    return error_response(503, "model_server_unavailable", "The model server is unavailable; try again later.",
                          headers={"Retry-After": str(RETRY_AFTER_SECONDS)})


def handle_unexpected(exc: Exception):
    # The type and traceback, not str(exc): exception text may quote request data.
    log.error("unhandled exception", extra={"error_type": type(exc).__name__,
                                            "traceback": traceback.format_tb(exc.__traceback__)})
    return error_response(500, "internal_error", "Internal error.")


def register(app) -> None:
    app.register_error_handler(HTTPException, handle_http_exception)
    app.register_error_handler(ApiError, handle_api_error)
    app.register_error_handler(peewee.DatabaseError, handle_database_error)
    app.register_error_handler(peewee.InterfaceError, handle_database_error)
    app.register_error_handler(StorageError, handle_storage_error)
    app.register_error_handler(TorchServeUnavailable, handle_torchserve_unavailable)
    app.register_error_handler(Exception, handle_unexpected)
