"""A Grad-CAM overlay a clinician can read: the whole photograph at its own aspect, the map
drawn where the network looked, and a colour scale under it.

TorchServe's handler answers with the map at the network's layer resolution (4x4 to 10x10)
and the square crop of the photograph the network saw (`crop_box`, fractions of width and
height). Its own overlay is that crop at the input size (128-160 px), too small for a chart,
so the drawing happens here on the stored photograph.
"""
from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

LONG_SIDE = 1024     # the photograph is drawn at most this long on its longer side
ALPHA = 0.4          # how much of the colour shows over the retina
SCALE_HEIGHT = 56    # the colour-scale strip under the photograph


def _jet(values: np.ndarray) -> np.ndarray:
    """[0, 1] -> uint8 RGB on the 'jet' ramp (blue, cyan, yellow, red), as the handler draws it."""
    v = values[..., None]
    rgb = np.clip(np.concatenate([1.5 - np.abs(4 * v - 3), 1.5 - np.abs(4 * v - 2),
                                  1.5 - np.abs(4 * v - 1)], axis=-1), 0, 1)
    return (rgb * 255).astype(np.uint8)


def _photograph(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.draft("RGB", (LONG_SIDE, LONG_SIDE))  # JPEG: decode at a reduced scale, never 9 MP
    img = ImageOps.exif_transpose(img).convert("RGB")  # the handler's crop_box is after orientation
    img.thumbnail((LONG_SIDE, LONG_SIDE), Image.BICUBIC, reducing_gap=2.0)
    return img


def _heat(size: tuple[int, int], cam: np.ndarray, box: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """(map, retina) on the photograph's pixels: the map in [0, 1], and where it applies (the
    circle the network's crop was cut around)."""
    width, height = size
    left, top, right, bottom = box[0] * width, box[1] * height, box[2] * width, box[3] * height
    side_w, side_h = max(1, round(right - left)), max(1, round(bottom - top))
    peak = float(cam.max())
    cam = cam / peak if peak > 0 else cam  # an untrained model's maps can peak far below 1
    small = Image.fromarray(cam.astype(np.float32), mode="F")
    square = np.asarray(small.resize((side_w, side_h), Image.BILINEAR), dtype=np.float32)
    yy, xx = np.mgrid[0:side_h, 0:side_w]
    inside = ((xx + 0.5 - side_w / 2) / (side_w / 2)) ** 2 + ((yy + 0.5 - side_h / 2) / (side_h / 2)) ** 2 <= 1
    heat = np.zeros((height, width), dtype=np.float32)
    retina = np.zeros((height, width), dtype=bool)
    x0, y0 = round(left), round(top)
    # The crop may reach past the frame (black padding in the network's input): clip both.
    sx0, sy0 = max(0, -x0), max(0, -y0)
    dx0, dy0 = max(0, x0), max(0, y0)
    dx1, dy1 = min(width, x0 + side_w), min(height, y0 + side_h)
    if dx1 > dx0 and dy1 > dy0:
        heat[dy0:dy1, dx0:dx1] = square[sy0:sy0 + dy1 - dy0, sx0:sx0 + dx1 - dx0]
        retina[dy0:dy1, dx0:dx1] = inside[sy0:sy0 + dy1 - dy0, sx0:sx0 + dx1 - dx0]
    return np.clip(heat, 0, 1), retina


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType
        return ImageFont.load_default()


def _with_scale(picture: Image.Image, caption: str) -> Image.Image:
    """The picture with a horizontal colour scale under it: low (blue) to high (red) attention."""
    width, height = picture.size
    out = Image.new("RGB", (width, height + SCALE_HEIGHT), "white")
    out.paste(picture, (0, 0))
    margin, bar_h = 16, 14
    bar_w = max(10, width - 2 * margin)
    ramp = _jet(np.tile(np.linspace(0, 1, bar_w, dtype=np.float32), (bar_h, 1)))
    out.paste(Image.fromarray(ramp), (margin, height + 8))
    draw = ImageDraw.Draw(out)
    font = _font(15)
    y = height + 8 + bar_h + 4
    draw.text((margin, y), "low", fill="black", font=font)
    draw.text((margin + bar_w, y), "high", fill="black", font=font, anchor="ra")
    draw.text((width // 2, y), caption, fill="black", font=font, anchor="ma")
    return out


def overlay(photograph: bytes, explanation: dict) -> bytes:
    """PNG: the photograph (longer side at most LONG_SIDE) with the Grad-CAM map and its scale."""
    out = io.BytesIO()
    # zlib level 1: a quarter of the default's time for about a tenth more bytes
    overlay_image(photograph, explanation).save(out, format="PNG", compress_level=1)
    return out.getvalue()


def overlay_image(photograph: bytes, explanation: dict) -> Image.Image:
    """overlay() before PNG encoding (the PDF report embeds it as JPEG)."""
    caption = f"Grad-CAM: where the model looked for grade {explanation.get('target_grade')}"
    if explanation.get("map") is not None and explanation.get("crop_box") is not None:
        base = _photograph(photograph)
        heat, retina = _heat(base.size, np.asarray(explanation["map"], dtype=np.float32),
                             explanation["crop_box"])
        weight = (ALPHA * retina.astype(np.float32))[..., None]  # the whole scale shows, blue included
        mixed = np.asarray(base, dtype=np.float32) * (1 - weight) + _jet(heat).astype(np.float32) * weight
        picture = Image.fromarray(np.clip(mixed, 0, 255).astype(np.uint8))
    else:
        # A handler from before `map` and `crop_box`: its own overlay of the crop, enlarged.
        picture = Image.open(io.BytesIO(base64.b64decode(explanation["overlay_png_base64"]))).convert("RGB")
        picture = picture.resize((512, 512), Image.BICUBIC)
    return _with_scale(picture, caption)


def for_screening(screening, data: bytes | None = None, *, as_image: bool = False):
    """The overlay PNG of a graded photograph, explained by the model version that graded it.

    409 while it has no grading, 422 when it is ungradable (there is nothing to explain), 503
    when TorchServe is down (errors.py); the API and the PDF report both come here. `data`: the
    photograph's bytes when the caller has them already; `as_image`: a PIL image, not PNG bytes.
    """
    from .errors import ApiError
    from .storage import get_storage
    from .torchserve import ImageRejected, UnknownModelVersion, get_client

    grading = screening.latest_grading
    if grading is None:
        raise ApiError(409, "not_graded_yet", "This photograph has not been graded yet; try again later.")
    if not grading.gradable:
        raise ApiError(422, "ungradable_photograph",
                       "This photograph failed the quality gate, so it has no grade to explain.")
    if data is None:
        data = get_storage().get(screening.image_key, sha256=screening.image_sha256)
    try:
        answer = get_client().explain(data, screening.content_type, grading.model_version)
    except UnknownModelVersion:
        raise ApiError(409, "model_version_unavailable", "The model version that graded this photograph is no "
                       "longer registered; re-grade the photograph to explain its new grade.") from None
    except ImageRejected as exc:
        raise ApiError(422, exc.code, exc.message) from None
    if not answer.get("explanation"):
        raise ApiError(422, "ungradable_photograph",
                       "The model server found this photograph ungradable, so it has no grade to explain.")
    if as_image:
        return overlay_image(data, answer["explanation"])
    return overlay(data, answer["explanation"])
