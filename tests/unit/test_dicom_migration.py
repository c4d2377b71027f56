"""Schema step 5 (dicom_instance, dicom_report) on a filled database, SQLite here and PostgreSQL in integration."""
import uuid
from datetime import datetime

import peewee
import pytest

from control_api import migrations
from control_api.db import database_for
from control_api.models import MODELS, DicomInstance, DicomReport, Screening
from tests.support.migrations import check_schema_matches_models, fill_v1


def check_step5(database):
    migrations.migrate(database, target=1)
    ids = fill_v1(database)
    assert 5 in migrations.migrate(database)  # step 5: dicom_instance, dicom_report
    with database.bind_ctx(MODELS):
        screening = Screening.get_by_id(ids["screening"])
        assert screening.status == "graded" and screening.captured_at == datetime(2020, 1, 1, 8, 0)
        row = DicomInstance.create(screening=screening, sop_instance_uid="1.2.3.4", study_instance_uid="1.2.3",
                                   sop_class_uid="1.2.840.10008.5.1.4.1.1.77.1.5.1",
                                   transfer_syntax="1.2.840.10008.1.2.4.50", source="receiver",
                                   calling_ae_title="CAMERA")
        assert screening.dicom.get().id == row.id
        with pytest.raises(peewee.IntegrityError), database.atomic():
            DicomInstance.create(id=uuid.uuid4(), screening=screening, sop_instance_uid="1.2.3.4",
                                 study_instance_uid="1.2.3", sop_class_uid="x", transfer_syntax="y", source="upload")
        report = DicomReport.create(exam=screening.exam_id, status="sent", attempts=1, images_fingerprint="f" * 64)
        assert screening.exam.dicom_reports.get().id == report.id
    check_schema_matches_models(database)


def test_sqlite_step5_keeps_rows(tmp_path):
    check_step5(database_for(f"sqlite:///{tmp_path / 'v2.db'}"))


@pytest.mark.integration
def test_postgres_step5_keeps_rows(fresh_pg_url):
    database = database_for(fresh_pg_url)
    try:
        check_step5(database)
    finally:
        database.close_all()
