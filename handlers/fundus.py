"""Fundus photograph functions shared by the TorchServe handler and training.

decode -> find_disc -> assess_quality -> crop_disc -> to_tensor; `prepare` chains them.
Pure functions over Pillow, numpy and torch, so serving and training preprocess identically.
This file is imported as `handlers.fundus` in the repository and as `fundus` inside the .mar:
it must not import other project modules relatively. docs/preprocessing.md explains the choices.
"""
from __future__ import annotations

import io
import math
import time
import warnings
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps

# Inside a .mar every handler file is a top-level module: try that first so a worker runs the
# code it was archived with even when the repository is on PYTHONPATH too.
try:
    import image_limits
    import quality
except ImportError:
    from handlers import image_limits, quality

FIND_SIZE = 160                   # long side of the copy find_disc works on (~0.5% radius error)
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class ImageRejected(ValueError):
    """Input that is not a usable image; `status` is the HTTP status the caller should answer."""

    def __init__(self, code: str, status: int, message: str):
        super().__init__(message)
        self.code, self.status, self.message = code, status, message

    def to_dict(self) -> dict:
        return {"code": self.code, "message": self.message}


@dataclass(frozen=True)
class PreprocessConfig(quality.StoredConfig):
    input_size: int = 224
    ben_graham: bool = True        # subtract the local average colour (Ben Graham, Kaggle DR 2015)
    circular_mask: bool = True     # blank everything outside mask_radius * disc radius
    mask_radius: float = 0.95      # hides the dark rim of the disc
    mean: tuple = (0.485, 0.456, 0.406)   # ImageNet, as the pretrained backbones expect
    std: tuple = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Disc:
    """The round field of view; coordinates are pixels of the image it was found in."""

    cx: float
    cy: float
    r: float
    image_size: tuple          # (width, height) of that image
    fit: float                 # IoU of the bright region with the circle, inside the frame
    border: float              # brightness outside the circle relative to inside (0 = black)

    @property
    def bbox(self) -> tuple:
        """Square (left, top, right, bottom) around the circle; may reach outside the image.
        The handler reports it with an explanation, so a client can place the Grad-CAM map."""
        x0, y0, side, *_ = _crop_box(self.image_size, self)
        return (x0, y0, x0 + side, y0 + side)

    @property
    def cut_top(self) -> bool:
        return self.cy - self.r < 0

    @property
    def cut_bottom(self) -> bool:
        return self.cy + self.r > self.image_size[1]

    @property
    def visible_fraction(self) -> float:
        """Share of the circle's area that lies inside the frame."""
        return self._coverage[0]

    @property
    def area_fraction(self) -> float:
        """Share of the frame covered by the visible part of the circle."""
        return self._coverage[1]

    @cached_property
    def _coverage(self) -> tuple:
        """(visible share of the circle, share of the frame it covers), sampled on a 100 x 100 grid."""
        w, h = self.image_size
        t = (np.arange(100, dtype=np.float32) + 0.5) / 50 - 1
        x, y = self.cx + t * self.r, self.cy + t * self.r
        inside = t[None, :] ** 2 + t[:, None] ** 2 <= 1
        visible = inside & ((y >= 0) & (y < h))[:, None] & ((x >= 0) & (x < w))[None, :]
        share = float(visible.sum() / inside.sum())
        return share, share * math.pi * self.r ** 2 / (w * h)


@dataclass(frozen=True)
class Prepared:
    tensor: torch.Tensor | None   # float32 [3, S, S]; None when ungradable or not normalised
    quality: dict                 # {"gradable", "score", "reasons"}
    timings_ms: dict              # {"decode": ms, "preprocess": ms}
    display: Image.Image | None   # cropped RGB S x S (None when no disc was found)
    disc: Disc | None


# ---------------------------------------------------------------- decoding

