"""Patients: create, read, list with cursors, update, delete (with images), summary."""
import pytest

from control_api.models import AuditEvent, Grading, Patient, Screening
from tests.plugins.api import image_bytes, upload

API = "/api/v1/patients"


def test_create_and_read(client, clinician, patient):
    assert patient["name"] == "Ada Testpatient"
    assert patient["medical_record_number"] == "MRN-0042"
    assert patient["created_at"].endswith("Z")
    response = client.get(f"{API}/{patient['id']}", headers=clinician)
    assert response.status_code == 200
    assert response.json == patient
    assert response.headers["Cache-Control"] == "no-store"


def test_create_returns_location(client, clinician):
    response = client.post(API, headers=clinician, json={"name": "B"})
    assert response.status_code == 201
    assert response.headers["Location"] == f"{API}/{response.json['id']}"
    assert response.json["birth_date"] is None and response.json["sex"] is None


@pytest.mark.parametrize("body, field", [
    ({}, "name"),
    ({"name": ""}, "name"),
    ({"name": "x" * 201}, "name"),
    ({"name": "A", "birth_date": "2999-01-01"}, "birth_date"),
    ({"name": "A", "birth_date": "yesterday"}, "birth_date"),
    ({"name": "A", "sex": "robot"}, "sex"),
    ({"name": "A", "shoe_size": 43}, "shoe_size"),
])
def test_create_rejects_bad_fields(client, clinician, body, field):
    response = client.post(API, headers=clinician, json=body)
    assert response.status_code == 422
    error = response.json["error"]
    assert error["code"] == "invalid_request"
    assert field in error["details"]["json"]


def test_body_that_is_not_json_is_400(client, clinician):
    response = client.post(API, headers=clinician, data="{nope", content_type="application/json")
    assert response.status_code == 400
    assert response.json["error"]["code"] == "invalid_request"


def test_duplicate_record_number_is_409_without_echoing_it(client, clinician, patient):
    response = client.post(API, headers=clinician, json={"name": "C", "medical_record_number": "MRN-0042"})
    assert response.status_code == 409
    assert response.json["error"]["code"] == "duplicate_medical_record_number"
    assert "MRN-0042" not in response.get_data(as_text=True)


def test_unknown_patient_is_404(client, clinician):
    response = client.get(f"{API}/00000000-0000-4000-8000-000000000000", headers=clinician)
    assert response.status_code == 404
    assert response.json["error"]["code"] == "patient_not_found"


def test_list_is_newest_first_with_cursor(client, clinician):
    created = [client.post(API, headers=clinician, json={"name": f"P{i}"}).json["id"] for i in range(5)]
    seen, cursor = [], None
    while True:
        response = client.get(API, headers=clinician, query_string={"limit": 2, **({"cursor": cursor} if cursor else {})})
        assert response.status_code == 200
        seen += [p["id"] for p in response.json["items"]]
        cursor = response.json["next_cursor"]
        if cursor is None:
            break
        assert len(response.json["items"]) == 2
    assert seen == list(reversed(created))


@pytest.mark.parametrize("cursor", ["zzz", "WzFd", "bm90IGpzb24", "WyJ4IiwieSJd"])
def test_bad_cursor_is_400(client, clinician, cursor):
    response = client.get(API, headers=clinician, query_string={"cursor": cursor})
    assert response.status_code == 400
    assert response.json["error"]["code"] == "invalid_cursor"


@pytest.mark.parametrize("limit", [0, 101, "many"])
def test_bad_limit_is_422(client, clinician, limit):
    assert client.get(API, headers=clinician, query_string={"limit": limit}).status_code == 422


def test_patch_changes_only_given_fields(client, clinician, patient):
    response = client.patch(f"{API}/{patient['id']}", headers=clinician, json={"sex": "other"})
    assert response.status_code == 200
    assert response.json["sex"] == "other"
    assert response.json["name"] == patient["name"]
    assert response.json["updated_at"] >= patient["updated_at"]


@pytest.mark.parametrize("body", [{}, {"name": None}, {"id": "00000000-0000-4000-8000-000000000000"}])
def test_patch_rejects_empty_or_invalid(client, clinician, patient, body):
    assert client.patch(f"{API}/{patient['id']}", headers=clinician, json=body).status_code == 422


