"""Asking the model server about one screening and keeping its answer.

Shared by the upload, the re-grade endpoint, `flask grade-pending` and the background grader
(`flask grade-worker`). A lease column keeps two of them from grading the same pending
screening at once: whoever sets `grading_started_at` first grades it; a lease older than LEASE
(a crashed worker) may be taken over.

Attempts are counted: an attempt in which TorchServe was reached but did not grade (a 5xx, a
timeout: a worker that crashes on this image looks like that) adds one, and after
MAX_ATTEMPTS the screening is `failed`, so one poisonous image cannot stop the queue behind it.
TorchServe being unreachable or busy (nothing was asked) counts nothing: the screening waits.
"""
from __future__ import annotations

import logging
from datetime import timedelta

from flask import current_app, has_app_context
from peewee import Case, fn

from . import metrics, shadow
from .db import db
from .models import Grading, Screening, utcnow
from .storage import IntegrityError, ObjectMissing, StorageUnavailable
from .torchserve import ImageRejected, TorchServeClient, TorchServeUnavailable, UnknownModelVersion

log = logging.getLogger(__name__)

LEASE = timedelta(minutes=5)
MAX_ATTEMPTS = 5


def claim(screening_id) -> bool:
    now = utcnow()
    return Screening.update(grading_started_at=now).where(
        (Screening.id == screening_id) & (Screening.status == "pending")
        & (Screening.grading_started_at.is_null() | (Screening.grading_started_at < now - LEASE))
    ).execute() == 1


def release(screening: Screening) -> None:
    Screening.update(grading_started_at=None).where(Screening.id == screening.id).execute()


def failed_attempt(screening: Screening) -> bool:
    """Count an attempt TorchServe did not finish and release the lease; True when that was
    the last one allowed (the screening is now `failed`)."""
    attempts = Screening.grading_attempts + 1
    Screening.update(
        grading_attempts=attempts, grading_started_at=None, updated_at=utcnow(),
        status=Case(None, [(attempts >= MAX_ATTEMPTS, "failed")], Screening.status),
    ).where(Screening.id == screening.id).execute()
    status = Screening.select(Screening.status).where(Screening.id == screening.id).scalar()
    if status == "failed":
        metrics.SCREENINGS.labels("failed").inc()
        return True
    return False


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


def grade_pending(client, storage, limit: int | None = None, say=lambda line: None) -> dict:
    """Grade pending screenings once each, oldest first. Stops early only when TorchServe is
    not there at all (nothing can be graded now); goes on past any one screening's failure."""
    query = (Screening.select(Screening.id)
             .where((Screening.status == "pending") & (Screening.grading_attempts < MAX_ATTEMPTS))
             .order_by(Screening.created_at))
    counts = {"graded": 0, "ungradable": 0, "failed": 0, "retry": 0, "skipped": 0, "stopped": 0}
    for row in query.limit(limit) if limit else query:
        if not claim(row.id):
            counts["skipped"] += 1  # someone else is grading it right now
            continue
        screening = Screening.get_by_id(row.id)
        try:
            grade(client, screening, storage.get(screening.image_key, sha256=screening.image_sha256))
        except TorchServeUnavailable as exc:
            if not exc.reached:
                release(screening)
                counts["stopped"] = 1
                say(f"stopped: {exc}; the rest stay pending")
                break
            last = failed_attempt(screening)
            counts["failed" if last else "retry"] += 1
            say(f"{screening.id} {'failed' if last else 'will be retried'}: {exc}")
            continue
        except (UnknownModelVersion, StorageUnavailable) as exc:
            release(screening)
            counts["stopped"] = 1
            say(f"stopped: {exc}; the rest stay pending")
            break
        except (ImageRejected, ObjectMissing, IntegrityError) as exc:
            Screening.update(status="failed", grading_started_at=None, updated_at=utcnow()).where(
                Screening.id == screening.id).execute()
            metrics.SCREENINGS.labels("failed").inc()
            say(f"{screening.id} failed: {getattr(exc, 'code', type(exc).__name__)}")
            counts["failed"] += 1
            continue
        counts[screening.status] += 1
        say(f"{screening.id} {screening.status}")
    return counts


def backlog() -> tuple[int, float]:
    """(pending screenings, age in seconds of the oldest one) for the backlog metrics."""
    count, oldest = Screening.select(fn.COUNT(Screening.id), fn.MIN(Screening.created_at)).where(
        Screening.status == "pending").scalar(as_tuple=True)
    if not oldest:
        return int(count or 0), 0.0
    if isinstance(oldest, str):  # SQLite hands aggregates back as text
        from datetime import datetime

        oldest = datetime.fromisoformat(oldest)
    return int(count or 0), max(0.0, (utcnow() - oldest).total_seconds())
