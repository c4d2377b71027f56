"""Database models. Public ids are UUIDs; timestamps are naive UTC (see `utcnow`).

PHI lives only in Patient (name, birth_date, mrn). Every other table refers to patients by
UUID, so audit rows, object keys, logs and metrics never need PHI.
The schema itself is built and upgraded by migrations.py, not by create_tables().
"""
from __future__ import annotations

import uuid
from datetime import datetime, timezone

from peewee import (AutoField, BigAutoField, BooleanField, CharField, DateField, DateTimeField, FloatField,
                    ForeignKeyField, IntegerField, JSONField, Model, TextField, UUIDField)

from .db import db

EYES = ("left", "right")
SEXES = ("female", "male", "other", "unknown")
STATUSES = ("pending", "graded", "ungradable", "failed")
FIELDS = ("disc", "macula", "other")  # which part of the retina a photograph centres on
ROLES = ("clinician", "admin", "auditor")


def utcnow() -> datetime:
    """Naive UTC: PostgreSQL `timestamp` and SQLite text both store it without surprises."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


class BaseModel(Model):
    class Meta:
        database = db
        legacy_table_names = False


class ApiKey(BaseModel):
    id = UUIDField(primary_key=True, default=uuid.uuid4)
    prefix = CharField(max_length=16, unique=True)  # the visible part, used for lookup and in logs
    key_hash = CharField(max_length=64)  # sha256 of the whole token; the token itself is never stored
    role = CharField(max_length=16)
    label = CharField(max_length=200, default="")
    created_at = DateTimeField(default=utcnow)
    revoked_at = DateTimeField(null=True)

    class Meta:
        table_name = "api_key"


class Patient(BaseModel):
    id = UUIDField(primary_key=True, default=uuid.uuid4)
    name = TextField()
    birth_date = DateField(null=True)
    mrn = CharField(max_length=64, null=True, unique=True)  # medical record number
    sex = CharField(max_length=16, null=True)
    created_at = DateTimeField(default=utcnow, index=True)
    updated_at = DateTimeField(default=utcnow)


class Exam(BaseModel):
    """One screening visit: the photographs of both eyes taken together. Added in schema v4."""

    id = UUIDField(primary_key=True, default=uuid.uuid4)
    patient = ForeignKeyField(Patient, backref="exams", on_delete="CASCADE")
    performed_at = DateTimeField(default=utcnow)
    # The clinic's visit identifier: PHI-like, so never in URLs, logs, keys or labels.
    accession_number = CharField(max_length=64, null=True)
    created_at = DateTimeField(default=utcnow)
    created_by = ForeignKeyField(ApiKey, null=True, on_delete="SET NULL")
    idempotency_key = CharField(max_length=255, null=True)
    request_fingerprint = CharField(max_length=64, null=True)


class Screening(BaseModel):
    """One photograph of one eye, taken at an exam."""

    id = UUIDField(primary_key=True, default=uuid.uuid4)
    patient = ForeignKeyField(Patient, backref="screenings", on_delete="CASCADE")
    eye = CharField(max_length=8)
    captured_at = DateTimeField(null=True)
    camera = CharField(max_length=200, null=True)
    image_key = CharField(max_length=200, unique=True)
    image_size = IntegerField()
    image_sha256 = CharField(max_length=64)
    content_type = CharField(max_length=64)
    status = CharField(max_length=16, default="pending")
    created_at = DateTimeField(default=utcnow)
    updated_at = DateTimeField(default=utcnow)
    # Added in schema v2.
    created_by = ForeignKeyField(ApiKey, null=True, on_delete="SET NULL")
    idempotency_key = CharField(max_length=255, null=True)
    request_fingerprint = CharField(max_length=64, null=True)  # sha256 of what the upload asked for
    grading_started_at = DateTimeField(null=True)  # lease: who is asking TorchServe right now
    # Added in schema v3: attempts TorchServe was reached but did not grade (grading.py).
    grading_attempts = IntegerField(default=0)
    # Added in schema v4: every photograph belongs to an exam (the migration gave each older
    # screening an exam of its own).
    exam = ForeignKeyField(Exam, backref="images", on_delete="CASCADE")
    field = CharField(max_length=8, default="other")

    def history(self) -> list["Grading"]:
        return list(self.gradings.order_by(Grading.created_at.desc(), Grading.id.desc()))

    @property
    def latest_grading(self) -> "Grading | None":
        # Listing pages set _latest for a whole page in one query (see blueprints/screenings.py).
        if not hasattr(self, "_latest"):
            self._latest = self.gradings.order_by(Grading.created_at.desc(), Grading.id.desc()).first()
        return self._latest


class ModelAnswer(BaseModel):
    """The columns of one model answer, shared by Grading (clinical) and ShadowGrading (a
    candidate's). Not a table of its own."""

    model_name = CharField(max_length=100)
    model_version = CharField(max_length=50)
    gradable = BooleanField()
    grade = IntegerField(null=True)
    label = CharField(max_length=100, null=True)
    probabilities = JSONField(null=True)
    referable = BooleanField(null=True)
    referable_threshold = IntegerField(null=True)
    quality = JSONField()


class Grading(ModelAnswer):
    """One model run on one screening; re-grading adds a row, history is kept."""

    id = UUIDField(primary_key=True, default=uuid.uuid4)
    screening = ForeignKeyField(Screening, backref="gradings", on_delete="CASCADE")
    synthetic_training_data = BooleanField(default=False)
    disclaimer = TextField(null=True)
    created_at = DateTimeField(default=utcnow)
    # Added in schema v2.
    timings = JSONField(null=True)


class AuditEvent(BaseModel):
    """Who touched which patient data, when, and how it went. UUIDs only, never PHI."""

    id = BigAutoField()
    at = DateTimeField(default=utcnow)
    actor_key_id = UUIDField(null=True)
    actor_prefix = CharField(max_length=16, null=True)
    action = CharField(max_length=64)
    resource_type = CharField(max_length=32)
    resource_id = UUIDField(null=True)
    patient_id = UUIDField(null=True)
    request_id = CharField(max_length=64)
    outcome = CharField(max_length=16)

    class Meta:
        table_name = "audit_event"


class DicomInstance(BaseModel):
    """A photograph that arrived as DICOM. The SOP Instance UID makes a second store of the same
    image idempotent; the Study Instance UID groups a study's images. UIDs are never logged."""

    id = UUIDField(primary_key=True, default=uuid.uuid4)
    screening = ForeignKeyField(Screening, backref="dicom", unique=True, on_delete="CASCADE")
    sop_instance_uid = CharField(max_length=64, unique=True)
    study_instance_uid = CharField(max_length=64, index=True)
    sop_class_uid = CharField(max_length=64)
    transfer_syntax = CharField(max_length=64)
    source = CharField(max_length=16)  # "upload" (HTTP) or "receiver" (C-STORE)
    calling_ae_title = CharField(max_length=16, null=True)
    created_at = DateTimeField(default=utcnow)

    class Meta:
        table_name = "dicom_instance"


class DicomReport(BaseModel):
    """The exam's report sent to the PACS as Encapsulated PDF (control_api/dicom_report.py)."""

    id = UUIDField(primary_key=True, default=uuid.uuid4)
    exam = ForeignKeyField(Exam, backref="dicom_reports", unique=True, on_delete="CASCADE")
    status = CharField(max_length=16)  # pending, sent, failed
    attempts = IntegerField(default=0)
    images_fingerprint = CharField(max_length=64)  # which gradings the last report showed
    last_error = CharField(max_length=64, null=True)
    sent_at = DateTimeField(null=True)
    updated_at = DateTimeField(default=utcnow)

    class Meta:
        table_name = "dicom_report"


class ShadowSetting(BaseModel):
    """A candidate model version put in shadow by an admin (schema v6). The row whose
    `stopped_at` is null is the active one; earlier rows are the record of past trials."""

    id = AutoField()
    model_name = CharField(max_length=100)
    model_version = CharField(max_length=50)
    sample_rate = FloatField(default=1.0)  # share of new photographs it grades, 0 < rate <= 1
    started_at = DateTimeField(default=utcnow)
    started_by = ForeignKeyField(ApiKey, null=True, on_delete="SET NULL")
    stopped_at = DateTimeField(null=True)

    class Meta:
        table_name = "shadow_setting"


class ShadowGrading(ModelAnswer):
    """A candidate version's answer on a photograph, kept apart from Grading on purpose: every
    clinical read (latest result, history, summary, reports, exports) reads Grading only, so
    nothing here can reach a clinician. `baseline` is the clinical grading it is compared with.
    `source` is "shadow" (graded in the background after an upload) or "regrade" (an admin
    re-graded with a named version)."""

    id = UUIDField(primary_key=True, default=uuid.uuid4)
    screening = ForeignKeyField(Screening, backref="shadow_gradings", on_delete="CASCADE")
    baseline = ForeignKeyField(Grading, null=True, backref="shadow_gradings", on_delete="SET NULL")
    source = CharField(max_length=16, default="shadow")
    model_version = CharField(max_length=50, index=True)  # the report selects by it
    timings = JSONField(null=True)
    created_at = DateTimeField(default=utcnow)

    class Meta:
        table_name = "shadow_grading"


class SchemaVersion(BaseModel):
    id = AutoField()
    version = IntegerField()
    applied_at = DateTimeField(default=utcnow)

    class Meta:
        table_name = "schema_version"


MODELS = (ApiKey, Patient, Exam, Screening, Grading, AuditEvent, DicomInstance, DicomReport, SchemaVersion,
          ShadowSetting, ShadowGrading)
