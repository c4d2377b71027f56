"""One blueprint per resource. They share a Blueprint class that understands multipart
uploads: form fields and files validated by one schema and documented as one request body."""
from __future__ import annotations

import flask_smorest
from webargs.flaskparser import FlaskParser, abort, is_json_request
from webargs.multidictproxy import MultiDictProxy
from werkzeug.datastructures import CombinedMultiDict

from ..errors import ApiError


class Parser(FlaskParser):
    __location_map__ = {**FlaskParser.__location_map__, "multipart": "load_multipart"}
    # Unknown multipart fields and query parameters are an error, as in JSON bodies (None: the
    # schema's RAISE). A mistyped filter such as ?patient= must not quietly list everything.
    DEFAULT_UNKNOWN_BY_LOCATION = {**FlaskParser.DEFAULT_UNKNOWN_BY_LOCATION, "multipart": None, "query": None}

    def load_multipart(self, req, schema):
        return MultiDictProxy(CombinedMultiDict([req.form, req.files]), schema)

    def _raw_load_json(self, req):
        if not is_json_request(req) and req.content_length:
            # webargs would ignore the body and report every required field as missing.
            raise ApiError(415, "unsupported_media_type", "Send the body as JSON (Content-Type: application/json).")
        limit = req.max_content_length
        if req.content_length is None and limit is not None and len(req.get_data(cache=True)) >= limit:
            # A chunked body: Werkzeug stops reading at the limit without an error, which
            # would be parsed as truncated JSON (400) rather than refused as too large.
            raise ApiError(413, "payload_too_large", "The request body is larger than the limit.")
        try:
            return super()._raw_load_json(req)
        except RecursionError:  # json.loads recurses once per level of nesting
            abort(400, messages={"json": ["The JSON body is nested too deeply."]})


class Blueprint(flask_smorest.Blueprint):
    ARGUMENTS_PARSER = Parser()
    DEFAULT_LOCATION_CONTENT_TYPE_MAPPING = {
        **flask_smorest.Blueprint.DEFAULT_LOCATION_CONTENT_TYPE_MAPPING,
        "multipart": "multipart/form-data",
    }


def uploads(view):
    """The view takes an image upload: its body may reach MAX_UPLOAD_BYTES plus the multipart
    framing. Every other route reads at most app.JSON_BODY_LIMIT (64 KiB)."""
    view._uploads = True
    return view
