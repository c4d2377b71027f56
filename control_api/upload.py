"""The one upload path of both upload routes (blueprints/screenings.py and blueprints/exams.py):
store, record and grade one photograph.

Upload order: validate -> ask TorchServe (in the background) -> store the object -> await the
answer -> write the row -> store the grading; all rows and the audit row commit together.
No database lock is held while the model works (see _fresh_transaction). On PostgreSQL, whose
row locks stop nobody else, the row is written before the answer is awaited.
- storage fails: nothing was written (503);
- the row fails: the object is deleted again;
- TorchServe down or slow: the screening stays `pending` (202 + Retry-After) for
  `flask grade-pending` or a re-grade;
- TorchServe rejects the image (its 4xx): row and object are removed and the client gets 422
  with the model server's code and message; nothing half-done stays behind.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import uuid
from concurrent import futures

import peewee
from flask import current_app, g, request

from . import dicom, images, metrics
from .audit import on_rollback, target
from .db import db
from .errors import ApiError
from .grading import ask_early, failed_attempt, grade, release
from .models import DicomInstance, Exam, Grading, Patient, Screening, utcnow
from .storage import get_storage, screening_key, sha256_hex
from .torchserve import ImageRejected, TorchServeUnavailable, UnknownModelVersion, get_client

log = logging.getLogger(__name__)

IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")  # printable ASCII, no spaces
def stored_instance(image: dicom.DicomImage, patient) -> Screening | None:
    """The screening a DICOM file with this SOP Instance UID already made (a resend is idempotent);
    409 when it belongs to another patient."""
    row = DicomInstance.get_or_none(DicomInstance.sop_instance_uid == image.sop_instance_uid)
    if row is None:
        return None
    if row.screening.patient_id != patient.id:
        raise ApiError(409, "dicom_instance_exists",
                       "A DICOM file with this SOP Instance UID is already stored for another patient.")
    return row.screening


def study_exam(study_instance_uid: str, patient) -> Exam | None:
    """The exam an earlier photograph of this DICOM study went to (one exam per study)."""
    row = (DicomInstance.select(DicomInstance, Screening).join(Screening)
           .where((DicomInstance.study_instance_uid == study_instance_uid) & (Screening.patient == patient.id))
           .first())
    return row.screening.exam if row else None


def record_instance(screening: Screening, image: dicom.DicomImage, source: str, calling_ae: str | None = None):
    return DicomInstance.create(
        screening=screening, sop_instance_uid=image.sop_instance_uid, study_instance_uid=image.study_instance_uid,
        sop_class_uid=image.sop_class_uid, transfer_syntax=image.transfer_syntax, source=source,
        calling_ae_title=calling_ae)


def _read_upload(upload) -> bytes:
    limit = current_app.extensions["clarity"]["settings"].max_upload_bytes
    data = upload.stream.read(limit + 1)
    if len(data) > limit:
        raise ApiError(413, "payload_too_large", f"The image is larger than {limit} bytes.")
    return data


def _fingerprint(patient_id, photo: dicom.Photo, form: dict, sha256: str, exam_id) -> str:
    captured = photo.captured_at
    parts = [str(patient_id), photo.eye, captured.isoformat() if captured else None, photo.camera, sha256]
    # Appended only when used, so uploads made before exams existed still replay.
    if exam_id is not None:
        parts += ["exam", str(exam_id)]
    if form.get("field", "other") != "other":
        parts += ["field", form["field"]]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def _previous(idempotency_key: str, fingerprint: str) -> Screening | None:
    """The screening an earlier request with this key made, if any (409 if it asked for something else)."""
    earlier = Screening.get_or_none((Screening.created_by == g.api_key.id)
                                    & (Screening.idempotency_key == idempotency_key))
    if earlier is not None and earlier.request_fingerprint != fingerprint:
        raise ApiError(409, "idempotency_key_reused",
                       "This Idempotency-Key was already used for a different upload.")
    return earlier


def _discard(screening: Screening, new_exam: Exam | None) -> None:
    """Remove a screening that must not stay (its upload failed after the row was written),
    and the exam it opened, if it opened one."""
    with db.atomic():
        Grading.delete().where(Grading.screening == screening.id).execute()
        DicomInstance.delete().where(DicomInstance.screening == screening.id).execute()
        Screening.delete().where(Screening.id == screening.id).execute()
        if new_exam is not None:
            Exam.delete().where(Exam.id == new_exam.id).execute()
    _delete_object(screening.image_key)


def _delete_object(key: str) -> None:
    try:
        get_storage().delete(key)
    except Exception as exc:  # the object is orphaned; `flask reconcile` finds it
        log.error("could not delete object", extra={"key": key, "error_type": type(exc).__name__})


def read_idempotency_key() -> str | None:
    """The request's Idempotency-Key header, if any (400 unless 1-255 printable ASCII characters)."""
    key = request.headers.get("Idempotency-Key")
    if key is not None and not IDEMPOTENCY_KEY.match(key):
        raise ApiError(400, "invalid_idempotency_key", "Idempotency-Key must be 1-255 printable ASCII characters.")
    return key