def decode(data: bytes, *, min_side: int, max_pixels: int = image_limits.MAX_PIXELS) -> Image.Image:
    """Bytes -> RGB image, EXIF-oriented, shrunk while decoding so its shorter side stays >= min_side.

    JPEG is scaled in the DCT (draft mode), so a 9 MP photograph is never decoded at full size.
    Only the first frame of a multi-frame PNG/TIFF is used (TIFF keeps thumbnails as extra pages).
    """
    if not data:
        raise ImageRejected("empty_image", 400, "The request contained no image data.")
    fmt, _ = image_limits.sniff(data) or (None, None)
    if fmt is None:
        other = _identify(data)
        if other:
            raise ImageRejected("unsupported_format", 415,
                                f"{other} images are not accepted; send a JPEG, PNG or TIFF photograph.")
        raise ImageRejected("not_an_image", 415, "The data is not an image.")
    # Pillow's own bomb guard stays on; its warning becomes an error so that nothing gets decoded.
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data), formats=[fmt])
            _check_size(img.size, max_pixels)
            if fmt == "JPEG":
                img.draft("RGB", (min_side, min_side))
            img.load()  # lazy: truncation only shows here
            ImageOps.exif_transpose(img, in_place=True)
        except ImageRejected:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageRejected(*_with_status(image_limits.too_large(max_pixels))) from None
        except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, EOFError...
            if "truncated" in str(exc).lower() or isinstance(exc, EOFError):
                raise ImageRejected("truncated_image", 422,
                                    f"The {fmt} data ends early; the file is truncated.") from None
            raise ImageRejected("corrupt_image", 422, f"The {fmt} data could not be decoded.") from None
    img = _to_rgb(img)
    factor = min(img.size) // min_side
    if factor >= 2:  # PNG/TIFF have no draft mode and JPEG's stops at 1/8: a box reduction does the rest
        img = img.reduce(factor)
    return img


