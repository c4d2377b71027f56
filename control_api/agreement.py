"""How far a candidate version agrees with the clinical gradings on the same photographs.

Pairs are (the clinical grading a shadow answer was compared with, the shadow answer); the
newest shadow answer per photograph counts. The report gives ids only (screening and patient
UUIDs), never a name or record number.
"""
from __future__ import annotations

from .models import Grading, Screening, ShadowGrading

GRADES = 5
CATEGORIES = [str(g) for g in range(GRADES)] + ["ungradable"]
DISAGREEMENT_LIMIT = 500


def quadratic_kappa(a: list[int], b: list[int], k: int = GRADES) -> float | None:
    """Cohen's kappa with quadratic weights; None when undefined (no pairs, or both raters
    gave one and the same grade to everything)."""
    n = len(a)
    if n == 0:
        return None
    observed = [[0.0] * k for _ in range(k)]
    for x, y in zip(a, b):
        observed[x][y] += 1
    row = [sum(observed[i]) for i in range(k)]
    col = [sum(observed[i][j] for i in range(k)) for j in range(k)]
    num = den = 0.0
    for i in range(k):
        for j in range(k):
            w = (i - j) ** 2 / (k - 1) ** 2
            num += w * observed[i][j]
            den += w * row[i] * col[j] / n
    if den == 0:  # both gave one and the same grade throughout
        return None
    return 1 - num / den


def _category(gradable: bool, grade: int | None) -> int:
    return grade if gradable and grade is not None and 0 <= grade < GRADES else GRADES


def pairs(version: str, baseline_version: str | None = None, source: str | None = None) -> list[tuple]:
    """[(screening_id, patient_id, baseline Grading, ShadowGrading)], newest shadow answer per photograph."""
    query = (ShadowGrading.select(ShadowGrading, Grading, Screening.id, Screening.patient)
             .join(Grading, on=(ShadowGrading.baseline == Grading.id))
             .switch(ShadowGrading).join(Screening, on=(ShadowGrading.screening == Screening.id))
             .where(ShadowGrading.model_version == version)
             .order_by(ShadowGrading.created_at, ShadowGrading.id))
    if baseline_version:
        query = query.where(Grading.model_version == baseline_version)
    if source:
        query = query.where(ShadowGrading.source == source)
    newest = {}
    for shadow in query:
        newest[shadow.screening.id] = (shadow.screening.id, shadow.screening.patient_id, shadow.baseline, shadow)
    return list(newest.values())


def compare(version: str, baseline_version: str | None = None, source: str | None = None) -> dict:
    rows = pairs(version, baseline_version, source)
    confusion = [[0] * len(CATEGORIES) for _ in CATEGORIES]
    both_gradable = []
    disagreements = []
    for screening_id, patient_id, base, cand in rows:
        confusion[_category(base.gradable, base.grade)][_category(cand.gradable, cand.grade)] += 1
        if base.gradable and cand.gradable and base.grade is not None and cand.grade is not None:
            both_gradable.append((base, cand))
            if bool(base.referable) != bool(cand.referable):
                disagreements.append({"screening_id": str(screening_id), "patient_id": str(patient_id),
                                      "baseline_grade": base.grade, "candidate_grade": cand.grade,
                                      "baseline_referable": base.referable, "candidate_referable": cand.referable})
    n = len(rows)
    m = len(both_gradable)
    return {
        "version": version,
        "baseline_versions": sorted({base.model_version for _, _, base, _ in rows}),
        "photographs": n,
        "both_gradable": m,
        "grade_kappa": quadratic_kappa([b.grade for b, _ in both_gradable], [c.grade for _, c in both_gradable]),
        "grade_agreement": (sum(b.grade == c.grade for b, c in both_gradable) / m) if m else None,
        "referable_agreement": (sum(bool(b.referable) == bool(c.referable) for b, c in both_gradable) / m)
        if m else None,
        "gradable_agreement": (sum(b.gradable == c.gradable for _, _, b, c in rows) / n) if n else None,
        "confusion": {"labels": CATEGORIES, "rows": "baseline (clinical) grading",
                      "columns": "candidate (shadow) grading", "matrix": confusion},
        "referral_disagreements": disagreements[:DISAGREEMENT_LIMIT],
        "referral_disagreements_total": len(disagreements),
    }


def summary(version: str, baseline_version: str) -> dict | None:
    """The few numbers the promotion gate reads; None when no shadow data exists."""
    report = compare(version, baseline_version)
    if not report["photographs"]:
        return None
    return {k: report[k] for k in ("photographs", "both_gradable", "grade_kappa", "grade_agreement",
                                   "referable_agreement", "gradable_agreement")} | {"baseline_version": baseline_version}
