"""Uploading, grading, listing and downloading screenings, with a fake TorchServe."""
import hashlib
import io

import peewee
import pytest

from control_api.models import Grading, Screening
from tests.plugins.api import bearer, image_bytes, upload


def url(patient_id, *parts):
    return "/".join([f"/api/v1/patients/{patient_id}/screenings", *parts])


def stored_keys(app):
    return [o.key for o in app.extensions["clarity"]["storage"].list()]


def test_upload_is_graded_201(client, clinician, patient, fake_torchserve):
    data = image_bytes()
    response = upload(client, clinician, patient["id"], data, eye="right", camera="Topcon TRC-NW8",
                      captured_at="2024-05-01T12:30:00+02:00")
    assert response.status_code == 201, response.json
    body = response.json
    assert body["status"] == "graded" and body["eye"] == "right" and body["camera"] == "Topcon TRC-NW8"
    assert body["captured_at"] == "2024-05-01T10:30:00Z"
    assert body["image"] == {"content_type": "image/jpeg", "size": len(data),
                             "sha256": hashlib.sha256(data).hexdigest(), "url": url(patient["id"], body["id"], "image")}
    result = body["result"]
    assert result["grade"] == 1 and result["label"] == "Mild NPDR" and result["referable"] is False
    assert result["model"] == {"name": "dr", "version": "1.0", "synthetic_training_data": True}
    assert "synthetic" in result["disclaimer"]
    assert response.headers["Location"] == url(patient["id"], body["id"])
    assert fake_torchserve.calls == [{"bytes": len(data), "content_type": "image/jpeg", "version": None}]


@pytest.mark.parametrize("fmt, content_type", [("PNG", "image/png"), ("TIFF", "image/tiff")])
def test_png_and_tiff_are_accepted_and_stored_unchanged(app, client, clinician, patient, fmt, content_type):
    data = image_bytes(fmt)
    response = upload(client, clinician, patient["id"], data, filename="photo.jpg")  # the name does not matter
    assert response.status_code == 201
    assert response.json["image"]["content_type"] == content_type
    image = client.get(url(patient["id"], response.json["id"], "image"), headers=clinician)
    assert image.data == data and image.mimetype == content_type


def test_ungradable_is_201_with_reasons(client, clinician, patient, fake_torchserve):
    fake_torchserve.mode = "ungradable"
    response = upload(client, clinician, patient["id"], image_bytes())
    assert response.status_code == 201
    assert response.json["status"] == "ungradable"
    assert response.json["result"]["grade"] is None
    assert response.json["result"]["quality"]["reasons"][0]["code"] == "too_dark"


def test_torchserve_down_keeps_the_screening_pending_202(app, client, clinician, patient, fake_torchserve):
    fake_torchserve.mode = "down"
    response = upload(client, clinician, patient["id"], image_bytes())
    assert response.status_code == 202
    assert int(response.headers["Retry-After"]) > 0
    assert response.json["status"] == "pending" and response.json["result"] is None
    assert stored_keys(app) == [f"screenings/{response.json['id']}"]
    with app.app_context():
        assert Screening.get_by_id(response.json["id"]).grading_started_at is None  # lease released


def test_rejected_by_model_server_is_422_and_leaves_nothing(app, client, clinician, patient, fake_torchserve):
    fake_torchserve.mode = "reject"
    response = upload(client, clinician, patient["id"], image_bytes())
    assert response.status_code == 422
    assert response.json["error"]["code"] == "truncated_image"
    assert response.json["error"]["message"] == "The image data ends early."
    with app.app_context():
        assert Screening.select().count() == 0 and Grading.select().count() == 0
    assert stored_keys(app) == []


def test_unsupported_format_by_content_is_415(app, client, clinician, patient, fake_torchserve):
    import PIL.Image

    buf = io.BytesIO()
    PIL.Image.new("RGB", (100, 100)).save(buf, format="GIF")
    for data in (b"%PDF-1.7 not an eye", buf.getvalue(), b"GIF89a" + b"\0" * 100):
        response = upload(client, clinician, patient["id"], data, filename="eye.jpg")
        assert response.status_code == 415, response.json
        assert response.json["error"]["code"] == "unsupported_media_type"
    assert fake_torchserve.calls == [] and stored_keys(app) == []


@pytest.mark.parametrize("data, code", [
    (image_bytes()[:200], "undecodable_image"),
    (b"\x89PNG\r\n\x1a\n" + b"\0" * 50, "undecodable_image"),
    (image_bytes(size=(32, 32)), "image_too_small"),
    (b"", "empty_image"),
])
def test_undecodable_is_422(app, client, clinician, patient, data, code):
    response = upload(client, clinician, patient["id"], data)
    assert response.status_code == 422
    assert response.json["error"]["code"] == code
    assert stored_keys(app) == []


