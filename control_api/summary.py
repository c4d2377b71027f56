"""A patient's summary: the outcome of their latest exam (outcome.py has the rules).

Before exams it combined the latest photograph of each eye whatever its date; now both eyes
come from one visit. Each eye shows the photograph that decided its result (its highest
gradable grade), else its latest photograph.
"""
from __future__ import annotations

from . import codes, outcome
from .models import Exam, Patient


def _eye(result: outcome.EyeResult) -> dict | None:
    screening = result.deciding or (result.images[-1] if result.images else None)
    if screening is None:
        return None
    g = screening.latest_grading
    eye = {"screening_id": screening.id, "status": screening.status, "captured_at": screening.captured_at,
           "gradable": None, "grade": None, "label": None, "referable": None, "quality": None,
           "model": None, "disclaimer": None}
    if g is not None:
        eye.update(gradable=g.gradable, grade=g.grade, label=g.label, referable=g.referable, quality=g.quality,
                   model={"name": g.model_name, "version": g.model_version,
                          "synthetic_training_data": g.synthetic_training_data},
                   disclaimer=g.disclaimer)
    return eye


def latest_exam(patient: Patient) -> Exam | None:
    return (Exam.select().where(Exam.patient == patient)
            .order_by(Exam.performed_at.desc(), Exam.created_at.desc(), Exam.id.desc()).first())


def for_patient(patient: Patient) -> dict:
    exam = latest_exam(patient)
    if exam is None:
        return {"patient_id": patient.id, "exam_id": None, "outcome": "retake",
                "message": codes.OUTCOME_MESSAGES["retake"], "eyes": {"left": None, "right": None},
                "disclaimer": None}
    result = outcome.evaluate(exam)
    return {"patient_id": patient.id, "exam_id": exam.id, "outcome": result.outcome, "message": result.message,
            "eyes": {eye: _eye(r) for eye, r in result.eyes.items()}, "disclaimer": result.disclaimer}
