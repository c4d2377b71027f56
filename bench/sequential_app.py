"""The control API as it was before issue 14's upload changes, for before/after cells in one run.

    gunicorn -c gunicorn.conf.py bench.sequential_app:app

Built from the API's own code with three things put back:
- TorchServe is asked only after the object is stored and the row written (no `ask_early`);
- werkzeug's default stream factory, which spools file parts over 500 kB to a temporary file;
- no fsync of the image directory after the rename (the local backend).
The result cache stays: the benchmark's uploads carry unique bytes, so it never answers.
"""
from __future__ import annotations

import flask

from control_api import storage
from control_api import upload

upload.ask_early = lambda *args, **kwargs: None  # the view looks the name up per call
storage._fsync_dir = lambda path: None

from control_api.wsgi import app  # noqa: E402  (after the patches, on purpose)

app.request_class = flask.Request

__all__ = ["app"]