def truncated_jpeg() -> bytes:
    """A JPEG whose header reads fine but whose scan ends early."""
    data = image_bytes(size=(512, 512))
    return data[: len(data) // 2]


def test_pixels_are_left_to_the_model_server(app, client, clinician, patient, fake_torchserve):
    """The upload reads only the header; the model server's rejection removes what was stored."""
    response = upload(client, clinician, patient["id"], truncated_jpeg())
    assert response.status_code == 422
    assert response.json["error"]["code"] == "corrupt_image"  # the (fake) model server's verdict
    assert len(fake_torchserve.calls) == 1
    with app.app_context():
        assert Screening.select().count() == 0
    assert stored_keys(app) == []


def test_undecodable_is_not_kept_pending_when_torchserve_is_down(app, client, clinician, patient,
                                                                  fake_torchserve):
    fake_torchserve.mode = "down"
    response = upload(client, clinician, patient["id"], truncated_jpeg())
    assert response.status_code == 422
    assert response.json["error"]["code"] == "undecodable_image"
    with app.app_context():
        assert Screening.select().count() == 0 and Grading.select().count() == 0
    assert stored_keys(app) == []


@pytest.mark.parametrize("fields, bad", [
    ({"eye": "middle"}, "eye"),
    ({"captured_at": "last tuesday"}, "captured_at"),
    ({"captured_at": "2999-01-01T00:00:00Z"}, "captured_at"),
    ({"camera": "x" * 201}, "camera"),
    ({"colour": "blue"}, "colour"),
])
def test_bad_form_fields_are_422(client, clinician, patient, fields, bad):
    response = upload(client, clinician, patient["id"], image_bytes(), **{"eye": "left", **fields})
    assert response.status_code == 422
    assert bad in response.json["error"]["details"]["multipart"]


@pytest.mark.parametrize("form", [{"eye": "left"}, {"eye": "left", "image": "a text field"}])
def test_missing_image_file_is_422(client, clinician, patient, form):
    response = client.post(url(patient["id"]), headers=clinician, data=form, content_type="multipart/form-data")
    assert response.status_code == 422
    assert "image" in response.json["error"]["details"]["multipart"]


@pytest.fixture
def small_app(make_app):
    return make_app(max_upload_bytes=4096)


def test_body_over_the_limit_is_413_before_it_is_read(small_app):
    client = small_app.test_client()
    headers = bearer(small_app)
    patient = client.post("/api/v1/patients", headers=headers, json={"name": "Big"}).json

    class Unreadable(io.RawIOBase):
        def readable(self):
            return True

        def readinto(self, b):
            raise AssertionError("the body was read")

    too_big = 4096 + 64 * 1024 + 1
    response = client.post(url(patient["id"]), headers=headers, content_type="multipart/form-data; boundary=x",
                           environ_overrides={"wsgi.input": Unreadable(), "CONTENT_LENGTH": str(too_big)})
    assert response.status_code == 413
    assert response.json["error"]["code"] == "payload_too_large"


def test_image_over_the_limit_is_413(small_app):
    client = small_app.test_client()
    headers = bearer(small_app)
    patient = client.post("/api/v1/patients", headers=headers, json={"name": "Big"}).json
    data = image_bytes(size=(64, 64)) + b"\0" * 5000  # fits the body limit, not the image limit
    response = upload(client, headers, patient["id"], data)
    assert response.status_code == 413
    assert small_app.extensions["clarity"]["storage"].root.exists() is False or \
        list(small_app.extensions["clarity"]["storage"].list()) == []


def test_idempotent_retry_returns_the_first_result(app, client, clinician, patient, fake_torchserve):
    data = image_bytes()
    first = upload(client, clinician, patient["id"], data, extra_headers={"Idempotency-Key": "upload-1"})
    again = upload(client, clinician, patient["id"], data, extra_headers={"Idempotency-Key": "upload-1"})
    assert first.status_code == 201 and again.status_code == 201
    assert again.json["id"] == first.json["id"] and again.json["result"]["id"] == first.json["result"]["id"]
    assert again.headers["Idempotent-Replayed"] == "true"
    assert len(fake_torchserve.calls) == 1
    with app.app_context():
        assert Screening.select().count() == 1
    assert len(stored_keys(app)) == 1


def test_idempotent_retry_of_a_pending_upload_stays_202(client, clinician, patient, fake_torchserve):
    fake_torchserve.mode = "down"
    first = upload(client, clinician, patient["id"], image_bytes(), extra_headers={"Idempotency-Key": "k"})
    again = upload(client, clinician, patient["id"], image_bytes(), extra_headers={"Idempotency-Key": "k"})
    assert first.status_code == again.status_code == 202
    assert again.json["id"] == first.json["id"]


def test_same_key_different_body_is_409(app, client, clinician, patient):
    upload(client, clinician, patient["id"], image_bytes(), extra_headers={"Idempotency-Key": "k2"})
    for changed in ({"data": image_bytes(color=(1, 1, 1))}, {"eye": "right"}):
        args = {"data": image_bytes(), "eye": "left", **changed}
        response = upload(client, clinician, patient["id"], args.pop("data"), extra_headers={"Idempotency-Key": "k2"},
                          **args)
        assert response.status_code == 409
        assert response.json["error"]["code"] == "idempotency_key_reused"
    with app.app_context():
        assert Screening.select().count() == 1


def test_idempotency_keys_belong_to_one_api_key(client, clinician, make_key, patient):
    other = make_key("clinician")
    first = upload(client, clinician, patient["id"], image_bytes(), extra_headers={"Idempotency-Key": "shared"})
    second = upload(client, other, patient["id"], image_bytes(), extra_headers={"Idempotency-Key": "shared"})
    assert second.status_code == 201 and second.json["id"] != first.json["id"]


def test_bad_idempotency_key_is_400(client, clinician, patient):
    response = upload(client, clinician, patient["id"], image_bytes(), extra_headers={"Idempotency-Key": "has space"})
    assert response.status_code == 400


def test_storage_failure_writes_nothing(app, client, clinician, patient, monkeypatch, fake_torchserve):
    from control_api.storage import StorageUnavailable

    def broken(*args, **kwargs):
        raise StorageUnavailable("S3 put failed")

    monkeypatch.setattr(app.extensions["clarity"]["storage"], "put", broken)
    response = upload(client, clinician, patient["id"], image_bytes())
    assert response.status_code == 503
    assert response.json["error"]["code"] == "storage_unavailable"
    with app.app_context():
        assert Screening.select().count() == 0
    # TorchServe may have been asked already (the prediction starts while the image is stored,
    # issue 14); its answer is dropped: tests/unit/test_upload_cost.py checks no grading stays.


def test_database_failure_deletes_the_stored_object(app, client, clinician, patient, monkeypatch):
    def broken(self, *args, **kwargs):
        raise peewee.OperationalError("database is locked")

    monkeypatch.setattr(Screening, "save", broken)
    response = upload(client, clinician, patient["id"], image_bytes())
    assert response.status_code == 503
    assert response.json["error"]["code"] == "database_unavailable"
    assert stored_keys(app) == []


def test_list_is_newest_first_with_latest_result(client, clinician, patient, fake_torchserve):
    ids = []
    for grade in (0, 4, 2):
        fake_torchserve.grade = grade
        ids.append(upload(client, clinician, patient["id"], image_bytes(color=(grade, 0, 0))).json["id"])
    response = client.get(url(patient["id"]), headers=clinician, query_string={"limit": 2})
    assert [s["id"] for s in response.json["items"]] == [ids[2], ids[1]]
    assert [s["result"]["grade"] for s in response.json["items"]] == [2, 4]
    rest = client.get(url(patient["id"]), headers=clinician, query_string={"cursor": response.json["next_cursor"]})
    assert [s["id"] for s in rest.json["items"]] == [ids[0]] and rest.json["next_cursor"] is None


def test_screening_of_another_patient_is_404(client, clinician, patient):
    sid = upload(client, clinician, patient["id"], image_bytes()).json["id"]
    other = client.post("/api/v1/patients", headers=clinician, json={"name": "Other"}).json
    response = client.get(url(other["id"], sid), headers=clinician)
    assert response.status_code == 404 and response.json["error"]["code"] == "screening_not_found"
    missing = client.get(url("00000000-0000-4000-8000-000000000000", sid), headers=clinician)
    assert missing.json["error"]["code"] == "patient_not_found"


def test_regrade_keeps_history(client, clinician, patient, fake_torchserve, make_key):
    sid = upload(client, clinician, patient["id"], image_bytes()).json["id"]
    fake_torchserve.grade = 3
    response = client.post(url(patient["id"], sid, "grade"), headers=clinician)
    assert response.status_code == 201
    assert response.json["result"]["grade"] == 3
    detail = client.get(url(patient["id"], sid), headers=clinician).json
    assert [g["model"]["version"] for g in detail["gradings"]] == ["1.0", "1.0"]
    assert [g["grade"] for g in detail["gradings"]] == [3, 1]
    assert detail["result"] == detail["gradings"][0]


def test_regrade_with_a_named_version_is_a_trial_that_changes_no_clinical_result(
        client, clinician, patient, fake_torchserve, make_key):
    sid = upload(client, clinician, patient["id"], image_bytes()).json["id"]
    before = client.get(url(patient["id"], sid), headers=clinician).json
    summary_before = client.get(f"/api/v1/patients/{patient['id']}/summary", headers=clinician).json
    fake_torchserve.version_grades["2.0"] = 4
    admin = make_key("admin")
    response = client.post(url(patient["id"], sid, "grade"), headers=admin, json={"model_version": "2.0"})
    assert response.status_code == 201
    assert response.json["result"] == before["result"]
    assert fake_torchserve.calls[-1]["version"] == "2.0"
    trial = client.get(response.headers["Location"], headers=admin)
    assert trial.status_code == 200, trial.json
    assert trial.json["model"]["version"] == "2.0" and trial.json["grade"] == 4 and trial.json["source"] == "regrade"
    assert trial.json["baseline_grading_id"] == before["result"]["id"]
    after = client.get(url(patient["id"], sid), headers=clinician).json
    assert after["result"] == before["result"] and after["gradings"] == before["gradings"]
    assert client.get(f"/api/v1/patients/{patient['id']}/summary", headers=clinician).json == summary_before
    assert client.get(response.headers["Location"], headers=clinician).status_code == 403


def test_regrade_a_named_version_needs_admin(client, clinician, patient, fake_torchserve):
    sid = upload(client, clinician, patient["id"], image_bytes()).json["id"]
    response = client.post(url(patient["id"], sid, "grade"), headers=clinician, json={"model_version": "2.0"})
    assert response.status_code == 403
    assert len(fake_torchserve.calls) == 1


@pytest.mark.parametrize("body, status, code", [
    ({"model_version": "9.9"}, 422, "unknown_model_version"),
    ({"model_version": "../../models"}, 422, "invalid_request"),
])
def test_regrade_with_bad_version(client, make_key, patient, clinician, body, status, code):
    sid = upload(client, clinician, patient["id"], image_bytes()).json["id"]
    response = client.post(url(patient["id"], sid, "grade"), headers=make_key("admin"), json=body)
    assert response.status_code == status and response.json["error"]["code"] == code


def test_regrade_when_torchserve_is_down_is_503(client, clinician, patient, fake_torchserve):
    sid = upload(client, clinician, patient["id"], image_bytes()).json["id"]
    fake_torchserve.mode = "down"
    response = client.post(url(patient["id"], sid, "grade"), headers=clinician)
    assert response.status_code == 503
    assert response.json["error"]["code"] == "model_server_unavailable"
    assert response.headers["Retry-After"]


def test_image_is_streamed_with_its_checksum(client, clinician, patient):
    data = image_bytes()
    sid = upload(client, clinician, patient["id"], data).json["id"]
    response = client.get(url(patient["id"], sid, "image"), headers=clinician)
    assert response.status_code == 200
    assert response.data == data
    assert response.headers["X-Content-SHA256"] == hashlib.sha256(data).hexdigest()
    assert response.headers["Cache-Control"] == "no-store"


def test_corrupted_image_is_not_served(app, client, clinician, patient):
    sid = upload(client, clinician, patient["id"], image_bytes()).json["id"]
    storage = app.extensions["clarity"]["storage"]
    (storage.root / "screenings" / sid).write_bytes(b"tampered")
    response = client.get(url(patient["id"], sid, "image"), headers=clinician)
    assert response.status_code == 500
    assert response.json["error"]["code"] == "image_corrupted"
    assert b"tampered" not in response.data


def test_upload_rate_limit_is_per_api_key(make_app):
    app = make_app(upload_rate_limit="2/minute")
    first, second = bearer(app), bearer(app)
    client = app.test_client()
    pid = client.post("/api/v1/patients", headers=first, json={"name": "R"}).json["id"]
    codes = [upload(client, first, pid, image_bytes(color=(i, 0, 0))).status_code for i in range(3)]
    assert codes == [201, 201, 429]
    limited = upload(client, first, pid, image_bytes())
    assert limited.json["error"]["code"] == "rate_limited"
    assert 0 < int(limited.headers["Retry-After"]) <= 60
    assert upload(client, second, pid, image_bytes()).status_code == 201
    # Reads are not limited.
    assert client.get(f"/api/v1/patients/{pid}/screenings", headers=first).status_code == 200


def test_decompression_bomb_is_422_without_decoding(client, clinician, patient, fake_torchserve):
    import struct
    import zlib

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    # A PNG header claiming 20000 x 20000 pixels (400 MP) with almost no data behind it.
    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)) + \
        chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b"")
    response = upload(client, clinician, patient["id"], bomb)
    assert response.status_code == 422
    assert response.json["error"]["code"] == "image_too_large"
    assert fake_torchserve.calls == []
