"""The control API with one proposed change applied in-process, for before/after benchmark cells.

    gunicorn -c gunicorn.conf.py scripts.bench_app:app

The change: `control_api.images.inspect` reads only the image header (format, size, the same
4xx answers for unknown formats and bad sizes) instead of decoding the whole image. A JPEG is
decoded at 1/8 scale and a PNG in full today, only to notice truncation early; TorchServe's handler
decodes the image anyway and answers 422 truncated_image/corrupt_image, which the upload already
turns into a 422 with the row and the object removed. Nothing else differs from control_api.wsgi.
"""
from __future__ import annotations

import io
import warnings

from PIL import Image

from control_api import images
from control_api.errors import ApiError


def inspect_header(data: bytes) -> images.ImageInfo:
    if not data:
        raise ApiError(422, "empty_image", "The image file is empty.")
    fmt, content_type = images.sniff(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=[fmt]) as img:
                width, height = img.size
    except Exception:
        raise ApiError(422, "undecodable_image",
                       f"The file looks like {fmt} but cannot be decoded (truncated or corrupt?).") from None
    if width * height > images.MAX_PIXELS:
        raise ApiError(422, "image_too_large", f"The image has more than {images.MAX_PIXELS} pixels.")
    if min(width, height) < images.MIN_SIDE:
        raise ApiError(422, "image_too_small", f"The image is smaller than {images.MIN_SIDE} pixels a side.")
    return images.ImageInfo(fmt, content_type, width, height)


images.inspect = inspect_header  # the blueprint calls images.inspect(...) at request time

from control_api.wsgi import app  # noqa: E402  (after the patch, on purpose)

__all__ = ["app", "inspect_header"]
