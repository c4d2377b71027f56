"""Upload checks: what the bytes are (magic numbers, then Pillow), never the file name or the
declared type. The original bytes are stored as they came; nothing here re-encodes them."""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from .errors import ApiError

# Magic numbers -> (Pillow format, content type we store and send on).
SIGNATURES = (
    (b"\xff\xd8\xff", "JPEG", "image/jpeg"),
    (b"\x89PNG\r\n\x1a\n", "PNG", "image/png"),
    (b"II*\x00", "TIFF", "image/tiff"),
    (b"MM\x00*", "TIFF", "image/tiff"),
)
# Fundus cameras top out around 24 MP; anything far beyond is a decompression bomb.
MAX_PIXELS = 60_000_000
MIN_SIDE = 64


@dataclass(frozen=True)
class ImageInfo:
    format: str
    content_type: str
    width: int
    height: int


def sniff(data: bytes) -> tuple[str, str]:
    for magic, fmt, content_type in SIGNATURES:
        if data.startswith(magic):
            return fmt, content_type
    raise ApiError(415, "unsupported_media_type", "Send a JPEG, PNG or TIFF photograph.")


def _open_checked(data: bytes, fmt: str, decode: bool) -> tuple[int, int]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=[fmt]) as img:
                width, height = img.size
                if width * height > MAX_PIXELS:
                    raise ApiError(422, "image_too_large", f"The image has more than {MAX_PIXELS} pixels.")
                if min(width, height) < MIN_SIDE:
                    raise ApiError(422, "image_too_small", f"The image is smaller than {MIN_SIDE} pixels a side.")
                if decode:
                    if fmt == "JPEG":
                        # Decoding at 1/8 scale still reads every byte of the scan: truncation shows
                        # up, at a fraction of a full decode's cost.
                        img.draft("RGB", (max(1, width // 8), max(1, height // 8)))
                    img.load()
    except ApiError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ApiError(422, "image_too_large", f"The image has more than {MAX_PIXELS} pixels.") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError):
        raise ApiError(422, "undecodable_image",
                       f"The file looks like {fmt} but cannot be decoded (truncated or corrupt?).") from None
    return width, height


def inspect(data: bytes) -> ImageInfo:
    """415 for anything but JPEG/PNG/TIFF; 422 for an unreadable header or a size out of range.

    Reads the header only. Decoding the pixels here would repeat TorchServe's work on every
    upload (19-22 ms for a 10 MP JPEG, 333 ms for a 9 MP PNG; docs/benchmarks/findings.md): TorchServe
    decodes each image it grades and rejects what it cannot read, and the upload then removes
    what it stored. `verify_decodable` covers the case where TorchServe cannot answer."""
    if not data:
        raise ApiError(422, "empty_image", "The image file is empty.")
    fmt, content_type = sniff(data)
    width, height = _open_checked(data, fmt, decode=False)
    return ImageInfo(fmt, content_type, width, height)


def verify_decodable(data: bytes, info: ImageInfo) -> None:
    """422 unless Pillow decodes the pixels: run before keeping an upload that no model has read."""
    _open_checked(data, info.format, decode=True)
