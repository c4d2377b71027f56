"""Schema versions and the steps between them (playhouse.migrate).

A fresh database goes through every step, so the upgrade path is the path every install
takes and never drifts from "create from scratch". Steps use frozen copies of the models as
they were at that version, never the live models in models.py.
"""
from __future__ import annotations

import logging
import uuid

from peewee import (AutoField, BigAutoField, BooleanField, CharField, DateField, DateTimeField, FloatField,
                    ForeignKeyField, IntegerField, JSONField, Model, PostgresqlDatabase, TextField,
                    UUIDField)
from playhouse.migrate import SchemaMigrator, migrate as apply_operations

from .models import SchemaVersion, utcnow

log = logging.getLogger(__name__)


def _v1_models(database):
    """The schema as first released."""
    # Over 80 lines on purpose: the frozen v1 schema, one class per table, kept whole as released.

    class Base(Model):
        class Meta:
            database = None
            legacy_table_names = False

    class ApiKey(Base):
        id = UUIDField(primary_key=True, default=uuid.uuid4)
        prefix = CharField(max_length=16, unique=True)
        key_hash = CharField(max_length=64)
        role = CharField(max_length=16)
        label = CharField(max_length=200, default="")
        created_at = DateTimeField(default=utcnow)
        revoked_at = DateTimeField(null=True)

        class Meta:
            table_name = "api_key"

    class Patient(Base):
        id = UUIDField(primary_key=True, default=uuid.uuid4)
        name = TextField()
        birth_date = DateField(null=True)
        mrn = CharField(max_length=64, null=True, unique=True)
        sex = CharField(max_length=16, null=True)
        created_at = DateTimeField(default=utcnow, index=True)
        updated_at = DateTimeField(default=utcnow)

    class Screening(Base):
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

    class Grading(Base):
        id = UUIDField(primary_key=True, default=uuid.uuid4)
        screening = ForeignKeyField(Screening, backref="gradings", on_delete="CASCADE")
        model_name = CharField(max_length=100)
        model_version = CharField(max_length=50)
        gradable = BooleanField()
        grade = IntegerField(null=True)
        label = CharField(max_length=100, null=True)
        probabilities = JSONField(null=True)
        referable = BooleanField(null=True)
        referable_threshold = IntegerField(null=True)
        quality = JSONField()
        synthetic_training_data = BooleanField(default=False)
        disclaimer = TextField(null=True)
        created_at = DateTimeField(default=utcnow)

    class AuditEvent(Base):
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

    class SchemaVersionV1(Base):
        id = AutoField()
        version = IntegerField()
        applied_at = DateTimeField(default=utcnow)

        class Meta:
            table_name = "schema_version"

    models = [ApiKey, Patient, Screening, Grading, AuditEvent, SchemaVersionV1]
    database.bind(models, bind_refs=False, bind_backrefs=False)
    return {m.__name__: m for m in models}


def create_v1(database) -> None:
    database.create_tables(list(_v1_models(database).values()))


def upgrade_v1_to_v2(database) -> None:
    """Idempotent uploads, a grading lease, timings, and the indexes listing needs."""
    v1 = _v1_models(database)
    migrator = SchemaMigrator.from_database(database)
    apply_operations(
        migrator.add_column("screening", "created_by_id", ForeignKeyField(
            v1["ApiKey"], field=v1["ApiKey"].id, null=True, on_delete="SET NULL")),
        migrator.add_column("screening", "idempotency_key", CharField(max_length=255, null=True)),
        migrator.add_column("screening", "request_fingerprint", CharField(max_length=64, null=True)),
        migrator.add_column("screening", "grading_started_at", DateTimeField(null=True)),
        migrator.add_column("grading", "timings", JSONField(null=True)),
    )
    for sql in (
        "CREATE INDEX screening_patient_created ON screening (patient_id, created_at DESC, id DESC)",
        "CREATE UNIQUE INDEX screening_idempotency ON screening (created_by_id, idempotency_key)",
        "CREATE INDEX screening_status ON screening (status)",
        "CREATE INDEX audit_event_patient ON audit_event (patient_id, id)",
    ):
        database.execute_sql(sql)


