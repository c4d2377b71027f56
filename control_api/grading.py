"""Asking the model server about one screening and keeping its answer.

Shared by the upload, the re-grade endpoint and `flask grade-pending`. A lease column keeps two
of them from grading the same pending screening at once: whoever sets `grading_started_at`
first grades it; a lease older than LEASE (a crashed worker) may be taken over.

Result cache: an upload whose bytes (SHA-256) this patient already sent, and which the current
default model version already graded, gets a copy of that grading without inference. The cache
is the grading table itself; its key is (patient, image SHA-256, model name, model version), so
promoting or rolling back the default changes the key and nothing needs deleting. Re-grades
always run the model.
"""
from __future__ import annotations

from datetime import timedelta

from . import metrics
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


def cached(client: TorchServeClient, screening: Screening) -> Grading | None:
    """This patient's latest grading of the same bytes by the current default version, if any."""
    version = client.default_model_version()
    if version is None:
        return None
    return (Grading.select().join(Screening)
            .where((Screening.patient == screening.patient_id) & (Screening.id != screening.id)
                   & (Screening.image_sha256 == screening.image_sha256)
                   & (Grading.model_name == client.model_name) & (Grading.model_version == version))
            .order_by(Grading.created_at.desc(), Grading.id.desc()).first())


def grade(client: TorchServeClient, screening: Screening, image: bytes, version: str | None = None,
          *, use_cache: bool = False) -> Grading:
    """Run the model on `image` (or, with use_cache, reuse an identical result) and store the
    grading. TorchServe's exceptions pass through untouched, with nothing written."""
    earlier = cached(client, screening) if use_cache and version is None else None
    if earlier is not None:
        metrics.RESULT_CACHE.labels("hit").inc()
        return _store(screening, client, _as_prediction(earlier), version)
    if use_cache:
        metrics.RESULT_CACHE.labels("miss").inc()
    return _store(screening, client, client.predict(image, screening.content_type, version), version)


def _as_prediction(g: Grading) -> dict:
    """An earlier grading in the shape TorchServe answers; its timings say it was not re-run."""
    return {"model": {"name": g.model_name, "version": g.model_version,
                      "synthetic_training_data": g.synthetic_training_data},
            "gradable": g.gradable, "grade": g.grade, "label": g.label, "probabilities": g.probabilities,
            "referable": g.referable, "referable_threshold": g.referable_threshold, "quality": g.quality,
            "disclaimer": g.disclaimer, "timings_ms": {"result_cache": "hit"}}


def _store(screening: Screening, client: TorchServeClient, prediction: dict, version: str | None) -> Grading:
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
    return grading