def upload_photograph(patient: Patient, form: dict, exam: Exam | None):
    """Store, record and grade one photograph: the one upload path of both upload routes.

    `exam` None opens an exam of its own for it (in the same transaction as the row). Returns
    (screening, replayed). Whatever fails, nothing half-written stays behind (module docstring).
    """
    idempotency_key = read_idempotency_key()
    data = _read_upload(form["image"])
    photo = dicom.photo_from_upload(data, form["image"].mimetype, form, patient)
    sha256 = sha256_hex(data)
    fingerprint = _fingerprint(patient.id, photo, form, sha256, exam.id if exam else None)
    if earlier := _made_before(idempotency_key, fingerprint, photo, patient):
        target(resource_id=earlier.id)
        return earlier, True
    if exam is None and photo.dicom:
        exam = study_exam(photo.dicom.study_instance_uid, patient)  # one exam per DICOM study

    new_exam = None
    if exam is None:
        new_exam = exam = Exam(id=uuid.uuid4(), patient=patient, performed_at=photo.captured_at or utcnow(),
                               created_by=g.api_key.id)
    screening_id = uuid.uuid4()
    screening = Screening(
        id=screening_id, patient=patient, exam=exam, eye=photo.eye, field=form.get("field") or "other",
        captured_at=photo.captured_at,
        camera=photo.camera, image_key=screening_key(screening_id), image_size=len(data),
        image_sha256=sha256, content_type=photo.content_type, status="pending",
        created_by=g.api_key.id, idempotency_key=idempotency_key, request_fingerprint=fingerprint,
        grading_started_at=utcnow())
    prepared = photo.dicom.model_input() if photo.dicom else None
    early = _store_while_predicting(screening, data, photo, prepared)
    _fresh_transaction()
    # The row is in the view's transaction (audit.py): if that rolls back, the object goes too.
    on_rollback(lambda: _delete_object(screening.image_key))
    try:
        with db.atomic():
            if new_exam is not None:
                new_exam.save(force_insert=True)
            screening.save(force_insert=True)
            if photo.dicom:
                record_instance(screening, photo.dicom, source="upload")
    except peewee.IntegrityError:
        # Two requests with one Idempotency-Key (or one SOP instance sent twice at once) raced;
        # the other one's row won.
        _delete_object(screening.image_key)
        earlier = _made_before(idempotency_key, fingerprint, photo, patient)
        if earlier is None:
            raise
        target(resource_id=earlier.id)
        return earlier, True
    except BaseException:
        _delete_object(screening.image_key)
        raise
    target(resource_id=screening.id)
    log.info("screening stored", extra={"screening_id": str(screening.id), "patient_id": str(patient.id),
                                        "exam_id": str(exam.id), "bytes": len(data),
                                        "content_type": photo.content_type})
    _grade_stored(screening, data, photo, prepared, early, new_exam)
    return screening, False


def _made_before(idempotency_key: str | None, fingerprint: str, photo: dicom.Photo, patient) -> Screening | None:
    """The screening an earlier request made of this one: the same Idempotency-Key (409 if it
    asked for something else), or the same DICOM SOP instance (409 if another patient's)."""
    earlier = _previous(idempotency_key, fingerprint) if idempotency_key else None
    if earlier is None and photo.dicom:
        earlier = stored_instance(photo.dicom, patient)
    return earlier


def _store_while_predicting(screening: Screening, data: bytes, photo: dicom.Photo, prepared):
    """Put the object in storage while TorchServe already grades it; the early prediction's
    future (its answer or its exception, which grade() takes), or None. On SQLite the future is
    done when this returns, so that the rows are written after the answer (_fresh_transaction
    says why); on PostgreSQL the rows are written while TorchServe still works, and grade()
    waits for the answer."""
    early = ask_early(get_client(), screening, data, prepared)
    storage = get_storage()
    with metrics.STORAGE_SECONDS.labels(storage.name, "put").time():
        storage.put(screening.image_key, data, content_type=photo.content_type, sha256=screening.image_sha256)
    if early is not None and _one_writer():
        futures.wait([early])
    return early


def _grade_stored(screening: Screening, data: bytes, photo: dicom.Photo, prepared, early,
                  new_exam: Exam | None) -> None:
    """Grade a screening just stored. TorchServe away: it stays pending (an undecodable image
    is discarded with its 422 instead). TorchServe rejects it: discarded, 422."""
    try:
        grade(get_client(), screening, data, prepared=prepared, use_cache=True, early=early)
    except (TorchServeUnavailable, UnknownModelVersion) as exc:
        # No model read the bytes, so check them here: an undecodable image is never kept pending.
        # (dicom.read already decoded a DICOM photograph's pixels.)
        try:
            if not photo.dicom:
                images.verify_decodable(data, images.inspect(data))
        except ApiError:
            _discard(screening, new_exam)
            raise
        if getattr(exc, "reached", False):
            failed_attempt(screening)  # TorchServe took it and did not grade it: counted
        else:
            release(screening)
        metrics.SCREENINGS.labels("pending").inc()
        log.warning("grading deferred", extra={"screening_id": str(screening.id), "reason": str(exc)})
    except ImageRejected as exc:
        _discard(screening, new_exam)
        metrics.SCREENINGS.labels("rejected").inc()
        raise ApiError(422, exc.code, exc.message) from None


def _fresh_transaction() -> None:
    """Commit the view's transaction so far (only reads) and begin another before the first write.

    The view runs in one transaction (audit.audited). Its reads began a snapshot before the model was
    asked; on SQLite a snapshot that another upload has written past since cannot become a write
    transaction (SQLITE_BUSY at once, a 503), and writing first and waiting afterwards would hold the
    one write lock for the whole inference. Nothing is written yet, so every write and the audit row
    still commit together. PostgreSQL (READ COMMITTED, row locks) needs none of it: two round trips."""
    if db.transaction_depth() == 1 and _one_writer():
        db.top_transaction().commit()


def _one_writer() -> bool:
    """True on SQLite, where one connection at a time may write (PostgreSQL locks rows)."""
    return isinstance(db.obj, peewee.SqliteDatabase)
