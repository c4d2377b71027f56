"""Seeded generator of synthetic fundus photographs with diabetic-retinopathy lesions by ICDR grade.

The images are drawings, not photographs of anyone: they exist so the whole pipeline (training,
evaluation, archiving, serving) can be built and tested without licensed patient data. A model
trained on them has no clinical accuracy. The lesion model is documented in docs/synthetic-data.md.

    python -m scripts.ml.synth --out var/synth --n 1500 --seed 0 --size 512

writes an APTOS-style folder: ``train_images/<id_code>.jpg`` and ``train.csv`` (id_code,diagnosis).
Every image depends only on (seed, index), so the output is identical for any number of workers.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import math
import multiprocessing
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# Skewed towards grade 0 like screening data, but every grade keeps enough examples to learn from.
DEFAULT_GRADE_MIX = (0.40, 0.15, 0.20, 0.12, 0.13)
# Sizes are fractions of the field-of-view radius R, which becomes S/2 px at model input S.
# Microaneurysms match the largest real ones (2-3x a typical one) so they still cover ~2 px at S=160.
MA_RADIUS = (0.012, 0.018)
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


def _blob(rng, centre, rad, irregularity=0.25, aspect=1.0, angle=0.0, n=24):
    """Irregular closed outline: a radius-modulated ellipse."""
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    rr = np.ones(n)
    for k in (2, 3, 5):
        rr += irregularity / k * rng.normal() * np.cos(k * t + rng.uniform(0, 2 * np.pi))
    rr = np.clip(rr, 0.4, 1.8) * rad
    x, y = rr * np.cos(t) * aspect, rr * np.sin(t)
    ca, sa = math.cos(angle), math.sin(angle)
    return [(centre[0] + ca * a - sa * b, centre[1] + sa * a + ca * b) for a, b in zip(x, y)]


def _walk(rng, start, angle, steps, step, curl, memory=0.7):
    """Random walk with smoothly drifting direction (vessel centre line)."""
    pts = [np.asarray(start, dtype=np.float64)]
    turn = 0.0
    for _ in range(steps):
        turn = memory * turn + rng.normal(0, curl)
        angle += turn
        pts.append(pts[-1] + step * np.array([math.cos(angle), math.sin(angle)]))
    return np.array(pts)


def _smooth_noise(rng, shape, cells, amplitude):
    """Low-frequency multiplicative texture (choroid, uneven pigment)."""
    small = Image.fromarray(rng.normal(0, 1, (cells, cells)).astype(np.float32), mode="F")
    big = np.asarray(small.resize((shape[1], shape[0]), Image.BICUBIC), dtype=np.float32)
    return 1.0 + amplitude * big / (np.abs(big).max() + 1e-6)


# --- anatomy -------------------------------------------------------------------------------------

def _geometry(rng, size: int) -> tuple[Eye, bool]:
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
            child = _walk(rng, pts[i], ang, steps, 0.02 * eye.r, 0.03, 0.9)
            _vessel_tree(rng, eye, layer, child, cw, depth + 1, record)
        i += int(rng.integers(5, 12))


def _vessels(rng, eye: Eye):
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
            pts = _walk(rng, eye.disc, ang, steps, 0.02 * eye.r, 0.025, 0.9)
            _vessel_tree(rng, eye, layer, pts, w_main * rng.uniform(0.55, 0.75), 1, brec)
    return arteries, veins


# --- lesions -------------------------------------------------------------------------------------

class Lesions:
    """Coverage layers for each kind of lesion plus counts for the generator's metadata."""

    def __init__(self, rng, eye: Eye):
        self.rng, self.eye = rng, eye
        self.red, self.preretinal_blood = Layer(eye), Layer(eye)
        self.exudate, self.cotton = Layer(eye), Layer(eye)
        self.new_vessels = Layer(eye)
        self.haze: list[tuple[tuple[float, float], float]] = []
        self.counts = {k: 0 for k in ("microaneurysms", "dot_blot_haemorrhages", "flame_haemorrhages",
                                      "hard_exudates", "cotton_wool_spots", "venous_beading_quadrants",
                                      "irma_quadrants", "nv_disc", "nv_elsewhere",
                                      "preretinal_haemorrhages", "vitreous_haemorrhage")}
        self.haem_per_quadrant = [0, 0, 0, 0]

    def point(self, quadrant: int | None = None, near_macula: bool = False, avoid_disc=True):
        rng, eye = self.rng, self.eye
        for _ in range(200):
            if near_macula:
                d = eye.r * 0.35 * math.sqrt(rng.random())
                a = rng.uniform(0, 2 * math.pi)
                p = (eye.macula[0] + d * math.cos(a), eye.macula[1] + d * math.sin(a))
            else:
                d = eye.r * 0.9 * math.sqrt(rng.uniform(0.02, 1.0))
                a = rng.uniform(0, 2 * math.pi) if quadrant is None else \
                    rng.uniform(0.05, 0.45) * math.pi + (math.pi, 1.5 * math.pi, 0.0, 0.5 * math.pi)[quadrant]
                p = (eye.cx + d * math.cos(a), eye.cy + d * math.sin(a))
            if quadrant is not None and eye.quadrant(p) != quadrant:
                continue
            if avoid_disc and math.dist(p, eye.disc) < 1.6 * eye.disc_r:
                continue
            if eye.inside(p):
                return p
        return (eye.macula[0], eye.macula[1] - 0.2 * eye.r)

    def microaneurysms(self, n):
        for _ in range(n):
            p = self.point(near_macula=self.rng.random() < 0.5)
            self.red.disk(p, self.eye.r * self.rng.uniform(*MA_RADIUS))
        self.counts["microaneurysms"] += n

    def haemorrhages(self, quadrants, per_quadrant):
        rng, eye = self.rng, self.eye
        for q in quadrants:
            n = int(rng.integers(*per_quadrant))
            for _ in range(n):
                p = self.point(q)
                if rng.random() < 0.3:  # flame: superficial, elongated along the nerve fibres
                    ang = math.atan2(p[1] - eye.disc[1], p[0] - eye.disc[0])
                    rad = eye.r * rng.uniform(0.012, 0.02)
                    self.red.polygon(_blob(rng, p, rad, 0.1, rng.uniform(2.5, 4.0), ang))
                    self.counts["flame_haemorrhages"] += 1
                else:  # dot/blot: deeper, rounder, irregular
                    rad = eye.r * rng.uniform(0.018, 0.04)
                    self.red.polygon(_blob(rng, p, rad, 0.35, rng.uniform(0.8, 1.3), rng.uniform(0, 3)))
                    self.counts["dot_blot_haemorrhages"] += 1
                self.haem_per_quadrant[q] += 1

    def hard_exudates(self, clusters):
        rng, eye = self.rng, self.eye
        for _ in range(clusters):
            c = self.point(near_macula=rng.random() < 0.6)
            spread = eye.r * rng.uniform(0.04, 0.1)
            ring = rng.random() < 0.4  # circinate pattern around a leaking spot
            n = int(rng.integers(4, 14))
            for _ in range(n):
                a = rng.uniform(0, 2 * math.pi)
                d = spread * (rng.uniform(0.8, 1.1) if ring else math.sqrt(rng.random()))
                p = (c[0] + d * math.cos(a), c[1] + d * math.sin(a))
                if eye.inside(p):
                    self.exudate.polygon(_blob(rng, p, eye.r * rng.uniform(0.008, 0.018), 0.4, n=12))
            self.counts["hard_exudates"] += n

    def cotton_wool(self, n):
        rng, eye = self.rng, self.eye
        for _ in range(n):
            # Nerve-fibre-layer infarcts: soft-edged whitish patches, placed anywhere in the field.
            p = self.point()
            self.cotton.polygon(_blob(rng, p, eye.r * rng.uniform(0.035, 0.055), 0.3,
                                      rng.uniform(1.0, 1.6), rng.uniform(0, 3)))
        self.counts["cotton_wool_spots"] += n

    def venous_beading(self, quadrants):
        rng, eye = self.rng, self.eye
        done = set()
        for q in quadrants:
            stretches = [(pts, w) for pts, w in eye.veins
                         if sum(eye.quadrant(p) == q and eye.inside(p, 0.88) for p in pts) >= 10]
            if not stretches:
                continue
            pts, widths = stretches[int(rng.integers(len(stretches)))]
            idx = [i for i, p in enumerate(pts) if eye.quadrant(p) == q and eye.inside(p, 0.88)]
            start = idx[int(rng.integers(max(1, len(idx) - 10)))]
            # Sausage-like calibre changes: beads ~3x the vein's width along ~0.5 R of its course.
            for i in range(start, min(start + 24, len(pts) - 1)):
                for f in (0.0, 0.5):
                    p = pts[i] + f * (pts[i + 1] - pts[i])
                    self.red.disk(p, widths[i] * rng.uniform(1.3, 1.6))
            done.add(q)
        self.counts["venous_beading_quadrants"] += len(done)

    def irma(self, quadrants):
        rng, eye = self.rng, self.eye
        for q in quadrants:
            c = self.point(q)
            for _ in range(int(rng.integers(6, 10))):
                start = (c[0] + rng.normal(0, 0.04) * eye.r, c[1] + rng.normal(0, 0.04) * eye.r)
                pts = _walk(rng, start, rng.uniform(0, 2 * math.pi), int(rng.integers(10, 18)),
                            0.012 * eye.r, 0.5)
                self.red.polyline(pts, np.full(len(pts), 0.013 * eye.r), fill=220)
        self.counts["irma_quadrants"] += len(quadrants)

    def neovascularisation(self, at_disc: bool):
        rng, eye = self.rng, self.eye
        if at_disc:
            c = (eye.disc[0] + rng.normal(0, 0.3) * eye.disc_r, eye.disc[1] + rng.normal(0, 0.3) * eye.disc_r)
            spread = eye.disc_r * rng.uniform(0.9, 1.4)
            self.counts["nv_disc"] += 1
        else:  # new vessels sprout from veins, mostly along the arcades
            on_veins = [p for pts, _ in eye.veins for p in pts[::4]
                        if eye.inside(p, 0.85) and math.dist(p, eye.disc) > 3 * eye.disc_r]
            c = on_veins[int(rng.integers(len(on_veins)))] if on_veins else self.point()
            spread = eye.r * rng.uniform(0.09, 0.14)
            self.counts["nv_elsewhere"] += 1
        # Fine, tangled, looping vessels fanning out from a root: a "sea fan".
        for _ in range(int(rng.integers(25, 41))):
            a = rng.uniform(0, 2 * math.pi)
            start = (c[0] + 0.3 * spread * math.cos(a), c[1] + 0.3 * spread * math.sin(a))
            pts = _walk(rng, start, a, int(rng.integers(10, 20)), spread * 0.09, 0.45)
            self.new_vessels.polyline(pts, np.full(len(pts), 0.013 * eye.r))

    def preretinal(self):
        rng, eye = self.rng, self.eye
        p = self.point()
        rad = eye.r * rng.uniform(0.07, 0.12)
        # Boat shape: the blood settles, so the top edge is a horizontal fluid level.
        level = p[1] - rad * rng.uniform(0.1, 0.5)
        outline = [(x, max(y, level)) for x, y in _blob(rng, p, rad, 0.15, rng.uniform(1.1, 1.5), 0.0, 40)]
        self.preretinal_blood.polygon(outline)
        self.counts["preretinal_haemorrhages"] += 1

    def vitreous(self):
        self.haze.append((self.point(avoid_disc=False), self.eye.r * self.rng.uniform(0.25, 0.4)))
        self.counts["vitreous_haemorrhage"] += 1


