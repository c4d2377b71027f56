"""JSON log lines, each carrying the request id. Never log patient fields: log ids instead."""
from __future__ import annotations

import logging
import sys

from flask import g, has_request_context
from gunicorn.glogging import Logger as _GunicornLogger
from pythonjsonlogger.json import JsonFormatter

FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = g.get("request_id", "-") if has_request_context() else "-"
        return True


def formatter() -> logging.Formatter:
    return JsonFormatter(FORMAT, rename_fields={"levelname": "level", "asctime": "time"},
                         datefmt="%Y-%m-%dT%H:%M:%S%z")


def configure(level: str = "INFO") -> None:
    """Send every logger's records to stderr as JSON (idempotent: tests build many apps)."""
    root = logging.getLogger()
    handler = next((h for h in root.handlers if getattr(h, "_clarity", False)), None)
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler._clarity = True
        handler.setFormatter(formatter())
        handler.addFilter(RequestIdFilter())
        root.addHandler(handler)
    root.setLevel(level.upper())
    # Werkzeug's own request lines would repeat ours, with raw paths and query strings.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    # Even at LOG_LEVEL=DEBUG: peewee's debug lines carry SQL parameters (names, birth dates,
    # record numbers) and botocore's carry whole requests.
    for name in ("peewee", "botocore", "boto3", "s3transfer", "urllib3"):
        logging.getLogger(name).setLevel(max(logging.INFO, root.level))


class GunicornLogger(_GunicornLogger):
    """gunicorn's error and access logs as JSON; the access line has the path without the
    query string (cursors and filters stay out of logs) and the response's X-Request-ID.

    The path is client input: only one the app matched to a route (route words and UUIDs) is
    logged. Any other (a 404, or a request gunicorn refused itself) is logged as <unmatched>,
    since a client may have put a name or record number in it."""

    def setup(self, cfg):
        super().setup(cfg)
        for log in (self.error_log, self.access_log):
            for handler in log.handlers:
                handler.setFormatter(formatter())

    def warning(self, msg, *args, **kwargs):
        # gunicorn quotes the offending request line or header of a malformed request, which is
        # client input; keep what kind of error it was and drop the quote.
        if isinstance(msg, str) and msg.startswith("Invalid request from ip="):
            msg = ": ".join(msg.split(": ")[:2])
        super().warning(msg, *args, **kwargs)

    def access(self, resp, req, environ, request_time):
        if not self.access_log_enabled:
            return
        headers = dict((k.lower(), v) for k, v in (resp.headers or []))
        route = environ.get("clarity.route", "<unmatched>")
        status = resp.status.split(None, 1)[0] if isinstance(resp.status, str) else resp.status
        self.access_log.info("access", extra={
            "request_id": headers.get("x-request-id", "-"),
            "method": environ.get("REQUEST_METHOD"),
            "path": environ.get("PATH_INFO") if route != "<unmatched>" else route,
            "route": route,
            "status": int(status),
            "bytes": getattr(resp, "sent", None),
            "duration_ms": round(request_time.total_seconds() * 1000, 2),
            "remote": environ.get("REMOTE_ADDR"),
        })
