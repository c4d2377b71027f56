"""Exams through the API with the fake TorchServe: routes, per-eye results, outcome rules,
idempotency, audit, and bad input that leaves nothing behind."""
import io
import uuid
from types import SimpleNamespace

import pytest

from control_api import codes, outcome
from control_api.models import AuditEvent, Exam, Grading, Screening
from tests.plugins.api import image_bytes, upload

API = "/api/v1/patients"


def new_exam(client, headers, pid, **body):
    response = client.post(f"{API}/{pid}/exams", headers=headers, json=body)
    assert response.status_code == 201, response.json
    return response.json


def add(client, headers, pid, exam, *, eye="left", field="disc", color=(120, 40, 20), extra_headers=None,
        **fields):
    form = {"image": (io.BytesIO(image_bytes(color=color)), "eye.jpg"), "eye": eye, "field": field, **fields}
    return client.post(f"{API}/{pid}/exams/{exam}/images", headers={**headers, **(extra_headers or {})},
                       data=form, content_type="multipart/form-data")


def read(client, headers, pid, exam_id):
    response = client.get(f"{API}/{pid}/exams/{exam_id}", headers=headers)
    assert response.status_code == 200, response.json
    return response.json


def counts():
    return Exam.select().count(), Screening.select().count(), Grading.select().count()


# --- the rules, on plain objects ---------------------------------------------------------------

def photo(status="graded", grade=None, referable=None, reasons=(), n=0):
    gradable = status == "graded"
    grading = None if status == "pending" else SimpleNamespace(
        gradable=gradable, grade=grade, referable=referable,
        quality={"reasons": [{"code": c, "message": c} for c in reasons]})
    return SimpleNamespace(id=f"img{n}", status=status, latest_grading=grading)


def test_eye_takes_the_highest_gradable_grade_and_names_its_photograph():
    images = [photo(grade=1, referable=False, n=0), photo("ungradable", reasons=["blurred"], n=1),
              photo(grade=3, referable=True, n=2), photo(grade=3, referable=True, n=3)]
    eye = outcome.eye_result(images)
    assert (eye.status, eye.gradable, eye.grade, eye.referable, eye.deciding_image_id) == \
        ("graded", True, 3, True, "img2")
    assert eye.label == codes.ICDR_GRADES[3] == "Severe non-proliferative retinopathy"
    assert eye.quality_reasons == [{"code": "blurred", "message": "blurred"}]


@pytest.mark.parametrize("images, status", [
    ([], "missing"),
    ([photo("ungradable", reasons=["too_dark"]), photo("ungradable", reasons=["too_dark", "blurred"])],
     "ungradable"),
    ([photo("ungradable"), photo("pending")], "pending"),
])
def test_eye_without_a_gradable_photograph(images, status):
    eye = outcome.eye_result(images)
    assert (eye.status, eye.gradable, eye.grade, eye.deciding_image_id) == (status, False, None, None)
    if status == "ungradable":
        assert [r["code"] for r in eye.quality_reasons] == ["too_dark", "blurred"]


@pytest.mark.parametrize("left, right, expected", [
    ([photo(grade=2, referable=True)], [photo("ungradable")], "refer"),  # refer beats an ungradable eye
    ([photo(grade=2, referable=True)], [photo("pending")], "refer"),
    ([photo(grade=0, referable=False)], [photo("pending")], "pending"),
    ([photo(grade=0, referable=False)], [photo("ungradable")], "retake"),
    ([photo(grade=0, referable=False)], [], "retake"),
    ([photo(grade=1, referable=False)], [photo(grade=0, referable=False), photo("ungradable")],
     "rescreen_12_months"),
])
def test_visit_outcome(left, right, expected):
    eyes = {"left": outcome.eye_result(left), "right": outcome.eye_result(right)}
    assert outcome.visit_outcome(eyes, left + right) == expected


# --- routes ------------------------------------------------------------------------------------