def _moderate(les: Lesions, rng, heavy=False):
    """Grade-2 findings: more than microaneurysms, but short of the 4-2-1 rule."""
    les.microaneurysms(int(rng.integers(6, 20)))
    k = int(rng.integers(2, 4)) if heavy else int(rng.integers(1, 4))
    quads = rng.choice(4, size=k, replace=False).tolist()
    les.haemorrhages(quads, (2, 5))
    if rng.random() < 0.65:
        les.hard_exudates(int(rng.integers(1, 4)))
    if rng.random() < 0.45:
        les.cotton_wool(int(rng.integers(1, 4)))


def _add_lesions(rng, eye: Eye, grade: int) -> Lesions:
    les = Lesions(rng, eye)
    if grade == 1:
        les.microaneurysms(int(rng.integers(4, 13)))
    elif grade == 2:
        _moderate(les, rng)
    elif grade == 3:
        # 4-2-1 rule: many haemorrhages in 4 quadrants, or venous beading in 2, or IRMA in 1.
        rule = rng.choice(3, p=[0.5, 0.25, 0.25])
        _moderate(les, rng, heavy=True)
        if rule == 0 or rng.random() < 0.3:
            les.haemorrhages(range(4), (6, 10))
        if rule == 1 or rng.random() < 0.3:
            les.venous_beading(rng.choice(4, size=int(rng.integers(2, 4)), replace=False).tolist())
        if rule == 2 or rng.random() < 0.3:
            les.irma(rng.choice(4, size=int(rng.integers(1, 3)), replace=False).tolist())
        if rng.random() < 0.5:
            les.cotton_wool(int(rng.integers(1, 4)))
    elif grade == 4:
        _moderate(les, rng, heavy=True)
        if rng.random() < 0.4:
            les.haemorrhages(range(4), (4, 8))
        at_disc = rng.random() < 0.55
        les.neovascularisation(at_disc)
        if rng.random() < 0.3:
            les.neovascularisation(not at_disc)
        if rng.random() < 0.5:
            les.preretinal()
        if rng.random() < 0.2:
            les.vitreous()
    return les