def upgrade_v2_to_v3(database) -> None:
    """Counted grading attempts (a screening fails after grading.MAX_ATTEMPTS). One ALTER with a
    constant default: no table rewrite on PostgreSQL 11+, and on SQLite no table rebuild (which
    playhouse's NOT NULL step would do, and whose DROP TABLE cascades to the gradings)."""
    database.execute_sql("ALTER TABLE screening ADD COLUMN grading_attempts INTEGER NOT NULL DEFAULT 0")


def _v4_exam_model(database, v1: dict):
    """The exam table as schema v4 created it."""

    class Exam(Model):
        id = UUIDField(primary_key=True, default=uuid.uuid4)
        patient = ForeignKeyField(v1["Patient"], backref="exams", on_delete="CASCADE")
        performed_at = DateTimeField(default=utcnow)
        accession_number = CharField(max_length=64, null=True)
        created_at = DateTimeField(default=utcnow)
        created_by = ForeignKeyField(v1["ApiKey"], null=True, on_delete="SET NULL")
        idempotency_key = CharField(max_length=255, null=True)
        request_fingerprint = CharField(max_length=64, null=True)

        class Meta:
            database = None
            table_name = "exam"

    database.bind([Exam], bind_refs=False, bind_backrefs=False)
    return Exam


def upgrade_v3_to_v4(database) -> None:
    """Exams (visits): every photograph belongs to one, and has a field (disc/macula/other).

    Each existing screening gets an exam of its own with the screening's id as the exam's id
    (ids of different tables never meet), so one INSERT ... SELECT and one UPDATE move any
    amount of data. Its time is when the photograph was taken, else when it was uploaded."""
    v1 = _v1_models(database)
    exam = _v4_exam_model(database, v1)
    database.create_tables([exam])
    migrator = SchemaMigrator.from_database(database)
    apply_operations(migrator.add_column("screening", "exam_id", ForeignKeyField(
        exam, field=exam.id, null=True, on_delete="CASCADE")))
    # One statement both databases take as is; playhouse's add_column of a NOT NULL column
    # would rebuild the SQLite table (see below).
    database.execute_sql("ALTER TABLE screening ADD COLUMN field VARCHAR(8) NOT NULL DEFAULT 'other'")
    database.execute_sql(
        "INSERT INTO exam (id, patient_id, performed_at, created_at, created_by_id) "
        "SELECT id, patient_id, COALESCE(captured_at, created_at), created_at, created_by_id FROM screening")
    database.execute_sql("UPDATE screening SET exam_id = id")
    if isinstance(database, PostgresqlDatabase):
        # SQLite can only add NOT NULL by rebuilding the table, and dropping the old copy
        # fires ON DELETE CASCADE on every grading; there the code alone keeps it set.
        apply_operations(migrator.add_not_null("screening", "exam_id"))
    for sql in (  # add_column indexed screening.exam_id already
        "CREATE INDEX exam_patient_performed ON exam (patient_id, performed_at DESC, id DESC)",
        "CREATE UNIQUE INDEX exam_idempotency ON exam (created_by_id, idempotency_key)",
    ):
        database.execute_sql(sql)


def upgrade_v4_to_v5(database) -> None:
    """DICOM (issue 11): the UIDs of photographs that came as DICOM, and the state of each exam's
    report sent back to the PACS as Encapsulated PDF."""
    v1 = _v1_models(database)

    class DicomInstance(Model):
        id = UUIDField(primary_key=True, default=uuid.uuid4)
        screening = ForeignKeyField(v1["Screening"], backref="dicom", unique=True, on_delete="CASCADE")
        sop_instance_uid = CharField(max_length=64, unique=True)
        study_instance_uid = CharField(max_length=64, index=True)
        sop_class_uid = CharField(max_length=64)
        transfer_syntax = CharField(max_length=64)
        source = CharField(max_length=16)
        calling_ae_title = CharField(max_length=16, null=True)
        created_at = DateTimeField(default=utcnow)

        class Meta:
            table_name = "dicom_instance"

    exam_model = _v4_exam_model(database, v1)

    class DicomReport(Model):
        id = UUIDField(primary_key=True, default=uuid.uuid4)
        exam = ForeignKeyField(exam_model, backref="dicom_reports", unique=True, on_delete="CASCADE")
        status = CharField(max_length=16)
        attempts = IntegerField(default=0)
        images_fingerprint = CharField(max_length=64)
        last_error = CharField(max_length=64, null=True)
        sent_at = DateTimeField(null=True)
        updated_at = DateTimeField(default=utcnow)

        class Meta:
            table_name = "dicom_report"

    database.bind([DicomInstance, DicomReport], bind_refs=False, bind_backrefs=False)
    database.create_tables([DicomInstance, DicomReport])


