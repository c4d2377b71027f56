"""The Swagger UI page, from the copy of swagger-ui-dist in control_api/static/swagger-ui/.

Staff paste API keys into this page, on the API's own origin, so it runs no script from
elsewhere: the files are pinned in the repository (VERSION lists their SHA-256), served from
here, and the page's Content-Security-Policy (app.py) allows scripts and styles from this
origin only. It also works in a clinic without Internet access.
"""
from __future__ import annotations

from pathlib import Path

from flask import Blueprint, Response, abort, send_from_directory

from ..auth import public

STATIC = Path(__file__).resolve().parent.parent / "static" / "swagger-ui"
FILES = {"swagger-ui-bundle.js", "swagger-ui.css", "init.js"}
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; font-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'")

bp = Blueprint("swagger_ui", __name__, url_prefix="/api/v1/docs")

PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>Clarity in Care API</title>
  <link rel="stylesheet" href="/api/v1/docs/swagger-ui.css">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="/api/v1/docs/swagger-ui-bundle.js"></script>
  <script src="/api/v1/docs/init.js"></script>
</body>
</html>
"""


@bp.route("", methods=["GET"])
@public
def page():
    return Response(PAGE, mimetype="text/html")


@bp.route("/<name>", methods=["GET"])
@public
def asset(name: str):
    if name not in FILES:
        abort(404)
    response = send_from_directory(STATIC, name, max_age=3600)
    return response