# --- compositing ---------------------------------------------------------------------------------

def _tint(img, region, factor, strength=1.0):
    """Darken/redden under a coverage layer: multiply towards a colour factor."""
    if region is None:
        return
    win, cover = region
    img[win] *= 1.0 - (strength * cover)[..., None] * (1.0 - np.asarray(factor, dtype=np.float32))


def _paint(img, region, colour, light=None, strength=1.0):
    """Cover with an own colour (bright lesions, disc), optionally scaled by a light field."""
    if region is None:
        return
    win, cover = region
    target = np.asarray(colour, dtype=np.float32)
    if light is not None:
        target = target * light[win][..., None]
    img[win] += (strength * cover)[..., None] * (target - img[win])


def _window(eye: Eye, centre, radius):
    """Slices of the image around a circle, and pixel-centre coordinate grids inside them."""
    y0, y1 = max(0, int(centre[1] - radius)), min(eye.h, int(centre[1] + radius) + 2)
    x0, x1 = max(0, int(centre[0] - radius)), min(eye.w, int(centre[0] + radius) + 2)
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    return (slice(y0, y1), slice(x0, x1)), xx, yy


def render(seed: int, grade: int, size: int = 512) -> tuple[Image.Image, dict]:
    """One synthetic fundus photograph of the given ICDR grade (0-4).

    The anatomy, lighting and camera come from one random stream and the lesions from another, so
    the same seed gives the same eye at every grade: tests can isolate lesion pixels by difference.
    """
    if grade not in range(5):
        raise ValueError(f"grade must be 0-4, got {grade!r}")
    rng = np.random.default_rng([seed, 0])
    lrng = np.random.default_rng([seed, 1, grade])
    eye, cut = _geometry(rng, size)
    h, w = eye.h, eye.w
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    dist = np.hypot(xx - eye.cx, yy - eye.cy) / eye.r

    # Retina: orange-red base, choroidal mottling, uneven camera illumination.
    base = np.array([rng.uniform(0.72, 0.95), rng.uniform(0.28, 0.48), rng.uniform(0.08, 0.22)], np.float32)
    img = np.empty((h, w, 3), np.float32)
    img[:] = base
    img *= _smooth_noise(rng, (h, w), 10, 0.08)[..., None]
    img *= _smooth_noise(rng, (h, w), 40, 0.03)[..., None]
    ga = rng.uniform(0, 2 * np.pi)
    illum = (rng.uniform(0.75, 1.12)
             * (1.0 - rng.uniform(0.2, 0.45) * np.clip(dist, 0, 1.2) ** rng.uniform(2.0, 3.0))
             * (1.0 + rng.uniform(0.0, 0.15) * ((xx - eye.cx) * np.cos(ga) + (yy - eye.cy) * np.sin(ga)) / eye.r))
    illum = illum.astype(np.float32)

    # Macula: a darker, slightly browner area with the darkest spot at the fovea.
    md = ((xx - eye.macula[0]) ** 2 + (yy - eye.macula[1]) ** 2) / (eye.r * rng.uniform(0.12, 0.17)) ** 2
    img *= (1.0 - rng.uniform(0.25, 0.4) * np.exp(-md / 2))[..., None] * np.array([1.0, 0.97, 1.0], np.float32)

    # Optic nerve head: a pale disc with a brighter, slightly temporal cup.
    win, wx, wy = _window(eye, eye.disc, 1.2 * eye.disc_r)
    dd = np.hypot(wx - eye.disc[0], wy - eye.disc[1]) / eye.disc_r
    _paint(img, (win, np.clip((1.12 - dd) / 0.22, 0, 1)),
           (0.98, rng.uniform(0.72, 0.85), rng.uniform(0.5, 0.62)), strength=rng.uniform(0.75, 0.9))
    cup = rng.uniform(0.3, 0.55)
    cd = np.hypot(wx - (eye.disc[0] - 0.12 * eye.disc_r), wy - eye.disc[1]) / (cup * eye.disc_r)
    _paint(img, (win, np.clip((1.2 - cd) / 0.5, 0, 1)), (1.0, 0.95, 0.84), strength=0.85)

    arteries, veins = _vessels(rng, eye)
    _tint(img, arteries.region(0.4), (0.82, 0.5, 0.52))
    _tint(img, veins.region(0.4), (0.62, 0.3, 0.36))

    les = _add_lesions(lrng, eye, grade)
    red = les.red.region(0.5)
    _tint(img, red, (0.5, 0.17, 0.16))
    _tint(img, les.new_vessels.region(0.3), (0.55, 0.22, 0.26))
    _tint(img, les.preretinal_blood.region(0.6), (0.32, 0.06, 0.06))
    # bright lesions keep their colour in dim corners: partly undo the illumination applied below
    compensate = illum ** -0.5
    _paint(img, les.exudate.region(0.5), (1.0, 0.9, 0.45), compensate, strength=0.95)
    _paint(img, les.cotton.region(2.0), (0.96, 0.9, 0.8), compensate, strength=0.8)
    for c, rad in les.haze:  # vitreous blood: a diffuse red veil that hides detail
        win, wx, wy = _window(eye, c, 2.5 * rad)
        _paint(img, (win, np.exp(-((wx - c[0]) ** 2 + (wy - c[1]) ** 2) / rad ** 2)), (0.55, 0.1, 0.06),
               strength=0.45)

    img *= illum[..., None]
    if rng.random() < 0.5:  # camera colour balance
        img *= np.array([rng.uniform(0.9, 1.05), rng.uniform(0.9, 1.1), rng.uniform(0.85, 1.2)], np.float32)

    # Field of view: a bright circle (cut at top/bottom for some), with the camera's notch.
    fov = Image.new("L", (w * SUPERSAMPLE, h * SUPERSAMPLE), 0)
    d = ImageDraw.Draw(fov)
    s, R = SUPERSAMPLE, eye.r * SUPERSAMPLE
    d.ellipse([eye.cx * s - R, eye.cy * s - R, eye.cx * s + R, eye.cy * s + R], fill=255)
    if rng.random() < 0.7:
        na = rng.uniform(-1.2, -0.4) if rng.random() < 0.7 else rng.uniform(0, 2 * np.pi)
        nx, ny, nw = eye.cx + eye.r * math.cos(na), eye.cy + eye.r * math.sin(na), eye.r * 0.05
        d.rectangle([(nx - nw) * s, (ny - nw) * s, (nx + nw) * s, (ny + nw) * s], fill=255)
    fov_a = np.asarray(fov.reduce(SUPERSAMPLE).filter(ImageFilter.GaussianBlur(0.8 * size / 512)),
                       np.float32)[..., None] / 255.0
    background = rng.uniform(0.0, 0.03)
    img = img * fov_a + background * (1 - fov_a)

    img += rng.standard_normal(img.shape, dtype=np.float32) * rng.uniform(0.004, 0.012)  # sensor noise
    out = Image.fromarray((np.clip(img, 0, 1) ** rng.uniform(0.9, 1.1) * 255 + 0.5).astype(np.uint8))
    if rng.random() < 0.3:  # slight defocus
        out = out.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.8) * size / 512))
    right = bool(rng.random() < 0.5)
    if not right:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    info = {"grade": grade, "eye": "right" if right else "left", "disc_cut": bool(cut),
            "size": [w, h], "fov_radius_px": round(eye.r, 1), "lesions": les.counts,
            "haemorrhages_per_quadrant": les.haem_per_quadrant,
            "red_lesion_pixels": 0 if red is None else int((red[1] > 0.5).sum())}
    return out, info