def test_delete_removes_screenings_gradings_and_images_but_keeps_audit(app, client, clinician, patient):
    screening = upload(client, clinician, patient["id"], image_bytes()).json
    storage = app.extensions["clarity"]["storage"]
    key = f"screenings/{screening['id']}"
    assert storage.get(key, sha256=screening["image"]["sha256"])

    response = client.delete(f"{API}/{patient['id']}", headers=clinician)
    assert response.status_code == 204
    assert client.get(f"{API}/{patient['id']}", headers=clinician).status_code == 404
    with app.app_context():
        assert Patient.select().count() == 0
        assert Screening.select().count() == 0 and Grading.select().count() == 0
        assert AuditEvent.select().where(AuditEvent.patient_id == patient["id"]).count() >= 3
    assert list(storage.list()) == []


def test_delete_keeps_everything_when_storage_fails(app, client, clinician, patient, monkeypatch):
    from control_api.storage import StorageUnavailable

    upload(client, clinician, patient["id"], image_bytes())
    storage = app.extensions["clarity"]["storage"]

    def broken(key):
        raise StorageUnavailable("disk gone")

    monkeypatch.setattr(storage, "delete", broken)
    response = client.delete(f"{API}/{patient['id']}", headers=clinician)
    assert response.status_code == 503
    assert response.json["error"]["code"] == "storage_unavailable"
    assert response.headers["Retry-After"]
    with app.app_context():
        assert Patient.select().count() == 1 and Screening.select().count() == 1


def _summary(client, headers, patient_id):
    response = client.get(f"{API}/{patient_id}/summary", headers=headers)
    assert response.status_code == 200
    return response.json


def test_summary_outcomes(client, clinician, patient, fake_torchserve):
    """The summary is the latest exam's outcome (control_api/outcome.py has the rules)."""
    pid = patient["id"]
    summary = _summary(client, clinician, pid)
    assert summary["outcome"] == "retake" and summary["eyes"] == {"left": None, "right": None}
    assert summary["disclaimer"] is None and summary["exam_id"] is None

    fake_torchserve.grade = 0
    first = upload(client, clinician, pid, image_bytes(), eye="left").json  # opens an exam of its own
    assert _summary(client, clinician, pid)["outcome"] == "retake"  # right eye missing

    upload(client, clinician, pid, image_bytes(color=(1, 2, 3)), eye="right", exam_id=first["exam_id"])
    summary = _summary(client, clinician, pid)
    assert summary["outcome"] == "rescreen_12_months" and summary["exam_id"] == first["exam_id"]
    assert "12 months" in summary["message"]
    assert summary["eyes"]["right"]["grade"] == 0 and summary["eyes"]["right"]["referable"] is False
    assert "synthetic" in summary["disclaimer"] and summary["eyes"]["left"]["disclaimer"]

    fake_torchserve.mode = "ungradable"  # a later visit replaces the earlier one in the summary
    second = upload(client, clinician, pid, image_bytes(color=(3, 2, 1)), eye="right").json
    summary = _summary(client, clinician, pid)
    assert summary["outcome"] == "retake" and summary["exam_id"] == second["exam_id"]
    assert summary["eyes"]["right"]["gradable"] is False and summary["eyes"]["left"] is None
    assert summary["eyes"]["right"]["quality"]["reasons"][0]["code"] == "too_dark"

    fake_torchserve.mode = "down"
    upload(client, clinician, pid, image_bytes(color=(9, 9, 9)), eye="right", exam_id=second["exam_id"])
    assert _summary(client, clinician, pid)["outcome"] == "pending"

    fake_torchserve.mode, fake_torchserve.grade = "grade", 3
    upload(client, clinician, pid, image_bytes(color=(7, 7, 7)), eye="left", exam_id=second["exam_id"])
    summary = _summary(client, clinician, pid)
    assert summary["outcome"] == "refer"  # referable beats pending and ungradable
    assert summary["eyes"]["left"]["label"] == "Severe NPDR"
