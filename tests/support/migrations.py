"""A database filled as schema version 1 stored it, and the checks that an upgrade kept its rows
(shared by the SQLite unit test and the PostgreSQL integration tests)."""
from datetime import date, datetime

from peewee import SqliteDatabase

from control_api import migrations
from control_api.models import MODELS


def fill_v1(database):
    """Rows as version 1 stored them."""
    v1 = migrations._v1_models(database)
    key = v1["ApiKey"].create(prefix="abcd1234", key_hash="0" * 64, role="clinician", label="old")
    patient = v1["Patient"].create(name="Old Patient", birth_date=date(1950, 1, 2), mrn="OLD-1")
    screening = v1["Screening"].create(patient=patient, eye="left", image_key="screenings/old", image_size=3,
                                       image_sha256="a" * 64, content_type="image/jpeg", status="graded",
                                       captured_at=datetime(2020, 1, 1, 8, 0))
    grading = v1["Grading"].create(screening=screening, model_name="dr", model_version="0.9", gradable=True, grade=2,
                                   label="Moderate NPDR", probabilities=[0.1, 0.1, 0.6, 0.1, 0.1], referable=True,
                                   referable_threshold=2, quality={"gradable": True, "score": 0.8, "reasons": []})
    v1["AuditEvent"].create(actor_key_id=key.id, actor_prefix=key.prefix, action="patient.read",
                            resource_type="patient", resource_id=patient.id, patient_id=patient.id,
                            request_id="r1", outcome="success")
    uploaded = v1["Screening"].create(patient=patient, eye="right", image_key="screenings/old2", image_size=3,
                                      image_sha256="b" * 64, content_type="image/png", status="ungradable")
    return {"key": key.id, "patient": patient.id, "screening": screening.id, "grading": grading.id,
            "uploaded": uploaded.id, "uploaded_at": uploaded.created_at}


def check_upgrade(database):
    migrations.migrate(database, target=1)
    assert migrations.current_version(database) == 1
    ids = fill_v1(database)
    assert migrations.migrate(database) == list(range(2, migrations.LATEST + 1))
    assert migrations.current_version(database) == migrations.LATEST

    from control_api.models import ApiKey, AuditEvent, Exam, Grading, Patient, Screening, ShadowGrading, ShadowSetting

    with database.bind_ctx(MODELS):
        patient = Patient.get_by_id(ids["patient"])
        assert (patient.name, patient.birth_date, patient.mrn) == ("Old Patient", date(1950, 1, 2), "OLD-1")
        screening = Screening.get_by_id(ids["screening"])
        assert screening.status == "graded" and screening.captured_at == datetime(2020, 1, 1, 8, 0)
        assert screening.idempotency_key is None and screening.created_by_id is None
        grading = Grading.get_by_id(ids["grading"])
        assert grading.probabilities == [0.1, 0.1, 0.6, 0.1, 0.1] and grading.quality["score"] == 0.8
        assert grading.timings is None
        assert ApiKey.get_by_id(ids["key"]).label == "old"
        assert AuditEvent.select().count() == 1
        # v4: each older photograph got an exam of its own, dated when it was taken (else uploaded).
        assert Exam.select().count() == 2
        exam = screening.exam
        assert exam.patient_id == ids["patient"] and exam.performed_at == datetime(2020, 1, 1, 8, 0)
        assert exam.accession_number is None and screening.field == "other"
        uploaded = Screening.get_by_id(ids["uploaded"])
        assert uploaded.exam_id != exam.id and uploaded.exam.performed_at == ids["uploaded_at"]
        assert [s.id for s in exam.images] == [screening.id]
        # The new columns work.
        screening.idempotency_key, screening.created_by = "k", ids["key"]
        screening.save()
        grading.timings = {"inference": 1.5}
        grading.save()
        assert Grading.get_by_id(ids["grading"]).timings == {"inference": 1.5}
        # v6: a shadow answer beside the old clinical grading, gone with its screening.
        ShadowSetting.create(model_name="dr", model_version="1.1")
        ShadowGrading.create(screening=ids["screening"], baseline=ids["grading"], model_name="dr",
                             model_version="1.1", gradable=True, grade=1, quality={})
        assert [s.grade for s in screening.shadow_gradings] == [1]
        Grading.delete().where(Grading.id == ids["grading"]).execute()
        assert ShadowGrading.get().baseline_id is None
        Screening.delete().where(Screening.id == ids["screening"]).execute()
        assert ShadowGrading.select().count() == 0
    check_schema_matches_models(database)


def check_schema_matches_models(database):
    for model in MODELS:
        table = model._meta.table_name
        columns = {c.name for c in database.get_columns(table)}
        assert columns == {f.column_name for f in model._meta.sorted_fields}, table
    exam_indexes = {i.name: i for i in database.get_indexes("exam")}
    assert exam_indexes["exam_idempotency"].unique
    assert exam_indexes["exam_patient_performed"].columns[:2] == ["patient_id", "performed_at"]
    if not isinstance(database, SqliteDatabase):  # see upgrade_v3_to_v4
        assert not next(c for c in database.get_columns("screening") if c.name == "exam_id").null
    indexes = {i.name: i for i in database.get_indexes("screening")}
    assert indexes["screening_idempotency"].unique
    assert indexes["screening_patient_created"].columns[:2] == ["patient_id", "created_at"]
