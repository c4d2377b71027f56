"""Drawing the healthy eye for scripts/ml/synth.py: its geometry, supersampled coverage layers,
outline and random-walk primitives, and the vessel tree."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SUPERSAMPLE = 2  # line/blob layers are drawn at 2x and reduced, which antialiases them


@dataclass
class Eye:
    """Geometry of one drawn right eye, in pixels (left eyes are mirrored at the end)."""
    h: int
    w: int
    cx: float
    cy: float
    r: float
    disc: tuple[float, float]
    disc_r: float
    macula: tuple[float, float]
    veins: list = field(default_factory=list)  # [(points (n,2), widths (n,))] of the larger veins

    def inside(self, p, margin: float = 0.92) -> bool:
        """Within the visible field of view (also inside the frame when the circle is cut)."""
        x, y = p
        return (math.hypot(x - self.cx, y - self.cy) < margin * self.r
                and 0.02 * self.h < y < 0.98 * self.h and 0 < x < self.w)

    def quadrant(self, p) -> int:
        """0 superotemporal, 1 superonasal, 2 inferonasal, 3 inferotemporal (right eye: nasal = +x)."""
        dx, dy = p[0] - self.cx, p[1] - self.cy
        if dy < 0:
            return 1 if dx >= 0 else 0
        return 2 if dx >= 0 else 3


class Layer:
    """A greyscale coverage layer drawn at SUPERSAMPLE x resolution."""

    def __init__(self, eye: Eye):
        self.img = Image.new("L", (eye.w * SUPERSAMPLE, eye.h * SUPERSAMPLE), 0)
        self.draw = ImageDraw.Draw(self.img)

    def disk(self, p, rad, fill=255):
        s = SUPERSAMPLE
        x, y, rr = p[0] * s, p[1] * s, max(rad * s, 0.5)
        self.draw.ellipse([x - rr, y - rr, x + rr, y + rr], fill=fill)

    def polygon(self, pts, fill=255):
        self.draw.polygon([(x * SUPERSAMPLE, y * SUPERSAMPLE) for x, y in pts], fill=fill)

    def polyline(self, pts, widths, fill=255):
        """Tapering line: one segment per step, round joints so the calibre changes smoothly."""
        s = SUPERSAMPLE
        for i in range(len(pts) - 1):
            w = max(widths[i] * s, 1.0)
            (x0, y0), (x1, y1) = pts[i] * s, pts[i + 1] * s
            self.draw.line([(x0, y0), (x1, y1)], fill=fill, width=int(round(w)))
            rr = w / 2
            self.draw.ellipse([x1 - rr, y1 - rr, x1 + rr, y1 + rr], fill=fill)

    def array(self, blur: float = 0.0) -> np.ndarray:
        img = self.img.reduce(SUPERSAMPLE)
        if blur > 0:
            img = img.filter(ImageFilter.GaussianBlur(blur))
        return np.asarray(img, dtype=np.float32) / 255.0

    def region(self, blur: float = 0.0):
        """(slices, coverage) over the drawn part only, or None when nothing was drawn: most layers
        cover a few percent of the image, so compositing only there keeps the generator fast."""
        box = self.img.getbbox()
        if box is None:
            return None
        s, m = SUPERSAMPLE, int(3 * blur) + 2
        x0, y0 = max(0, box[0] // s - m), max(0, box[1] // s - m)
        x1, y1 = min(self.img.width // s, box[2] // s + m + 1), min(self.img.height // s, box[3] // s + m + 1)
        img = self.img.crop((x0 * s, y0 * s, x1 * s, y1 * s)).reduce(s)
        if blur > 0:
            img = img.filter(ImageFilter.GaussianBlur(blur))
        return (slice(y0, y1), slice(x0, x1)), np.asarray(img, dtype=np.float32) / 255.0


def blob(rng, centre, rad, irregularity=0.25, aspect=1.0, angle=0.0, n=24):
    """Irregular closed outline: a radius-modulated ellipse."""
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    rr = np.ones(n)
    for k in (2, 3, 5):
        rr += irregularity / k * rng.normal() * np.cos(k * t + rng.uniform(0, 2 * np.pi))
    rr = np.clip(rr, 0.4, 1.8) * rad
    x, y = rr * np.cos(t) * aspect, rr * np.sin(t)
    ca, sa = math.cos(angle), math.sin(angle)
    return [(centre[0] + ca * a - sa * b, centre[1] + sa * a + ca * b) for a, b in zip(x, y)]


def walk(rng, start, angle, steps, step, curl, memory=0.7):
    """Random walk with smoothly drifting direction (vessel centre line)."""
    pts = [np.asarray(start, dtype=np.float64)]
    turn = 0.0
    for _ in range(steps):
        turn = memory * turn + rng.normal(0, curl)
        angle += turn
        pts.append(pts[-1] + step * np.array([math.cos(angle), math.sin(angle)]))
    return np.array(pts)


def smooth_noise(rng, shape, cells, amplitude):
    """Low-frequency multiplicative texture (choroid, uneven pigment)."""
    small = Image.fromarray(rng.normal(0, 1, (cells, cells)).astype(np.float32), mode="F")
    big = np.asarray(small.resize((shape[1], shape[0]), Image.BICUBIC), dtype=np.float32)
    return 1.0 + amplitude * big / (np.abs(big).max() + 1e-6)


# --- anatomy -------------------------------------------------------------------------------------

def geometry(rng, size: int) -> tuple[Eye, bool]:
    h = size
    w = int(round(size * rng.uniform(1.0, 1.3)))
    cut = rng.random() < 0.25  # like many cameras, the circle is clipped at top and bottom
    r = h * (rng.uniform(0.52, 0.6) if cut else rng.uniform(0.42, 0.485))
    cx = w / 2 + rng.uniform(-0.03, 0.03) * h
    cy = h / 2 + rng.uniform(-0.015, 0.015) * h
    disc_r = r * rng.uniform(0.12, 0.15)
    disc = (cx + r * rng.uniform(0.45, 0.58), cy + r * rng.uniform(-0.08, 0.05))
    # The fovea lies ~2.5 disc diameters temporal to the disc and slightly below it.
    macula = (disc[0] - 5.0 * disc_r * rng.uniform(0.93, 1.07), disc[1] + r * rng.uniform(0.0, 0.06))
    return Eye(h, w, cx, cy, r, disc, disc_r, macula), cut


def _vessel_tree(rng, eye: Eye, layer: Layer, pts, w0, depth, record=None):
    """Draw a vessel with tapering calibre and recursively branch off thinner ones."""
    n = len(pts)
    widths = w0 * np.linspace(1.0, 0.65, n)
    layer.polyline(pts, widths)
    if record is not None and depth <= 1:
        record.append((pts, widths))
    w_min = 0.0045 * eye.r
    if depth >= 4 or w0 * 0.6 < w_min:
        return
    i = int(rng.integers(3, 8))
    while i < n - 2:
        tangent = pts[i + 1] - pts[i - 1]
        ang = math.atan2(tangent[1], tangent[0]) + rng.choice([-1, 1]) * rng.uniform(0.45, 1.2)
        cw = widths[i] * rng.uniform(0.55, 0.75)
        if cw >= w_min:
            steps = int(np.clip(cw / eye.r * rng.uniform(900, 1500), 6, 45))
            child = walk(rng, pts[i], ang, steps, 0.02 * eye.r, 0.03, 0.9)
            _vessel_tree(rng, eye, layer, child, cw, depth + 1, record)
        i += int(rng.integers(5, 12))


def vessels(rng, eye: Eye):
    """Arteries and veins: the temporal arcades around the macula, nasal branches, recursion."""
    arteries, veins = Layer(eye), Layer(eye)
    for layer, wmul, brec in ((arteries, 1.0, None), (veins, 1.3, eye.veins)):
        w_main = eye.r * 0.016 * wmul * rng.uniform(0.9, 1.1)
        for side in (-1, 1):  # superior, inferior arcade
            # Leaves the disc steeply, then sweeps temporally while slowly diverging around the macula.
            t = np.linspace(0.0, rng.uniform(1.1, 1.4), 60)
            rise = eye.r * rng.uniform(0.38, 0.5) * (1 - np.exp(-t / rng.uniform(0.12, 0.2)))
            spread = eye.r * rng.uniform(0.05, 0.25) * t
            wob = np.cumsum(rng.normal(0, 0.004, t.size)) * eye.r
            pts = np.stack([eye.disc[0] - eye.r * t + wob, eye.disc[1] + side * (rise + spread + wob)], 1)
            _vessel_tree(rng, eye, layer, pts, w_main, 0, brec)
        for _ in range(int(rng.integers(2, 4))):  # nasal and vertical branches
            ang = rng.uniform(-1.6, 1.6)
            steps = int(rng.integers(20, 35))
            pts = walk(rng, eye.disc, ang, steps, 0.02 * eye.r, 0.025, 0.9)
            _vessel_tree(rng, eye, layer, pts, w_main * rng.uniform(0.55, 0.75), 1, brec)
    return arteries, veins
