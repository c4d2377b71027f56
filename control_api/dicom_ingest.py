"""What the DICOM receiver does with a file once it has answered Success: the spool it is kept in
until the database holds it, the ingest into storage and rows (with audit rows under the
receiver's own identity), grading, and the report back to the PACS. The network side (the
C-STORE SCP, health port, ingest loop) is control_api/dicom_receiver.py, whose docstring
describes the whole path."""
from __future__ import annotations

import json
import logging
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import peewee
from prometheus_client import Counter

from . import dicom, dicom_report, metrics, outcome, report
from .db import db
from .grading import claim, grade, release
from .upload import study_exam
from .models import ApiKey, AuditEvent, DicomInstance, Exam, Patient, Screening, utcnow
from .storage import get_storage, screening_key, sha256_hex
from .torchserve import ImageRejected, TorchServeUnavailable, UnknownModelVersion, get_client

log = logging.getLogger("control_api.dicom_receiver")  # one logger name for the receiver's lines

RECEIVER_PREFIX = "dicom-receiver"
REPORTS = Counter("clarity_dicom_reports_total", "Exam reports sent to the PACS, by outcome", ["outcome"])

# --------------------------------------------------------------------------- spool

class Spool:
    """Received files waiting for the database: `<uuid>.dcm` plus `<uuid>.json` (calling AE, time)."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)

    def put(self, data: bytes, calling_ae: str) -> str:
        item = uuid.uuid4().hex
        self._write(f"{item}.json", json.dumps({"calling_ae": calling_ae, "received": time.time()}).encode())
        self._write(f"{item}.dcm", data)  # last: a .dcm file is complete and has its .json
        fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(fd)  # the renames themselves are durable
        finally:
            os.close(fd)
        return item

    def _write(self, name: str, data: bytes) -> None:
        tmp = self.dir / f".{name}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.dir / name)

    def items(self) -> list[str]:
        files = sorted(self.dir.glob("*.dcm"), key=lambda p: (p.stat().st_mtime, p.name))
        return [p.stem for p in files]

    def read(self, item: str) -> tuple[bytes, dict]:
        meta_path = self.dir / f"{item}.json"
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        return (self.dir / f"{item}.dcm").read_bytes(), meta

    def remove(self, item: str) -> None:
        for suffix in (".dcm", ".json"):
            (self.dir / f"{item}{suffix}").unlink(missing_ok=True)

    def check(self) -> None:
        probe = self.dir / ".probe"
        probe.write_bytes(b"ok")
        probe.unlink()


# --------------------------------------------------------------------------- ingest

def receiver_key() -> ApiKey:
    """The receiver's audit identity: an API-key row without a token, revoked, never usable."""
    key = ApiKey.get_or_none(ApiKey.prefix == RECEIVER_PREFIX)
    if key is None:
        try:
            with db.atomic():
                key = ApiKey.create(prefix=RECEIVER_PREFIX, key_hash="-" * 64, role="clinician",
                                    label="DICOM receiver (audit identity; no token)", revoked_at=utcnow())
        except peewee.IntegrityError:  # another receiver made it first
            key = ApiKey.get(ApiKey.prefix == RECEIVER_PREFIX)
    return key


def audit(key: ApiKey, action: str, resource_type: str, resource_id, patient_id, request_id: str,
          outcome: str = "success") -> None:
    AuditEvent.create(actor_key_id=key.id, actor_prefix=key.prefix, action=action, resource_type=resource_type,
                      resource_id=resource_id, patient_id=patient_id, request_id=request_id, outcome=outcome)


@dataclass
class Ingested:
    outcome: str  # "stored" or "duplicate"
    screening: Screening


