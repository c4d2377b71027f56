"""Asking the model server about one screening and keeping its answer.

Shared by the upload, the re-grade endpoint, `flask grade-pending` and the background grader
(`flask grade-worker`). A lease column keeps two of them from grading the same pending
screening at once: whoever sets `grading_started_at` first grades it; a lease older than LEASE
(a crashed worker) may be taken over.

Attempts are counted: an attempt in which TorchServe was reached but did not grade (a 5xx, a
timeout: a worker that crashes on this image looks like that) adds one, and after
MAX_ATTEMPTS the screening is `failed`, so one poisonous image cannot stop the queue behind it.
TorchServe being unreachable or busy (nothing was asked) counts nothing: the screening waits.

Result cache: an upload whose bytes (SHA-256) this patient already sent, and which the current
default model version already graded, gets a copy of that grading without inference. The cache
is the grading table itself; its key is (patient, image SHA-256, model name, model version), so
promoting or rolling back the default changes the key and nothing needs deleting. Re-grades
always run the model. A cache hit is not offered to the version in shadow: the same bytes were
offered when the default first graded them, and a copy would count one photograph twice in the
shadow agreement report.

An upload asks TorchServe early (`ask_early`): the prediction runs in a background thread while
the view stores the object and writes the row, so their time hides behind inference. The answer
still waits for all three, so a 201 means what it meant: object stored, row and grading committed.
"""
from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import timedelta

from flask import current_app, has_app_context
from peewee import Case, fn

from . import dicom, metrics, shadow
from .db import db
from .models import Grading, Screening, utcnow
from .storage import ObjectCorrupted, ObjectMissing, StorageUnavailable
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


def model_input(screening: Screening, image: bytes) -> tuple[bytes, str]:
    """What TorchServe reads for this photograph: the stored bytes, or for DICOM its JPEG frame or
    a lossless PNG of its pixels (control_api/dicom.py says why the API does that step)."""
    if screening.content_type == dicom.CONTENT_TYPE:
        return dicom.read(image, check_pixels=False).model_input()
    return image, screening.content_type


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


_early: tuple[int, ThreadPoolExecutor] | None = None  # (pid, pool): a forked worker makes its own
_early_lock = threading.Lock()


def ask_early(client: TorchServeClient, screening: Screening, image: bytes,
              prepared: tuple[bytes, str] | None = None) -> Future | None:
    """Start the prediction of an upload now, in the background; None when the result cache
    will answer (nothing to ask). Pass the future to grade(early=...)."""
    global _early
    if cached(client, screening) is not None:
        return None
    with _early_lock:
        if _early is None or _early[0] != os.getpid():
            # predict() admits at most max_in_flight at once and answers the rest "busy" at once.
            _early = (os.getpid(), ThreadPoolExecutor(max_workers=16, thread_name_prefix="predict"))
    return _early[1].submit(_predict, client, prepared or model_input(screening, image))


def grade(client: TorchServeClient, screening: Screening, image: bytes, version: str | None = None,
          prepared: tuple[bytes, str] | None = None, *, use_cache: bool = False,
          early: Future | None = None, offer_shadow: bool = True) -> Grading:
    """Run the model on `image` (the stored bytes; `prepared` when the caller already has the
    model input), or with use_cache reuse an identical result, or take the answer of `early`;
    store the grading. TorchServe's exceptions pass through untouched, with nothing written.
    Once the grading is stored, the version in shadow, if any, is offered the same model input
    (shadow.py); a result-cache hit is not (module docstring), nor is what offer_shadow=False
    grades (a re-grade of a graded photograph)."""
    if early is not None:
        metrics.RESULT_CACHE.labels("miss").inc()
        grading = _store(screening, client, early.result(), version)
    else:
        earlier = cached(client, screening) if use_cache and version is None else None
        if earlier is not None:
            metrics.RESULT_CACHE.labels("hit").inc()
            return _store(screening, client, _as_prediction(earlier), version)
        if use_cache:
            metrics.RESULT_CACHE.labels("miss").inc()
        prepared = prepared or model_input(screening, image)
        grading = _store(screening, client, _predict(client, prepared, version), version)
    if offer_shadow and has_app_context():
        current_app.extensions["clarity"]["shadow"].offer(screening, prepared or model_input(screening, image),
                                                          grading)
    return grading


def _predict(client: TorchServeClient, model_input_: tuple[bytes, str], version: str | None = None) -> dict:
    with shadow.clinical_call():  # shadow work on this host waits for it (shadow.py)
        return client.predict(*model_input_, version)


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
    shadow.observe(grading.model_version, grading.gradable, grading.grade, grading.quality)
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
        except (ImageRejected, ObjectMissing, ObjectCorrupted) as exc:
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