def test_visit_with_two_photographs_of_each_eye(client, clinician, patient, fake_torchserve):
    pid = patient["id"]
    exam = new_exam(client, clinician, pid, performed_at="2024-06-01T09:00:00+02:00", accession_number="ACC-77")
    assert exam["performed_at"] == "2024-06-01T07:00:00Z" and exam["accession_number"] == "ACC-77"
    assert exam["outcome"] == "retake" and exam["images"] == []
    assert exam["eyes"]["left"]["status"] == "missing" and exam["model"] is None

    fake_torchserve.grade = 1
    first = add(client, clinician, pid, exam["id"], eye="right", field="disc")
    assert first.status_code == 201 and first.json["exam_id"] == exam["id"] and first.json["field"] == "disc"
    assert first.headers["Location"] == f"{API}/{pid}/screenings/{first.json['id']}"
    fake_torchserve.grade = 2
    decider = add(client, clinician, pid, exam["id"], eye="right", field="macula", color=(1, 1, 1)).json
    fake_torchserve.mode = "ungradable"
    for n, field in enumerate(("disc", "macula")):
        assert add(client, clinician, pid, exam["id"], eye="left", field=field, color=(n, 9, 9)).status_code == 201

    body = read(client, clinician, pid, exam["id"])
    assert body["outcome"] == "refer" and body["message"] == codes.OUTCOME_MESSAGES["refer"]
    assert body["eyes"]["right"] == {"status": "graded", "gradable": True, "grade": 2,
                                     "label": "Moderate non-proliferative retinopathy", "referable": True,
                                     "deciding_image_id": decider["id"], "quality_reasons": []}
    left = body["eyes"]["left"]
    assert (left["status"], left["gradable"], left["grade"], left["deciding_image_id"]) == \
        ("ungradable", False, None, None)
    assert left["quality_reasons"] == [{"code": "too_dark", "message": "The image is too dark."}]
    assert [i["field"] for i in body["images"]] == ["disc", "macula", "disc", "macula"]
    assert body["model"] == {"name": "dr", "version": "1.0", "synthetic_training_data": True}
    assert "synthetic" in body["disclaimer"].lower()

    # The summary is this exam's; the old listing shows the four photographs.
    summary = client.get(f"{API}/{pid}/summary", headers=clinician).json
    assert summary["exam_id"] == exam["id"] and summary["outcome"] == "refer"
    assert summary["eyes"]["right"]["screening_id"] == decider["id"]
    assert len(client.get(f"{API}/{pid}/screenings", headers=clinician).json["items"]) == 4


def test_list_is_newest_visit_first_with_cursors(client, clinician, patient):
    pid = patient["id"]
    ids = [new_exam(client, clinician, pid, performed_at=f"2024-0{m}-01T00:00:00Z")["id"] for m in (3, 1, 2)]
    first = client.get(f"{API}/{pid}/exams?limit=2", headers=clinician).json
    assert [e["id"] for e in first["items"]] == [ids[0], ids[2]]
    rest = client.get(f"{API}/{pid}/exams?limit=2&cursor={first['next_cursor']}", headers=clinician).json
    assert [e["id"] for e in rest["items"]] == [ids[1]] and rest["next_cursor"] is None


def test_default_time_is_now(client, clinician, patient):
    exam = new_exam(client, clinician, patient["id"])
    assert exam["performed_at"][:10] == exam["created_at"][:10] and exam["accession_number"] is None


def test_idempotent_exam_creation(client, clinician, patient):
    pid = patient["id"]
    headers = {**clinician, "Idempotency-Key": "visit-42"}
    first = client.post(f"{API}/{pid}/exams", headers=headers, json={"accession_number": "A1"})
    again = client.post(f"{API}/{pid}/exams", headers=headers, json={"accession_number": "A1"})
    assert first.status_code == again.status_code == 201
    assert again.json["id"] == first.json["id"] and again.headers["Idempotent-Replayed"] == "true"
    other = client.post(f"{API}/{pid}/exams", headers=headers, json={"accession_number": "A2"})
    assert other.status_code == 409 and other.json["error"]["code"] == "idempotency_key_reused"
    assert Exam.select().count() == 1


def test_idempotent_photograph(client, clinician, patient):
    pid = patient["id"]
    exam = new_exam(client, clinician, pid)
    key = {"Idempotency-Key": "photo-1"}
    first = add(client, clinician, pid, exam["id"], extra_headers=key)
    again = add(client, clinician, pid, exam["id"], extra_headers=key)
    assert again.json["id"] == first.json["id"] and again.headers["Idempotent-Replayed"] == "true"
    other_field = add(client, clinician, pid, exam["id"], field="macula", extra_headers=key)
    assert other_field.status_code == 409
    assert Screening.select().count() == 1


def test_old_route_opens_an_exam_of_its_own_or_joins_one(client, clinician, patient):
    pid = patient["id"]
    alone = upload(client, clinician, pid, image_bytes(), eye="left", captured_at="2024-05-01T10:00:00Z").json
    exam = read(client, clinician, pid, alone["exam_id"])
    assert [i["id"] for i in exam["images"]] == [alone["id"]] and exam["performed_at"] == "2024-05-01T10:00:00Z"
    joined = upload(client, clinician, pid, image_bytes(color=(5, 5, 5)), eye="right", field="macula",
                    exam_id=alone["exam_id"])
    assert joined.status_code == 201 and joined.json["exam_id"] == alone["exam_id"]
    assert Exam.select().count() == 1


def test_pending_photograph_keeps_the_exam_pending(client, clinician, patient, fake_torchserve):
    pid = patient["id"]
    exam = new_exam(client, clinician, pid)
    fake_torchserve.grade = 0
    add(client, clinician, pid, exam["id"], eye="left")
    fake_torchserve.mode = "down"
    pending = add(client, clinician, pid, exam["id"], eye="right", color=(3, 3, 3))
    assert pending.status_code == 202 and pending.headers["Retry-After"]
    body = read(client, clinician, pid, exam["id"])
    assert body["outcome"] == "pending" and body["eyes"]["right"]["status"] == "pending"


