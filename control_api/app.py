"""The application factory."""
from __future__ import annotations

import io
import logging
import os
import re
import time
import uuid

import flask
import flask_smorest
from flask import Flask, current_app, g, request
from flask_cors import CORS

from . import audit, auth, cli, errors, keepalive, logs, metrics, ratelimit, schemas
from . import shadow as shadow_mod
from . import storage as storage_mod
from . import torchserve as torchserve_mod
from .blueprints import audit as audit_bp
from .blueprints import console, docs, exams, health, patients, screenings, versions
from .blueprints import shadow as shadow_bp
from .db import bind, db
from .settings import Settings

log = logging.getLogger("control_api.requests")

REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"}
# Room for the multipart framing and form fields around an image of MAX_UPLOAD_BYTES.
MULTIPART_OVERHEAD = 64 * 1024
# Every body that is not a multipart upload (JSON: patients, re-grade requests). A JSON array of
# empty objects takes about 24 times its size in memory, so a 20 MiB one took ~500 MB a request.
JSON_BODY_LIMIT = 64 * 1024


class Request(flask.Request):
    """Multipart file parts stay in memory: the upload view reads the whole image anyway and
    MAX_CONTENT_LENGTH caps the body, so werkzeug's spooling of parts over 500 kB to a temporary
    file only added a file write and read to every photograph."""

    def _get_file_stream(self, total_content_length, content_type, filename=None, content_length=None):
        return io.BytesIO()

    def _get_stream_for_parsing(self):
        """A multipart body of known length is read in one call, then parsed from memory.

        werkzeug's parser reads 64 KiB at a time; under gunicorn every such read copied all
        the body gunicorn had already received ahead of it (twice), which cost 3-4 ms of CPU
        per 1 MB photograph. The `stream` property has already refused a Content-Length over
        MAX_CONTENT_LENGTH (413) before anything is read, and a client that stops sending
        short of its Content-Length still gets werkzeug's 400 (ClientDisconnected)."""
        if (getattr(self, "_cached_data", None) is None and self.mimetype == "multipart/form-data"
                and self.content_length):
            return io.BytesIO(self.stream.read(self.content_length))
        return super()._get_stream_for_parsing()


class Api(flask_smorest.Api):
    ERROR_SCHEMA = schemas.Error  # what errors.py answers, so the document matches

    def handle_http_exception(self, error):
        return errors.handle_http_exception(error)


def create_app(settings: Settings | None = None, *, storage=None, torchserve=None) -> Flask:
    """`storage` and `torchserve` replace the backends the settings name (tests pass fakes)."""
    settings = settings or Settings.from_env()
    logs.configure(settings.log_level)
    if settings.prometheus_multiproc_dir:
        # CLI commands import the app too, where gunicorn's on_starting has not made it.
        os.makedirs(settings.prometheus_multiproc_dir, exist_ok=True)
    app = Flask(__name__, static_folder=None)
    app.request_class = Request
    app.config.update(
        DEBUG=settings.debug,
        # Werkzeug refuses a larger Content-Length with 413 before reading the body.
        MAX_CONTENT_LENGTH=settings.max_upload_bytes + MULTIPART_OVERHEAD,
        API_TITLE="Clarity in Care API", API_VERSION="v1", OPENAPI_VERSION="3.0.3",
        OPENAPI_URL_PREFIX="/api/v1", OPENAPI_JSON_PATH="openapi.json",
                API_SPEC_OPTIONS={"info": {"description": (
            "Diabetic retinopathy screening. Grades come from a demo model trained on synthetic "
            "images: not for clinical use. See docs/api.md.")}},
    )
    app.extensions["clarity"] = {
        "settings": settings,
        "storage": storage or storage_mod.from_settings(settings),
        "torchserve": torchserve or torchserve_mod.from_settings(settings),
    }
    # The shadow thread has a client of its own: it must not take one of the in-flight slots
    # that keep gunicorn's threads from all waiting on TorchServe (tests inject a fake for both).
    app.extensions["clarity"]["shadow"] = shadow_mod.Shadow(
        torchserve or torchserve_mod.from_settings(settings, bounded=False), settings.shadow_queue_size,
        shadow_mod.marker_dir_for(settings.database_url))
    shadow_mod.init_app(app)
    bind(settings.database_url, settings.database_deadline_seconds)

    app.before_request(_start)
    app.before_request(_limit_body)
    app.before_request(auth.enforce)
    ratelimit.init_app(app, settings)  # after auth.enforce: the limit is counted per API key

    api = Api(app)
    api.spec.components.security_scheme("bearerAuth", {"type": "http", "scheme": "bearer"})
    for blueprint in (health.blp, patients.blp, exams.blp, screenings.blp, versions.blp, audit_bp.blp):
        api.register_blueprint(blueprint)
    api.register_blueprint(shadow_bp.blp)
    app.register_blueprint(docs.bp)  # not an API resource: left out of the OpenAPI document
    app.register_blueprint(console.bp)  # static files, outside the OpenAPI document
    errors.register(app)
    if settings.cors_origins:
        CORS(app, resources={r"/api/*": {"origins": list(settings.cors_origins)}},
             allow_headers=["Authorization", "Content-Type", "Idempotency-Key", "X-Request-ID"],
             expose_headers=["Location", "Retry-After", "X-Request-ID", "Idempotent-Replayed"], max_age=600)

    # after_request hooks run in reverse order: audit (may turn the answer into a 503),
    # then security headers, then the log line and metrics with the final status.
    app.after_request(_finish)
    app.after_request(_security_headers)
    app.after_request(audit.record)
    app.teardown_request(_close_db)
    cli.register(app)
    # Outermost: sees whether anything read the request body to its end (keepalive.py).
    app.wsgi_app = keepalive.CloseUnreadBodies(app.wsgi_app)
    return app


