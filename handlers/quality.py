"""Image-quality gate for fundus photographs: its thresholds (QualityThresholds), the metrics on a
fixed-size disc crop, and the verdict.

Used through handlers/fundus.py (`assess_quality`, `prepare`). The metrics are measured on the disc
resized to ANALYSIS_SIZE, so the verdict does not depend on the size of the source image.
docs/preprocessing.md explains each metric and how the thresholds were chosen.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np
from PIL import Image, ImageFilter

ANALYSIS_SIZE = 224      # disc diameter, in pixels, at which quality is measured (= the usual
                         # model input, so prepare() crops once)
ANALYSIS_RADIUS = 0.9    # measure inside 0.9 r: the rim is dark on every camera


class StoredConfig:
    """to_dict/from_dict for the frozen configs stored in checkpoints and model_meta.json (these
    thresholds and fundus.PreprocessConfig; it lives here as fundus imports this module)."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None):
        d = dict(d or {})
        known = {f.name: f for f in fields(cls)}
        unknown = set(d) - set(known)
        if unknown:  # a silently ignored setting would preprocess differently from training
            raise ValueError(f"unknown {cls.__name__} keys: {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


@dataclass(frozen=True)
class QualityThresholds(StoredConfig):
    """Limits of the quality gate (the fields _CHECKS names); docs/preprocessing.md says how they were set."""

    min_disc_fit: float = 0.85        # no_fundus_detected: IoU of the bright region with the circle
    max_border: float = 0.25          # no_fundus_detected: brightness outside the circle / inside
    min_retina_visible: float = 0.5   # too_little_retina: share of the disc inside the frame
    min_retina_area: float = 0.25     # too_little_retina: share of the frame covered by retina
    min_brightness: float = 0.10      # too_dark: mean luminance of the retina, 0..1
    max_brightness: float = 0.75      # overexposed: mean luminance of the retina, 0..1
    max_saturated: float = 0.15       # overexposed: share of the retina at luminance >= 0.96
    min_red_dominance: float = 1.15   # not_fundus_colour: mean R / max(mean G, mean B)
    min_sharpness: float = 0.20       # blurred: std of the Laplacian of green / std of green
    min_contrast: float = 0.11        # low_contrast: std / mean of green


# Checks run in stages; a failing stage stops the later ones, whose measurements would not mean
# anything (the colour of a black frame, the sharpness of a sliver). Within a stage every failure
# is reported, one reason per code. `span` is the distance from the threshold at which a metric's
# share of the score reaches 0 or 1; it shapes the score only, never the verdict.
# (stage, code, metric, threshold field, span, message)
_CHECKS = (
    (1, "no_fundus_detected", "fit", "min_disc_fit", 0.10,
     "No fundus found: the bright region is not round ({v:.2f} overlap with a circle, {t:.2f} needed)."),
    (1, "no_fundus_detected", "border", "max_border", 0.20,
     "No fundus found: the image should show a round retina on a dark border."),
    (2, "too_little_retina", "retina_visible", "min_retina_visible", 0.30,
     "Too little retina: {v:.0%} of the fundus disc is inside the frame ({t:.0%} needed)."),
    (2, "too_little_retina", "retina_area", "min_retina_area", 0.25,
     "Too little retina: it covers {v:.0%} of the frame ({t:.0%} needed)."),
    (3, "too_dark", "brightness", "min_brightness", 0.15,
     "The retina is too dark to grade (brightness {v:.2f}, {t:.2f} needed)."),
    (3, "overexposed", "brightness", "max_brightness", 0.15,
     "The retina is overexposed (brightness {v:.2f}, at most {t:.2f})."),
    (3, "overexposed", "saturated", "max_saturated", 0.13,
     "The retina is overexposed ({v:.0%} of it is blown out to white, at most {t:.0%})."),
    (4, "not_fundus_colour", "red_dominance", "min_red_dominance", 0.35,
     "The colours are not those of a colour fundus photograph (red dominance {v:.2f}, {t:.2f} needed)."),
    (4, "blurred", "sharpness", "min_sharpness", 0.15,
     "The retina is blurred or out of focus (sharpness {v:.2f}, {t:.2f} needed)."),
    (4, "low_contrast", "contrast", "min_contrast", 0.08,
     "The retina has too little contrast, as through haze or cataract ({v:.3f}, {t:.3f} needed)."),
)
_NO_FUNDUS = _CHECKS[1][5]


def measure(rgb: Image.Image, mask: np.ndarray, disc) -> dict:
    """Quality metrics of a disc crop: RGB ANALYSIS_SIZE square, mask True on measured retina."""
    m = {"fit": disc.fit, "border": disc.border,
         "retina_visible": disc.visible_fraction, "retina_area": disc.area_fraction}
    a = np.asarray(rgb)
    if mask.sum() < 100:  # no retina to measure; stage 2 rejects this anyway
        return m | dict.fromkeys(("brightness", "saturated", "red_dominance", "sharpness", "contrast"), 0.0)
    r, g, b = (a[:, :, i][mask].astype(np.float32) / 255.0 for i in range(3))
    lum = 0.299 * r + 0.587 * g + 0.114 * b
    # Green carries the vessel contrast. Sharpness = std of its Laplacian divided by its std, so that
    # haze does not read as blur; both measured away from the rim and the cut edges.
    green = a[:, :, 1].astype(np.float32)
    lap = np.zeros_like(green)
    lap[1:-1, 1:-1] = (green[:-2, 1:-1] + green[2:, 1:-1] + green[1:-1, :-2] + green[1:-1, 2:]
                       - 4 * green[1:-1, 1:-1])
    inner = erode(mask, 3)
    if inner.sum() < 100:
        inner = mask
    gstd = max(float(green[inner].std()), 0.1)
    m.update(
        brightness=float(lum.mean()),
        saturated=float((lum >= 0.96).mean()),
        red_dominance=float(r.mean() / max(g.mean(), b.mean(), 1e-3)),
        sharpness=float(lap[inner].std()) / gstd,
        contrast=gstd / max(float(green[inner].mean()), 0.1),
    )
    return {k: round(float(v), 4) for k, v in m.items()}


def erode(mask: np.ndarray, k: int) -> np.ndarray:
    """Binary erosion by a (2k+1)-pixel square: a box blur stays at 255 only where the whole box is set.
    Pillow extends the edge pixels, so a region touching the frame is not eaten from that side."""
    return np.asarray(Image.fromarray(mask).convert("L").filter(ImageFilter.BoxBlur(k))) == 255


def verdict(metrics: dict | None, thresholds) -> dict:
    """{"gradable", "score", "reasons"}; metrics None means no disc was found.

    `thresholds` is a QualityThresholds.

    The score is the lowest of the per-check scores, each 0.5 exactly at its threshold, so
    gradable <=> score >= 0.5, and it falls as any measure moves towards or past its limit.
    """
    if metrics is None:
        return {"gradable": False, "score": 0.0,
                "reasons": [{"code": "no_fundus_detected", "message": _NO_FUNDUS}]}
    reasons, score = {}, 1.0
    for stage in sorted({c[0] for c in _CHECKS}):
        for _, code, name, field, span, message in (c for c in _CHECKS if c[0] == stage):
            v, t = metrics[name], getattr(thresholds, field)
            sign = 1.0 if field.startswith("min_") else -1.0
            score = min(score, float(np.clip(0.5 + 0.5 * sign * (v - t) / span, 0.0, 1.0)))
            if sign * (v - t) < 0 and code not in reasons:
                reasons[code] = {"code": code, "message": message.format(v=v, t=t)}
        if reasons:
            break
    score = round(score, 3)
    if reasons:
        score = min(score, 0.499)
    return {"gradable": not reasons, "score": score, "reasons": list(reasons.values())}