# --- dataset writer ------------------------------------------------------------------------------

def id_code(seed: int, index: int) -> str:
    return hashlib.sha1(f"clarity-synth:{seed}:{index}".encode()).hexdigest()[:12]


def grade_plan(n: int, seed: int, mix=DEFAULT_GRADE_MIX) -> list[int]:
    """Exact per-grade counts from the mix (largest remainder), shuffled with the seed."""
    raw = np.asarray(mix, dtype=np.float64) / np.sum(mix) * n
    counts = np.floor(raw).astype(int)
    counts[np.argsort(raw - counts)[::-1][: n - counts.sum()]] += 1
    grades = np.repeat(np.arange(len(mix)), counts)
    np.random.default_rng([seed, 2]).shuffle(grades)
    return grades.tolist()


def image_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "png":
        img.save(buf, "PNG", optimize=False, compress_level=6)
    else:
        img.save(buf, "JPEG", quality=92, subsampling=0)
    return buf.getvalue()


def _make_one(job):
    seed, index, grade, size, fmt, out_dir = job
    img, _ = render(image_seed(seed, index), grade, size)
    name = id_code(seed, index)
    (Path(out_dir) / f"{name}.{fmt}").write_bytes(_encode(img, fmt))
    return name, grade


def generate(out: Path, n: int, seed: int = 0, size: int = 512, fmt: str = "jpg", workers: int = 1,
             mix=DEFAULT_GRADE_MIX, progress: bool = True) -> Path:
    """Write an APTOS-style folder; returns the path of train.csv."""
    from tqdm import tqdm

    out = Path(out)
    img_dir = out / "train_images"
    img_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(seed, i, g, size, fmt, str(img_dir)) for i, g in enumerate(grade_plan(n, seed, mix))]
    bar = dict(total=n, desc="synth", unit="img", disable=not progress)
    if workers > 1:
        # Torch may already hold threads in this process; a fresh spawn start avoids fork issues.
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            rows = list(tqdm(pool.imap(_make_one, jobs, chunksize=4), **bar))
    else:
        rows = [_make_one(j) for j in tqdm(jobs, **bar)]
    # Marks the folder as synthetic for scripts/ml/datasets.py, so checkpoints and model cards say so.
    (out / "synthetic.json").write_text(json.dumps(
        {"generator": "scripts.ml.synth", "n": n, "seed": seed, "size": size, "format": fmt,
         "grade_mix": list(mix), "note": "Synthetic drawings, not photographs of patients."}, indent=2))
    csv_path = out / "train.csv"
    with open(csv_path, "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["id_code", "diagnosis"])
        wr.writerows(rows)
    return csv_path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="output folder (APTOS layout)")
    ap.add_argument("--n", type=int, default=1500, help="number of images")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=512, help="image height in pixels (width 1.0-1.3x)")
    ap.add_argument("--format", choices=("jpg", "png"), default="jpg")
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--mix", type=float, nargs=5, default=DEFAULT_GRADE_MIX, metavar="P",
                    help="relative share of grades 0..4")
    args = ap.parse_args(argv)
    path = generate(args.out, args.n, args.seed, args.size, args.format, args.workers, tuple(args.mix))
    print(f"wrote {args.n} images and {path}")


if __name__ == "__main__":
    main()