def _start():
    # The server's own id is the one in audit rows, error bodies, logs and X-Request-ID: a
    # client cannot make two requests share one, or pick the id an auditor will search for.
    # A well-formed client id is logged beside it (client_request_id) for correlation.
    g.request_id = uuid.uuid4().hex
    incoming = request.headers.get("X-Request-ID", "")
    if REQUEST_ID.match(incoming):
        g.client_request_id = incoming
    g.started = time.perf_counter()


def _limit_body():
    # Only photographs are large. They come as multipart/form-data, to routes marked with
    # @uploads (a raw image sent there gets its 422 "send a multipart form", not a 413); no
    # other route reads a multipart body (a JSON route answers 415 without reading it).
    # Werkzeug raises 413 as soon as a body is read past the limit, chunked bodies included.
    view = current_app.view_functions.get(request.endpoint) if request.endpoint else None
    if not getattr(view, "_uploads", False) and request.mimetype != "multipart/form-data":
        request.max_content_length = JSON_BODY_LIMIT


def _security_headers(response):
    headers = response.headers
    headers.setdefault("X-Content-Type-Options", "nosniff")
    headers.setdefault("X-Frame-Options", "DENY")
    headers.setdefault("Referrer-Policy", "no-referrer")
    if request.blueprint == "swagger_ui":  # the pinned Swagger UI files, from this origin only
        headers["Content-Security-Policy"] = docs.CSP
    else:
        headers.setdefault("Content-Security-Policy", "default-src 'none'; frame-ancestors 'none'")
        headers["Cache-Control"] = "no-store"
    return response


def _finish(response):
    response.headers["X-Request-ID"] = errors.request_id()
    route = request.url_rule.rule if request.url_rule else "<unmatched>"
    request.environ["clarity.route"] = route  # for gunicorn's access line (logs.GunicornLogger)
    method = request.method if request.method in METHODS else "OTHER"
    elapsed = time.perf_counter() - g.get("started", time.perf_counter())
    metrics.REQUESTS.labels(method, route, str(response.status_code)).inc()
    metrics.REQUEST_SECONDS.labels(method, route).observe(elapsed)
    key = g.get("api_key")
    log.info("request", extra={"method": method, "route": route, "status": response.status_code,
                               "duration_ms": round(elapsed * 1000, 2), "key_prefix": key.prefix if key else None,
                               "client_request_id": g.get("client_request_id")})
    return response


def _close_db(exc):
    if not db.is_closed():
        db.close()
