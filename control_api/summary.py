"""One outcome per patient from the latest photograph of each eye, in the spirit of autonomous
DR screening products (IDx-DR / LumineticsCore): more than mild DR detected -> refer; negative
-> rescreen in 12 months; insufficient quality -> retake. Which model output counts as
"referable" is the model's call (its referable_threshold), not this module's."""
from __future__ import annotations

from .models import EYES, Patient, Screening

MESSAGES = {
    "refer": "More than mild diabetic retinopathy detected: refer to an eye care professional.",
    "retake": "An eye has no gradable photograph: retake the photograph(s).",
    "rescreen_12_months": "Negative for more than mild diabetic retinopathy: rescreen in 12 months.",
    "pending": "Grading is still in progress for an eye: check again later.",
}


def outcome(latest: dict[str, Screening | None]) -> str:
    """`latest` maps each eye to its latest screening (or None when never photographed)."""
    gradings = {eye: s.latest_grading if s else None for eye, s in latest.items()}
    if any(g is not None and g.gradable and g.referable for g in gradings.values()):
        return "refer"
    if any(s is not None and s.status == "pending" for s in latest.values()):
        return "pending"
    if all(g is not None and g.gradable for g in gradings.values()):
        return "rescreen_12_months"
    return "retake"


def _eye(screening: Screening | None) -> dict | None:
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


def for_patient(patient: Patient) -> dict:
    latest = {eye: Screening.select().where((Screening.patient == patient) & (Screening.eye == eye))
              .order_by(Screening.created_at.desc(), Screening.id.desc()).first() for eye in EYES}
    result = outcome(latest)
    eyes = {eye: _eye(s) for eye, s in latest.items()}
    disclaimers = sorted({e["disclaimer"] for e in eyes.values() if e and e["disclaimer"]})
    return {"patient_id": patient.id, "outcome": result, "message": MESSAGES[result], "eyes": eyes,
            "disclaimer": " ".join(disclaimers) or None}
