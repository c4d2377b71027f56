"""CLI jobs: grade-pending, check-storage, reconcile, migrate."""
import hashlib
import os
import time
from datetime import timedelta

from control_api import migrations
from control_api.models import Grading, Screening, utcnow
from tests.plugins.api import image_bytes, upload


def pending_uploads(client, headers, patient_id, fake_torchserve, n=2):
    fake_torchserve.mode = "down"
    ids = [upload(client, headers, patient_id, image_bytes(color=(i, 5, 5))).json["id"] for i in range(n)]
    fake_torchserve.mode = "grade"
    return ids


def test_grade_pending_grades_each_once(app, client, clinician, patient, fake_torchserve):
    ids = pending_uploads(client, clinician, patient["id"], fake_torchserve)
    runner = app.test_cli_runner()
    result = runner.invoke(args=["grade-pending"])
    assert result.exit_code == 0, result.output
    assert "2 graded" in result.output
    again = runner.invoke(args=["grade-pending"])
    assert "0 graded" in again.output
    with app.app_context():
        assert {str(s.id): s.status for s in Screening.select()} == {i: "graded" for i in ids}
        assert Grading.select().count() == 2


def test_grade_pending_skips_a_screening_someone_else_is_grading(app, client, clinician, patient, fake_torchserve):
    from control_api.grading import claim

    ids = pending_uploads(client, clinician, patient["id"], fake_torchserve)
    with app.app_context():
        assert claim(ids[0]) is True
        assert claim(ids[0]) is False  # the lease is held
    result = app.test_cli_runner().invoke(args=["grade-pending"])
    assert "1 graded" in result.output and "1 skipped" in result.output


def test_grade_pending_stops_while_torchserve_is_down(app, client, clinician, patient, fake_torchserve):
    pending_uploads(client, clinician, patient["id"], fake_torchserve)
    fake_torchserve.mode = "down"
    result = app.test_cli_runner().invoke(args=["grade-pending"])
    assert result.exit_code == 1
    assert len(fake_torchserve.calls) == 3  # two uploads, then one try
    with app.app_context():
        assert all(s.status == "pending" and s.grading_started_at is None for s in Screening.select())


def test_grade_pending_marks_rejected_images_failed(app, client, clinician, patient, fake_torchserve):
    (sid,) = pending_uploads(client, clinician, patient["id"], fake_torchserve, n=1)
    fake_torchserve.mode = "reject"
    result = app.test_cli_runner().invoke(args=["grade-pending"])
    assert f"{sid} failed: truncated_image" in result.output
    with app.app_context():
        assert Screening.get_by_id(sid).status == "failed"
    summary = client.get(f"/api/v1/patients/{patient['id']}/summary", headers=clinician).json
    assert summary["outcome"] == "retake"


def test_check_storage_finds_missing_and_corrupted_objects(app, client, clinician, patient):
    ids = [upload(client, clinician, patient["id"], image_bytes(color=(i, 0, 0))).json["id"] for i in range(3)]
    runner = app.test_cli_runner()
    assert runner.invoke(args=["check-storage"]).exit_code == 0
    root = app.extensions["clarity"]["storage"].root
    (root / "screenings" / ids[0]).unlink()
    (root / "screenings" / ids[1]).write_bytes(b"bit rot")
    result = runner.invoke(args=["check-storage"])
    assert result.exit_code == 1
    assert f"{ids[0]} missing" in result.output and f"{ids[1]} SHA-256 mismatch" in result.output
    assert "3 checked, 2 problems" in result.output


def test_reconcile_dry_run_then_apply(app, client, clinician, patient):
    ids = [upload(client, clinician, patient["id"], image_bytes(color=(i, 0, 0))).json["id"] for i in range(2)]
    storage = app.extensions["clarity"]["storage"]
    orphan = "screenings/00000000-0000-4000-8000-0000000000aa"
    storage.put(orphan, b"stray", content_type="image/jpeg", sha256=hashlib.sha256(b"stray").hexdigest())
    (storage.root / "screenings" / ids[0]).unlink()
    runner = app.test_cli_runner()

    young = runner.invoke(args=["reconcile"])
    assert "0 objects without rows, 0 rows without objects" in young.output  # inside the grace period

    past = time.time() - 3600
    os.utime(storage.root / orphan, (past, past))
    with app.app_context():
        Screening.update(created_at=utcnow() - timedelta(hours=1)).execute()
    dry = runner.invoke(args=["reconcile"])
    assert f"object without row: {orphan}" in dry.output
    assert f"row without object: screening {ids[0]}" in dry.output
    assert "dry run" in dry.output
    assert (storage.root / orphan).exists()

    applied = runner.invoke(args=["reconcile", "--apply"])
    assert applied.exit_code == 0 and "repaired" in applied.output
    assert not (storage.root / orphan).exists()
    with app.app_context():
        assert [str(s.id) for s in Screening.select()] == [ids[1]]
    assert "0 objects without rows, 0 rows without objects" in runner.invoke(args=["reconcile"]).output


def test_migrate_reports_versions(api_settings, fake_torchserve):
    from control_api import create_app

    app = create_app(api_settings, torchserve=fake_torchserve)
    runner = app.test_cli_runner()
    assert f"upgraded from version 0 to {migrations.LATEST}" in runner.invoke(args=["init-db"]).output
    assert f"up to date (version {migrations.LATEST})" in runner.invoke(args=["migrate"]).output