def ingest(data: bytes, calling_ae: str | None, request_id: str) -> Ingested:
    """Put one received file into storage and the database (idempotent on the SOP Instance UID).
    Raises peewee/storage errors when those are down; the caller keeps the file and retries."""
    image = dicom.read(data, check_pixels=False)  # checked on receipt; this re-reads the header
    key = receiver_key()
    earlier = DicomInstance.get_or_none(DicomInstance.sop_instance_uid == image.sop_instance_uid)
    if earlier is not None:
        return Ingested("duplicate", earlier.screening)
    screening_id = uuid.uuid4()
    sha256 = sha256_hex(data)
    storage = get_storage()
    with metrics.STORAGE_SECONDS.labels(storage.name, "put").time():
        storage.put(screening_key(screening_id), data, content_type=dicom.CONTENT_TYPE, sha256=sha256)
    try:
        with db.atomic():
            patient, created = _patient(image.patient)
            if created:
                audit(key, "patient.create", "patient", patient.id, patient.id, request_id)
            exam = study_exam(image.study_instance_uid, patient)  # one exam per StudyInstanceUID
            if exam is None:
                exam = Exam.create(patient=patient, performed_at=image.captured_at or utcnow(),
                                   accession_number=(image.patient.accession_number or "")[:64] or None,
                                   created_by=key.id)
                audit(key, "exam.create", "exam", exam.id, patient.id, request_id)
            screening = Screening.create(
                id=screening_id, patient=patient, exam=exam, eye=image.eye, captured_at=image.captured_at, camera=image.camera,
                image_key=screening_key(screening_id), image_size=len(data), image_sha256=sha256,
                content_type=dicom.CONTENT_TYPE, status="pending", created_by=key.id)
            DicomInstance.create(
                screening=screening, sop_instance_uid=image.sop_instance_uid,
                study_instance_uid=image.study_instance_uid, sop_class_uid=image.sop_class_uid,
                transfer_syntax=image.transfer_syntax, source="receiver", calling_ae_title=calling_ae)
            audit(key, "screening.create", "screening", screening.id, patient.id, request_id)
    except peewee.IntegrityError:
        _delete_quietly(storage, screening_key(screening_id))
        earlier = DicomInstance.get_or_none(DicomInstance.sop_instance_uid == image.sop_instance_uid)
        if earlier is None:
            raise
        return Ingested("duplicate", earlier.screening)  # another receiver stored it meanwhile
    except BaseException:
        _delete_quietly(storage, screening_key(screening_id))
        raise
    return Ingested("stored", screening)


def _patient(header: dicom.PatientHeader) -> tuple[Patient, bool]:
    patient = Patient.get_or_none(Patient.mrn == header.patient_id)
    if patient is not None:
        return patient, False
    return Patient.create(name=header.name or "Unknown (DICOM)", birth_date=header.birth_date,
                          mrn=header.patient_id, sex=header.sex), True


def _delete_quietly(storage, key: str) -> None:
    try:
        storage.delete(key)
    except Exception as exc:  # noqa: BLE001 - `flask reconcile` finds an orphaned object
        log.error("could not delete object", extra={"key": key, "error_type": type(exc).__name__})


def grade_screening(screening: Screening, request_id: str) -> str:
    """Grade one receiver screening; its status, or "pending" when TorchServe is unavailable."""
    if not claim(screening.id):
        return "skipped"
    screening = Screening.get_by_id(screening.id)
    data = get_storage().get(screening.image_key, sha256=screening.image_sha256)
    try:
        grade(get_client(), screening, data)
    except (TorchServeUnavailable, UnknownModelVersion):
        release(screening)
        return "pending"
    except ImageRejected as exc:
        Screening.update(status="failed", grading_started_at=None, updated_at=utcnow()).where(
            Screening.id == screening.id).execute()
        log.warning("model server refused a received photograph",
                    extra={"screening_id": str(screening.id), "code": exc.code})
        return "failed"
    audit(receiver_key(), "screening.grade", "screening", screening.id, screening.patient_id, request_id)
    return screening.status


def send_report(exam, request_id: str) -> str | None:
    """The exam's report to the PACS when the exam is graded (control_api/dicom_report.py)."""
    from flask import current_app

    settings = current_app.extensions["clarity"]["settings"]
    destination = dicom_report.parse_destination(settings.dicom_report_destination)
    if destination is None:
        return None
    key = receiver_key()

    def audited(row):
        audit(key, "exam.report.send", "exam", exam.id, exam.patient_id, request_id)

    row = dicom_report.deliver(outcome.evaluate(exam), destination, settings.dicom_ae_title,
                               lambda result: report.render(exam.patient, result), on_sent=audited)
    if row is not None:
        REPORTS.labels(row.status).inc()
    return row.status if row else None
