"""Drawing diabetic-retinopathy lesions by ICDR grade for scripts/ml/synth.py (the lesion model is
documented in docs/synthetic-data.md)."""
from __future__ import annotations

import math

import numpy as np

from scripts.ml.synth_anatomy import Eye, Layer, blob, walk

# Sizes are fractions of the field-of-view radius R, which becomes S/2 px at model input S.
# Microaneurysms match the largest real ones (2-3x a typical one) so they still cover ~2 px at S=160.
MA_RADIUS = (0.012, 0.018)


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
                    self.red.polygon(blob(rng, p, rad, 0.1, rng.uniform(2.5, 4.0), ang))
                    self.counts["flame_haemorrhages"] += 1
                else:  # dot/blot: deeper, rounder, irregular
                    rad = eye.r * rng.uniform(0.018, 0.04)
                    self.red.polygon(blob(rng, p, rad, 0.35, rng.uniform(0.8, 1.3), rng.uniform(0, 3)))
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
                    self.exudate.polygon(blob(rng, p, eye.r * rng.uniform(0.008, 0.018), 0.4, n=12))
            self.counts["hard_exudates"] += n

    def cotton_wool(self, n):
        rng, eye = self.rng, self.eye
        for _ in range(n):
            # Nerve-fibre-layer infarcts: soft-edged whitish patches, placed anywhere in the field.
            p = self.point()
            self.cotton.polygon(blob(rng, p, eye.r * rng.uniform(0.035, 0.055), 0.3,
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
                pts = walk(rng, start, rng.uniform(0, 2 * math.pi), int(rng.integers(10, 18)),
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
            pts = walk(rng, start, a, int(rng.integers(10, 20)), spread * 0.09, 0.45)
            self.new_vessels.polyline(pts, np.full(len(pts), 0.013 * eye.r))

    def preretinal(self):
        rng, eye = self.rng, self.eye
        p = self.point()
        rad = eye.r * rng.uniform(0.07, 0.12)
        # Boat shape: the blood settles, so the top edge is a horizontal fluid level.
        level = p[1] - rad * rng.uniform(0.1, 0.5)
        outline = [(x, max(y, level)) for x, y in blob(rng, p, rad, 0.15, rng.uniform(1.1, 1.5), 0.0, 40)]
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


def add_lesions(rng, eye: Eye, grade: int) -> Lesions:
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
