"""The clinical rules of an exam: one result per eye, one outcome for the visit.

Per eye (as EyeArt reports it): gradable when at least one of its photographs is gradable;
its grade is the highest among those, and the photograph that gave it is named; referable
when that grade reaches the model's own threshold (the grading's `referable`), so which grade
counts as "more than mild" stays the model's call.

Visit (as IDx-DR / LumineticsCore reports it, codes.OUTCOME_SOURCE):
- refer: a gradable eye is referable, even if the other eye is ungradable or still pending;
- pending: a photograph awaits grading and nothing is referable yet;
- retake: an eye has no gradable photograph (ungradable or never photographed);
- rescreen_12_months: both eyes gradable, neither referable.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from . import codes
from .models import EYES, Exam, Grading, Screening


@dataclass
class EyeResult:
    status: str                      # graded | ungradable | pending | missing
    gradable: bool
    grade: int | None = None
    label: str | None = None         # ICDR words (codes.ICDR_GRADES)
    referable: bool | None = None
    deciding_image_id: object = None
    quality_reasons: list = field(default_factory=list)
    images: list = field(default_factory=list, repr=False)  # this eye's photographs, oldest first
    deciding: Screening | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        return {"status": self.status, "gradable": self.gradable, "grade": self.grade, "label": self.label,
                "referable": self.referable, "deciding_image_id": self.deciding_image_id,
                "quality_reasons": self.quality_reasons}


def eye_result(images: list[Screening]) -> EyeResult:
    """`images`: one eye's photographs, each with its latest grading (or none yet)."""
    if not images:
        return EyeResult("missing", False)
    graded = [s for s in images if s.latest_grading is not None and s.latest_grading.gradable]
    reasons = _reasons(s for s in images if s not in graded)
    if graded:
        # Highest grade wins; among equals the first photograph taken, so the answer is stable.
        deciding = max(graded, key=lambda s: (s.latest_grading.grade, -images.index(s)))
        g = deciding.latest_grading
        return EyeResult("graded", True, g.grade, codes.ICDR_GRADES.get(g.grade), bool(g.referable),
                         deciding.id, reasons, images, deciding)
    status = "pending" if any(s.status == "pending" for s in images) else "ungradable"
    return EyeResult(status, False, quality_reasons=reasons, images=images)


def _reasons(screenings) -> list[dict]:
    """The quality gate's reasons of the photographs that were not gradable, each code once."""
    seen: dict[str, dict] = {}
    for s in screenings:
        g = s.latest_grading
        for reason in ((g.quality or {}).get("reasons") or []) if g is not None else []:
            if isinstance(reason, dict) and reason.get("code") not in seen:
                seen[reason.get("code")] = {"code": reason.get("code"), "message": reason.get("message")}
    return list(seen.values())


def visit_outcome(eyes: dict[str, EyeResult], images: list[Screening]) -> str:
    if any(e.gradable and e.referable for e in eyes.values()):
        return "refer"
    if any(s.status == "pending" for s in images):
        return "pending"
    if all(e.gradable for e in eyes.values()):
        return "rescreen_12_months"
    return "retake"


def attach_latest(screenings: list[Screening]) -> None:
    """The latest grading of many photographs in one query, instead of one query each."""
    latest = {}
    if screenings:
        query = Grading.select().where(Grading.screening.in_([s.id for s in screenings]))
        for grading in query.order_by(Grading.created_at, Grading.id):
            latest[grading.screening_id] = grading
    for s in screenings:
        s._latest = latest.get(s.id)


@dataclass
class ExamResult:
    exam: Exam
    images: list
    eyes: dict
    outcome: str
    model: dict | None
    disclaimer: str | None

    @property
    def message(self) -> str:
        return codes.OUTCOME_MESSAGES[self.outcome]


def evaluate(exam: Exam) -> ExamResult:
    """The exam's photographs with their latest gradings, each eye's result and the outcome."""
    images = list(exam.images.order_by(Screening.created_at, Screening.id))
    attach_latest(images)
    eyes = {eye: eye_result([s for s in images if s.eye == eye]) for eye in EYES}
    gradings = sorted((s.latest_grading for s in images if s.latest_grading is not None),
                      key=lambda g: g.created_at)
    model = None
    if gradings:
        g = gradings[-1]
        model = {"name": g.model_name, "version": g.model_version,
                 "synthetic_training_data": g.synthetic_training_data}
    disclaimer = " ".join(sorted({g.disclaimer for g in gradings if g.disclaimer})) or None
    return ExamResult(exam, images, eyes, visit_outcome(eyes, images), model, disclaimer)


def as_json(result: ExamResult) -> dict:
    """The Exam JSON of the API contract (schemas.Exam dumps it)."""
    exam = result.exam
    return {"id": exam.id, "patient_id": exam.patient_id, "performed_at": exam.performed_at,
            "accession_number": exam.accession_number, "created_at": exam.created_at,
            "outcome": result.outcome, "message": result.message,
            "eyes": {eye: e.to_dict() for eye, e in result.eyes.items()},
            "images": result.images, "model": result.model, "disclaimer": result.disclaimer}