def test_audit_rows(client, clinician, patient):
    pid = patient["id"]
    exam = new_exam(client, clinician, pid)
    sid = add(client, clinician, pid, exam["id"]).json["id"]
    read(client, clinician, pid, exam["id"])
    client.get(f"{API}/{pid}/exams", headers=clinician)
    rows = [(e.action, e.resource_type, str(e.resource_id), str(e.patient_id), e.outcome)
            for e in AuditEvent.select().where(AuditEvent.action.startswith("exam.")
                                               | (AuditEvent.action == "screening.create"))
            .order_by(AuditEvent.id)]
    assert rows == [("exam.create", "exam", exam["id"], pid, "success"),
                    ("screening.create", "screening", sid, pid, "success"),
                    ("exam.read", "exam", exam["id"], pid, "success"),
                    ("exam.list", "patient", pid, pid, "success")]


# --- bad input: a specific 4xx and nothing half-written ------------------------------------------

def other_patient(client, clinician):
    response = client.post(API, headers=clinician, json={"name": "Other Person"})
    return response.json["id"]


def test_unknown_exam(client, clinician, patient):
    pid = patient["id"]
    nobody = str(uuid.uuid4())
    before = counts()
    for response in (client.get(f"{API}/{pid}/exams/{nobody}", headers=clinician),
                     add(client, clinician, pid, nobody)):
        assert response.status_code == 404 and response.json["error"]["code"] == "exam_not_found"
    via_old_route = upload(client, clinician, pid, image_bytes(), exam_id=nobody)
    assert via_old_route.status_code == 422 and via_old_route.json["error"]["code"] == "exam_not_found"
    assert counts() == before
    missing_patient = client.get(f"{API}/{nobody}/exams/{nobody}", headers=clinician)
    assert missing_patient.status_code == 404 and missing_patient.json["error"]["code"] == "patient_not_found"


def test_exam_of_another_patient(client, clinician, patient):
    pid, other = patient["id"], other_patient(client, clinician)
    theirs = new_exam(client, clinician, other)["id"]
    before = counts()
    # In the URL: as if it did not exist (404), for a read and an upload alike.
    for response in (client.get(f"{API}/{pid}/exams/{theirs}", headers=clinician),
                     add(client, clinician, pid, theirs)):
        assert response.status_code == 404 and response.json["error"]["code"] == "exam_not_found"
        assert theirs not in response.get_data(as_text=True)
    # Named in an upload of this patient's photograph: 422 that says whose it is.
    response = upload(client, clinician, pid, image_bytes(), exam_id=theirs)
    assert response.status_code == 422 and response.json["error"]["code"] == "exam_of_another_patient"
    assert counts() == before
    assert client.get(f"{API}/{pid}/exams", headers=clinician).json["items"] == []


@pytest.mark.parametrize("fields, location, name", [
    ({"field": "periphery"}, "multipart", "field"),
    ({"field": ""}, "multipart", "field"),
    ({"eye": "both"}, "multipart", "eye"),
    ({"exam_id": "x"}, "multipart", "exam_id"),  # the exam route takes the exam from the URL
])
def test_bad_photograph_fields(client, clinician, patient, fields, location, name):
    pid = patient["id"]
    exam = new_exam(client, clinician, pid)
    before = counts()
    response = add(client, clinician, pid, exam["id"], **{"eye": "left", "field": "disc", **fields})
    assert response.status_code == 422 and response.json["error"]["code"] == "invalid_request"
    assert name in response.json["error"]["details"][location]
    assert counts() == before


@pytest.mark.parametrize("body, name", [
    ({"performed_at": "yesterday"}, "performed_at"),
    ({"performed_at": "2999-01-01T00:00:00Z"}, "performed_at"),
    ({"accession_number": "x" * 65}, "accession_number"),
    ({"accession_number": "a\nb"}, "accession_number"),
    ({"visit": 1}, "visit"),
])
def test_bad_exam_bodies(client, clinician, patient, body, name):
    response = client.post(f"{API}/{patient['id']}/exams", headers=clinician, json=body)
    assert response.status_code == 422 and name in response.json["error"]["details"]["json"]
    assert Exam.select().count() == 0


def test_rejected_photograph_leaves_no_exam_behind(client, clinician, patient, fake_torchserve):
    """An upload through the old route opens an exam; when the model server rejects the image
    the exam goes too."""
    fake_torchserve.mode = "reject"
    before = counts()
    response = upload(client, clinician, patient["id"], image_bytes())
    assert response.status_code == 422 and counts() == before


def test_deleting_the_patient_deletes_exams(client, clinician, patient):
    pid = patient["id"]
    exam = new_exam(client, clinician, pid)
    add(client, clinician, pid, exam["id"])
    assert client.delete(f"{API}/{pid}", headers=clinician).status_code == 204
    assert counts() == (0, 0, 0)


def test_accession_number_stays_out_of_logs(client, clinician, patient, caplog):
    new_exam(client, clinician, patient["id"], accession_number="ACC-SECRET-991")
    assert "ACC-SECRET-991" not in caplog.text
