"""Asking the model server about one screening and keeping its answer.

Shared by the upload, the re-grade endpoint and `flask grade-pending`. A lease column keeps two
of them from grading the same pending screening at once: whoever sets `grading_started_at`
first grades it; a lease older than LEASE (a crashed worker) may be taken over.
"""
from __future__ import annotations

from datetime import timedelta

from flask import current_app, has_app_context

from . import metrics, shadow
from .db import db
from .models import Grading, Screening, utcnow
from .torchserve import TorchServeClient

LEASE = timedelta(minutes=5)


def claim(screening_id) -> bool:
    now = utcnow()
    return Screening.update(grading_started_at=now).where(
        (Screening.id == screening_id) & (Screening.status == "pending")
        & (Screening.grading_started_at.is_null() | (Screening.grading_started_at < now - LEASE))
    ).execute() == 1


def release(screening: Screening) -> None:
    Screening.update(grading_started_at=None).where(Screening.id == screening.id).execute()


def grade(client: TorchServeClient, screening: Screening, image: bytes, version: str | None = None,
          offer_shadow: bool = True) -> Grading:
    """Run the model on `image` and store the grading. TorchServe's exceptions pass through
    untouched, with nothing written. Afterwards the version in shadow, if any, gets the same
    photograph in the background (shadow.py); a re-grade of a graded photograph does not."""
    with shadow.clinical_call():  # shadow work of this process waits for it (shadow.py)
        prediction = client.predict(image, screening.content_type, version)
    model = prediction.get("model") or {}
    now = utcnow()
    with db.atomic():
        grading = Grading.create(
            screening=screening, created_at=now,
            model_name=str(model.get("name") or client.model_name),
            model_version=str(model.get("version") or version or "unknown"),
            gradable=bool(prediction.get("gradable")),
            grade=prediction.get("grade"), label=prediction.get("label"),
            probabilities=prediction.get("probabilities"), referable=prediction.get("referable"),
            referable_threshold=prediction.get("referable_threshold"),
            quality=prediction.get("quality") or {},
            synthetic_training_data=bool(model.get("synthetic_training_data")),
            disclaimer=prediction.get("disclaimer"), timings=prediction.get("timings_ms"),
        )
        screening.status = "graded" if grading.gradable else "ungradable"
        screening.grading_started_at = None
        screening.updated_at = now
        screening.save(only=[Screening.status, Screening.grading_started_at, Screening.updated_at])
    screening._latest = grading
    metrics.SCREENINGS.labels(screening.status).inc()
    shadow.observe(grading.model_version, grading.gradable, grading.grade, grading.quality)
    if offer_shadow and has_app_context():
        current_app.extensions["clarity"]["shadow"].offer(screening, image, grading)
    return grading
