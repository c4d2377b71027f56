"""Upload checks: what the bytes are (magic numbers, then Pillow), never the file name or the
declared type. The original bytes are stored as they came; nothing here re-encodes them."""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from handlers import image_limits

from .errors import ApiError


@dataclass(frozen=True)
class ImageInfo:
    format: str
    content_type: str
    width: int
    height: int


def sniff(data: bytes) -> tuple[str, str]:
    found = image_limits.sniff(data)
    if found is None:
        raise ApiError(415, "unsupported_media_type", "Send a JPEG, PNG or TIFF photograph.")
    return found


def _open_checked(data: bytes, fmt: str, decode: bool) -> tuple[int, int]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=[fmt]) as img:
                width, height = img.size
                problem = image_limits.size_problem(width, height)
                if problem:
                    raise ApiError(image_limits.SIZE_STATUS, *problem)
                if decode:
                    if fmt == "JPEG":
                        # Decoding at 1/8 scale still reads every byte of the scan: truncation shows
                        # up, at a fraction of a full decode's cost.
                        img.draft("RGB", (max(1, width // 8), max(1, height // 8)))
                    img.load()
    except ApiError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ApiError(image_limits.SIZE_STATUS, *image_limits.too_large()) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError):
        raise ApiError(422, "undecodable_image",
                       f"The file looks like {fmt} but cannot be decoded (truncated or corrupt?).") from None
    return width, height


def inspect(data: bytes) -> ImageInfo:
    """415 for anything but JPEG/PNG/TIFF; 422 for an unreadable header or a size out of range.

    Reads the header only. Decoding the pixels here would repeat TorchServe's work on every
    upload (its cost: docs/benchmarks/findings.md, "applied optimisations" 1): TorchServe
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