def upgrade_v5_to_v6(database) -> None:
    """Shadow grading (issue 13): the candidate version in shadow, and its answers kept apart from
    the clinical gradings (control_api/shadow.py)."""
    v1 = _v1_models(database)

    class ShadowSetting(Model):
        id = AutoField()
        model_name = CharField(max_length=100)
        model_version = CharField(max_length=50)
        sample_rate = FloatField(default=1.0)
        started_at = DateTimeField(default=utcnow)
        started_by = ForeignKeyField(v1["ApiKey"], null=True, on_delete="SET NULL")
        stopped_at = DateTimeField(null=True)

        class Meta:
            table_name = "shadow_setting"

    class ShadowGrading(Model):
        id = UUIDField(primary_key=True, default=uuid.uuid4)
        screening = ForeignKeyField(v1["Screening"], on_delete="CASCADE")
        baseline = ForeignKeyField(v1["Grading"], null=True, on_delete="SET NULL")
        source = CharField(max_length=16, default="shadow")
        model_name = CharField(max_length=100)
        model_version = CharField(max_length=50, index=True)
        gradable = BooleanField()
        grade = IntegerField(null=True)
        label = CharField(max_length=100, null=True)
        probabilities = JSONField(null=True)
        referable = BooleanField(null=True)
        referable_threshold = IntegerField(null=True)
        quality = JSONField()
        timings = JSONField(null=True)
        created_at = DateTimeField(default=utcnow)

        class Meta:
            table_name = "shadow_grading"

    database.bind([ShadowSetting, ShadowGrading], bind_refs=False, bind_backrefs=False)
    database.create_tables([ShadowSetting, ShadowGrading])


STEPS = {1: create_v1, 2: upgrade_v1_to_v2, 3: upgrade_v2_to_v3, 4: upgrade_v3_to_v4, 5: upgrade_v4_to_v5,
         6: upgrade_v5_to_v6}
LATEST = max(STEPS)


def current_version(database) -> int:
    if not database.table_exists("schema_version"):
        return 0
    with database.bind_ctx([SchemaVersion]):
        row = SchemaVersion.select().order_by(SchemaVersion.version.desc()).first()
    return row.version if row else 0


def migrate(database, target: int = LATEST) -> list[int]:
    """Bring the schema up to `target`; returns the versions applied. Safe to run from several
    processes at once: each step runs in one transaction under a lock, and re-reads the version."""
    applied = []
    for version in sorted(v for v in STEPS if v <= target):
        with database.atomic(*_lock_args(database)):
            _lock(database)
            if current_version(database) >= version:
                continue
            log.info("migrating schema", extra={"schema_version": version})
            STEPS[version](database)
            with database.bind_ctx([SchemaVersion]):
                SchemaVersion.create(version=version)
            applied.append(version)
    return applied


def _lock_args(database) -> tuple:
    # SQLite: take the write lock up front so two migrators cannot interleave.
    return () if isinstance(database, PostgresqlDatabase) else ("IMMEDIATE",)


def _lock(database) -> None:
    if isinstance(database, PostgresqlDatabase):
        database.execute_sql("SELECT pg_advisory_xact_lock(727001)")
        # A step waiting for a table lock behind a long transaction would queue every request
        # behind itself: give up after a few seconds instead (rerun `flask migrate`). New index
        # steps on large tables belong in steps of their own with CREATE INDEX CONCURRENTLY,
        # which cannot run inside this transaction (docs/deployment.md).
        database.execute_sql("SET LOCAL lock_timeout = '5s'")
        database.execute_sql("SET LOCAL statement_timeout = 0")  # the API's per-statement limit is not for steps
