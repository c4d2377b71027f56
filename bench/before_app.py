"""The control API as it was before the header-only image check, for before/after benchmark cells.

    gunicorn -c gunicorn.conf.py bench.before_app:app

Until commit 8c20c3e, `control_api.images.inspect` decoded every upload to notice truncation
before storing it: a JPEG at 1/8 scale (draft mode), a PNG in full. Now it reads the header only,
TorchServe's handler decodes the image anyway (and answers 422 for a broken one, which removes
the upload), and `images.verify_decodable` decodes only when TorchServe cannot answer. This app
puts the old behaviour back, built from the API's own functions rather than a copy of them:
the header check, then `verify_decodable` on every upload. The only extra cost over the old code
is a second `Image.open` of the header (microseconds). Nothing else differs from control_api.wsgi.
"""
from __future__ import annotations

from control_api import images

_header_only = images.inspect


def inspect_and_decode(data: bytes) -> images.ImageInfo:
    info = _header_only(data)
    images.verify_decodable(data, info)
    return info


images.inspect = inspect_and_decode  # the blueprint calls images.inspect(...) at request time

from control_api.wsgi import app  # noqa: E402  (after the patch, on purpose)

__all__ = ["app", "inspect_and_decode"]
