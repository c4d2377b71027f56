"""What a photograph must be before anything decodes it, for the API's upload check
(control_api/images.py) and the model server's decode (handlers/fundus.py) alike: the formats,
sniffed from the bytes, and the pixel limits with the one answer each gets.

Standard library only: the API image carries no torch. Inside a .mar this file is the top-level
module `image_limits`, like its siblings.
"""
from __future__ import annotations

# Magic numbers -> (Pillow format, content type). Never the file name or the declared type.
SIGNATURES = (
    (b"\xff\xd8\xff", "JPEG", "image/jpeg"),
    (b"\x89PNG\r\n\x1a\n", "PNG", "image/png"),
    (b"II*\x00", "TIFF", "image/tiff"),
    (b"MM\x00*", "TIFF", "image/tiff"),
)
# Fundus cameras give 5-24 MP; far beyond is a decompression bomb (a 40000x40000 header).
MAX_PIXELS = 60_000_000
# Below this there is nothing to grade.
MIN_SIDE = 64
# A size out of range is a photograph that cannot be used, in a well-formed request: 422, from
# the API and the model server alike. (413 is the API's answer to a body over MAX_UPLOAD_BYTES.)
SIZE_STATUS = 422


def sniff(data: bytes) -> tuple[str, str] | None:
    """(Pillow format, content type) of an accepted format, else None."""
    return next(((fmt, content_type) for magic, fmt, content_type in SIGNATURES if data.startswith(magic)), None)


def too_large(max_pixels: int = MAX_PIXELS) -> tuple[str, str]:
    """(code, message) for an image over the pixel limit (or one Pillow's bomb guard stops)."""
    return "image_too_large", f"The image has more than {max_pixels:,} pixels."


def size_problem(width: int, height: int, max_pixels: int = MAX_PIXELS) -> tuple[str, str] | None:
    """(code, message) when the size is out of range, else None; the status is SIZE_STATUS."""
    if width * height > max_pixels:
        return too_large(max_pixels)
    if min(width, height) < MIN_SIDE:
        return "image_too_small", (f"The image is {width}x{height} pixels; at least {MIN_SIDE} pixels "
                                   "per side are needed.")
    return None
