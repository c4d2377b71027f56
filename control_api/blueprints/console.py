"""The clinician console at /console: static files only (HTML, ES modules, CSS), no build step.

The page renders nothing on the server: it talks to /api/v1 with the key the user pastes, as a
clinic's own frontend would, so it is also a working example of the API. Its own
Content-Security-Policy allows the API's origin and nothing else: photographs, overlays and
downloads are fetched with the key and shown through blob: URLs the page makes itself.
"""
from __future__ import annotations

from pathlib import Path

from flask import Blueprint, send_from_directory

from ..auth import public

STATIC = Path(__file__).resolve().parent.parent / "console"

CSP = "; ".join((
    "default-src 'none'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self' blob:",
    "connect-src 'self'",
    "base-uri 'none'",
    "form-action 'none'",
    "frame-ancestors 'none'",
))

bp = Blueprint("console", __name__, url_prefix="/console")


@bp.after_request
def _policy(response):
    # Runs before the app's _security_headers, whose setdefault then keeps this policy.
    response.headers["Content-Security-Policy"] = CSP
    return response


@bp.route("", methods=["GET"])
@public
def root():
    return index()  # the page names its assets by absolute path, so no redirect is needed


@bp.route("/", methods=["GET"])
@public
def index():
    return send_from_directory(STATIC, "index.html")


@bp.route("/<path:name>", methods=["GET"])
@public
def asset(name):
    return send_from_directory(STATIC, name)