def _identify(data: bytes) -> str | None:
    """Name of another image format Pillow recognises in the header, to say 'unsupported'."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return Image.open(io.BytesIO(data)).format
    except Exception:
        return None


def _check_size(size: tuple, max_pixels: int) -> None:
    problem = image_limits.size_problem(*size, max_pixels)
    if problem:
        raise ImageRejected(*_with_status(problem))


def _with_status(problem: tuple[str, str]) -> tuple[str, int, str]:
    code, message = problem
    return code, image_limits.SIZE_STATUS, message


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in _SIXTEEN_BIT:  # Pillow's own conversion clips at 255 instead of scaling
        a = np.asarray(img)
        return Image.fromarray((np.clip(a, 0, 65535) // 257).astype(np.uint8)).convert("RGB")
    if img.mode == "F":
        raise ImageRejected("unsupported_format", 415, "Floating-point images are not accepted.")
    if img.has_transparency_data:  # transparent means 'not retina': composite on the black border
        rgba = img.convert("RGBA")
        out = Image.new("RGB", rgba.size)
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    try:
        return img.convert("RGB")
    except ValueError:  # e.g. LAB, which Pillow cannot convert
        raise ImageRejected("unsupported_format", 415, f"{img.mode} images are not accepted.") from None


# ---------------------------------------------------------------- the disc

def find_disc(img: Image.Image) -> Disc | None:
    """Fit a circle to the bright field of view; None when there is no bright region on a dark border.

    Works on a copy reduced to about FIND_SIZE pixels wide. The circle is fitted to the left/right end
    of every row and the top/bottom end of every column of the bright mask, skipping ends that touch the
    frame, so discs cut off at the top and bottom (the usual case) are measured from their curved sides.
    """
    factor = max(1, round(max(img.size) / FIND_SIZE))
    a = np.asarray(img.reduce(factor) if factor > 1 else img)
    v = np.maximum(np.maximum(a[:, :, 0], a[:, :, 1]), a[:, :, 2])  # much faster than ndarray.max(axis=2)
    lo, hi = np.searchsorted(np.bincount(v.ravel(), minlength=256).cumsum(), (0.05 * v.size, 0.9 * v.size))
    if hi - lo < 8:  # a uniform frame
        return None
    # opening (erode, dilate) removes JPEG speckle and text printed in the black border
    mask = ~quality.erode(~quality.erode(v > lo + 0.15 * (hi - lo), 2), 2)
    pts = _edge_points(mask)
    if len(pts) < 12:
        return None
    circle = _fit_circle(pts)
    if circle is None:
        return None
    cx, cy, r = circle
    h, w = mask.shape
    if not (2 < r < 4 * max(w, h)):  # a straight edge is not a disc
        return None
    yy, xx = np.ogrid[:h, :w]
    d2 = ((xx + 0.5 - cx) ** 2).astype(np.float32) + ((yy + 0.5 - cy) ** 2).astype(np.float32)
    inside = d2 <= r * r
    fit = float((mask & inside).sum() / max(1, (mask | inside).sum()))
    outside = d2 > (1.06 * r) ** 2
    core = v[d2 <= (0.9 * r) ** 2]
    border = 1.0  # no visible border is no evidence of one
    if outside.sum() > 0.01 * h * w and core.size:
        border = float(np.percentile(v[outside], 75) / max(1.0, float(np.median(core))))
    return Disc(cx * factor, cy * factor, r * factor, img.size, round(fit, 4), round(min(border, 1.0), 4))


def _edge_points(mask: np.ndarray) -> np.ndarray:
    """(x, y) boundary points of the mask at pixel edges, leaving out those on the frame."""
    h, w = mask.shape
    pts = []
    for m, flip in ((mask, False), (mask.T, True)):
        n = m.shape[1]
        has = m.any(axis=1)
        idx = np.nonzero(has)[0] + 0.5
        first = m.argmax(axis=1)[has]
        last = n - m[:, ::-1].argmax(axis=1)[has]
        for pos, keep in ((first, first > 0), (last, last < n)):
            p = np.stack([pos[keep].astype(float), idx[keep]], axis=1)
            pts.append(p[:, ::-1] if flip else p)
    return np.concatenate(pts)


def _fit_circle(pts: np.ndarray):
    """Algebraic (Kasa) circle fit, refitted after dropping outliers (camera notch, labels)."""
    keep = np.ones(len(pts), bool)
    for _ in range(4):
        x, y = pts[keep, 0], pts[keep, 1]
        a = np.stack([x, y, np.ones_like(x)], axis=1)
        sol, *_ = np.linalg.lstsq(a, -(x * x + y * y), rcond=None)
        cx, cy = -sol[0] / 2, -sol[1] / 2
        r2 = cx * cx + cy * cy - sol[2]
        if not np.isfinite(r2) or r2 <= 0:
            return None
        r = math.sqrt(r2)
        res = np.abs(np.hypot(pts[:, 0] - cx, pts[:, 1] - cy) - r)
        mad = np.median(res[keep])
        new = res <= max(1.5, 4 * 1.4826 * mad)
        if new.sum() < 12 or (new == keep).all():
            break
        keep = new
    return cx, cy, r


# ---------------------------------------------------------------- crop and tensor

def crop_disc(img: Image.Image, disc: Disc, size: int) -> Image.Image:
    """Square crop around the disc resized to size x size, black where the disc leaves the frame.
    `disc` may have been found on a resized copy of `img`."""
    x0, y0, side, *_ = _crop_box(img.size, disc)
    # BOX is an exact area average when shrinking and a third cheaper than BILINEAR
    return img.crop((x0, y0, x0 + side, y0 + side)).resize(
        (size, size), Image.BOX if side >= size else Image.BILINEAR)


def retina_mask(img_size: tuple, disc: Disc, size: int, radius: float | None = 1.0) -> np.ndarray:
    """Bool [size, size] for crop_disc's output: True inside the frame and, unless radius is None,
    inside radius x the disc radius. Training augmenting a crop applies the same geometry to it."""
    x0, y0, side, cx, cy, r = _crop_box(img_size, disc)
    edges = np.arange(size + 1, dtype=np.float32) * (side / size)  # output pixel edges, in source pixels
    # whole footprint inside the frame: a pixel half made of black padding is not retina
    in_x = (edges[:-1] + x0 >= 0) & (edges[1:] + x0 <= img_size[0])
    in_y = (edges[:-1] + y0 >= 0) & (edges[1:] + y0 <= img_size[1])
    mask = in_y[:, None] & in_x[None, :]
    if radius is not None:
        c = (edges[:-1] + edges[1:]) / 2
        mask &= ((c + x0 - cx) ** 2)[None, :] + ((c + y0 - cy) ** 2)[:, None] <= (radius * r) ** 2
    return mask


def _crop_box(img_size: tuple, disc: Disc) -> tuple:
    """(x0, y0, side, cx, cy, r) in pixels of an image of img_size (the disc scaled to it)."""
    s = img_size[0] / disc.image_size[0]
    cx, cy, r = disc.cx * s, disc.cy * s, disc.r * s
    return round(cx - r), round(cy - r), max(1, round(2 * r)), cx, cy, r


def to_tensor(rgb: Image.Image, mask: np.ndarray, cfg: PreprocessConfig) -> torch.Tensor:
    """RGB crop -> normalised float32 [3, S, S]; pixels outside the mask become neutral."""
    a = _planes(rgb)  # channel planes throughout: numpy is slow on a trailing axis of length 3
    mask = np.asarray(mask, dtype=bool)  # `~` on a 0/255 uint8 mask would be a bitwise not
    fill = 0.0
    if cfg.ben_graham:
        # 4 * (img - local mean) + 128 with sigma = radius / 30. The local mean is taken over the retina
        # only (normalised convolution), so the rim and the cut edges leave no bright halo. It is
        # smooth, so it is computed at half resolution (within 2 grey levels of full, half the time).
        mask_l = Image.fromarray(mask).convert("L")
        retina = Image.new("RGB", rgb.size)
        retina.paste(rgb, mask=mask_l)
        local = _planes(_smooth(retina, rgb.width / 60))
        local *= 255.0 / np.maximum(np.asarray(_smooth(mask_l, rgb.width / 60), np.float32), 1.0)
        a -= local
        a *= 4.0
        a += 128.0
        np.clip(a, 0.0, 255.0, out=a)
        fill = 128.0
    mean, std = (np.asarray(v, np.float32)[:, None, None] for v in (cfg.mean, cfg.std))
    a *= 1.0 / (255.0 * std)
    a -= mean / std
    np.copyto(a, (fill / 255.0 - mean) / std, where=~mask)
    return torch.from_numpy(a)


def _smooth(img: Image.Image, sigma: float) -> Image.Image:
    """Gaussian blur computed on a half-size copy and scaled back."""
    return img.reduce(2).filter(ImageFilter.GaussianBlur(sigma / 2)).resize(img.size, Image.BILINEAR)


def _planes(img: Image.Image) -> np.ndarray:
    """RGB image -> float32 [3, H, W], contiguous."""
    return np.ascontiguousarray(np.asarray(img).transpose(2, 0, 1), dtype=np.float32)


def preprocess_image(img: Image.Image, disc: Disc, cfg: PreprocessConfig, *,
                     crop: Image.Image | None = None):
    """(tensor [3, S, S], display RGB S x S) for a decoded image and its disc.
    `crop` reuses crop_disc(img, disc, cfg.input_size) when the caller already has it."""
    rgb = crop if crop is not None else crop_disc(img, disc, cfg.input_size)
    return to_tensor(rgb, input_mask(img.size, disc, cfg), cfg), rgb


def input_mask(img_size: tuple, disc: Disc, cfg: PreprocessConfig) -> np.ndarray:
    """retina_mask of the model input crop_disc(img, disc, cfg.input_size), as cfg masks it."""
    return retina_mask(img_size, disc, cfg.input_size, cfg.mask_radius if cfg.circular_mask else None)


# ---------------------------------------------------------------- quality and the whole chain

def assess_quality(img: Image.Image, disc: Disc | None,
                   thresholds: quality.QualityThresholds = quality.QualityThresholds(), *,
                   crop: Image.Image | None = None) -> dict:
    """{"gradable", "score", "reasons"}; see handlers/quality.py and docs/preprocessing.md.
    `crop` reuses crop_disc(img, disc, quality.ANALYSIS_SIZE) when the caller already has it."""
    return quality.verdict(quality_metrics(img, disc, crop=crop) if disc else None, thresholds)


def quality_metrics(img: Image.Image, disc: Disc, *, crop: Image.Image | None = None) -> dict:
    """The measurements assess_quality judges, by name (for tests, tuning and the docs)."""
    size = quality.ANALYSIS_SIZE
    rgb = crop if crop is not None else crop_disc(img, disc, size)
    return quality.measure(rgb, retina_mask(img.size, disc, size, quality.ANALYSIS_RADIUS), disc)


def prepare(data: bytes, cfg: PreprocessConfig = PreprocessConfig(),
            thresholds: quality.QualityThresholds = quality.QualityThresholds(), *, normalise: bool = True) -> Prepared:
    """decode -> find disc -> quality -> crop/resize/normalise, timed; raises ImageRejected.
    normalise=False stops at the crop (tensor None) for training, which augments it first."""
    t0 = time.perf_counter()
    img = decode(data, min_side=max(cfg.input_size, quality.ANALYSIS_SIZE))
    t1 = time.perf_counter()
    disc = find_disc(img)
    tensor = display = None
    if disc is None:
        verdict = assess_quality(img, None, thresholds)
    else:
        display = crop_disc(img, disc, cfg.input_size)
        shared = display if cfg.input_size == quality.ANALYSIS_SIZE else None
        verdict = assess_quality(img, disc, thresholds, crop=shared)
        if verdict["gradable"] and normalise:
            tensor, _ = preprocess_image(img, disc, cfg, crop=display)
    t2 = time.perf_counter()
    timings = {"decode": round((t1 - t0) * 1000, 2), "preprocess": round((t2 - t1) * 1000, 2)}
    return Prepared(tensor, verdict, timings, display, disc)
