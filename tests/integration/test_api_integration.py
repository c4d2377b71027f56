"""The API as deployed: real gunicorn (2 workers), real TorchServe with the tiny test model,
real SeaweedFS S3 and PostgreSQL (and SQLite with local storage)."""
import hashlib
import json
import time

import pytest
import requests

from scripts.serving.processes import TorchServe, free_port
from tests.plugins.api import flask_cli

pytestmark = pytest.mark.integration

PHI = {"name": "Hortensia Vandersloot", "birth_date": "1948-02-29", "medical_record_number": "MRN-93317"}


def new_key(env, role):
    result = flask_cli(env, "keys", "create", "--role", role, "--label", f"integration {role}")
    assert result.returncode == 0, result.stderr
    return {"Authorization": f"Bearer {result.stdout.strip()}"}


def torchserve_env(server) -> dict:
    return server.settings_env()


def post_image(api, headers, patient_id, path, eye, form=None, **extra_headers):
    with open(path, "rb") as fh:
        return requests.post(f"{api.url}/api/v1/patients/{patient_id}/screenings", headers={**headers, **extra_headers},
                             files={"image": (path.name, fh, "application/octet-stream")},
                             data={"eye": eye, "camera": "test camera", "captured_at": "2024-06-01T09:00:00Z",
                                   **(form or {})},
                             timeout=120)


def test_full_path_with_postgres_s3_and_torchserve(live_api, api_env, fresh_pg_url, s3_server, torchserve,
                                                   sample_paths):
    env = {**api_env, **s3_server.settings_env(), **torchserve_env(torchserve), "DATABASE_URL": fresh_pg_url}
    api = live_api(env)
    clinician, auditor, admin = (new_key(env, role) for role in ("clinician", "auditor", "admin"))
    base = f"{api.url}/api/v1"

    assert requests.get(f"{api.url}/readyz", timeout=10).json()["status"] == "ready"
    assert requests.get(f"{base}/patients", timeout=10).status_code == 401

    patient = requests.post(f"{base}/patients", headers=clinician, json=PHI, timeout=10)
    assert patient.status_code == 201
    pid = patient.json()["id"]

    photo = next(p for p in sample_paths if p.name == "right_normal_600.jpg")
    data = photo.read_bytes()
    first = post_image(api, clinician, pid, photo, "right", **{"Idempotency-Key": "visit-1-right"})
    assert first.status_code == 201, first.text
    screening = first.json()
    assert screening["status"] == "graded"
    assert screening["image"]["sha256"] == hashlib.sha256(data).hexdigest()
    result = screening["result"]
    assert result["model"] == {"name": "dr", "version": "1.0", "synthetic_training_data": True}
    assert "synthetic" in result["disclaimer"].lower()
    assert 0 <= result["grade"] <= 4 and len(result["probabilities"]) == 5

    # A retry (the client never saw the answer) returns the first result, through either worker.
    for _ in range(3):
        again = post_image(api, clinician, pid, photo, "right", **{"Idempotency-Key": "visit-1-right"})
        assert again.status_code == 201 and again.json()["id"] == screening["id"]
        assert again.headers["Idempotent-Replayed"] == "true"

    sid = screening["id"]
    regraded = requests.post(f"{base}/patients/{pid}/screenings/{sid}/grade", headers=clinician, timeout=120)
    assert regraded.status_code == 201
    history = requests.get(f"{base}/patients/{pid}/screenings/{sid}", headers=clinician, timeout=10).json()
    assert len(history["gradings"]) == 2 and history["result"]["id"] == history["gradings"][0]["id"]

    summary = requests.get(f"{base}/patients/{pid}/summary", headers=clinician, timeout=10).json()
    assert summary["outcome"] in ("refer", "retake")  # the left eye is missing
    # the same visit: the left eye joins the exam the right eye's upload opened
    left = post_image(api, clinician, pid, sample_paths[0], "left", form={"exam_id": screening["exam_id"]})
    assert left.status_code == 201 and left.json()["status"] == "graded"
    summary = requests.get(f"{base}/patients/{pid}/summary", headers=clinician, timeout=10).json()
    referable = summary["eyes"]["left"]["referable"] or summary["eyes"]["right"]["referable"]
    assert summary["outcome"] == ("refer" if referable else "rescreen_12_months")
    assert "synthetic" in summary["disclaimer"].lower()

    # The image: a redirect to a short-lived presigned S3 URL holding the original bytes.
    image = requests.get(f"{base}/patients/{pid}/screenings/{sid}/image", headers=clinician,
                         allow_redirects=False, timeout=10)
    assert image.status_code == 302
    location = image.headers["Location"]
    assert location.startswith(s3_server.endpoint_url) and f"screenings/{sid}" in location
    assert PHI["name"].split()[0] not in location and PHI["medical_record_number"] not in location
    downloaded = requests.get(location, timeout=10)
    assert hashlib.sha256(downloaded.content).hexdigest() == screening["image"]["sha256"]

    models = requests.get(f"{base}/models", headers=admin, timeout=10).json()
    assert models["default_version"] == "1.0"
    assert requests.get(f"{base}/models", headers=clinician, timeout=10).status_code == 403

    events = requests.get(f"{base}/audit-events", headers=auditor, params={"patient_id": pid, "limit": 100},
                          timeout=10).json()["items"]
    actions = [e["action"] for e in reversed(events)]
    assert actions[0] == "patient.create" and actions.count("screening.create") == 5
    for action in ("screening.grade", "screening.read", "patient.summary.read", "screening.image.read"):
        assert action in actions
    assert requests.get(f"{base}/patients/{pid}", headers=auditor, timeout=10).status_code == 403

    check = flask_cli(env, "check-storage")
    assert check.returncode == 0 and "2 checked, 0 problems" in check.stdout

    # Metrics from both workers, labelled by route template.
    metrics = requests.get(f"{api.url}/metrics", timeout=10).text
    assert 'route="/api/v1/patients/<uuid:patient_id>/screenings"' in metrics
    assert "clarity_torchserve_request_duration_seconds_bucket" in metrics
    assert pid not in metrics and sid not in metrics

    deleted = requests.delete(f"{base}/patients/{pid}", headers=clinician, timeout=10)
    assert deleted.status_code == 204
    s3 = s3_server.client()
    listed = s3.list_objects_v2(Bucket=s3_server.bucket, Prefix=f"screenings/{sid}")
    assert listed.get("KeyCount", 0) == 0

    api.stop()
    assert_logs_are_json_without_phi(api.log_path.read_text())


def assert_logs_are_json_without_phi(text):
    lines = [line for line in text.splitlines() if line.strip()]
    assert any('"access"' in line for line in lines) and any('"request"' in line for line in lines)
    for line in lines:
        for value in (PHI["name"], *PHI["name"].split(), PHI["birth_date"], PHI["medical_record_number"]):
            assert value not in line, line
    records = [json.loads(line) for line in lines if line.startswith("{")]
    assert len(records) >= len(lines) - 2  # gunicorn may print a banner line or two before logging is set up
    access = [r for r in records if r.get("message") == "access"]
    assert access and all("?" not in r["path"] for r in access)
    assert all(r.get("request_id") for r in records if r.get("message") in ("access", "request"))


def test_pending_while_torchserve_is_stopped_then_graded(live_api, api_env, model_store, tmp_path, sample_paths):
    """SQLite and local storage; TorchServe stops and comes back on the same ports."""
    grpc = {"grpc_inference_port": free_port(), "grpc_management_port": free_port()}
    server = TorchServe(tmp_path / "ts", model_store, models="dr=dr_1.0.mar", overrides=grpc,
                        env={"DR_TORCH_THREADS": "1"})
    server.start(timeout=120)
    try:
        server.wait_model_ready("dr", "1.0", timeout=120)
        env = {**api_env, **torchserve_env(server), "TORCHSERVE_TIMEOUT_SECONDS": "10"}
        api = live_api(env)
        clinician = new_key(env, "clinician")
        pid = requests.post(f"{api.url}/api/v1/patients", headers=clinician, json=PHI, timeout=10).json()["id"]

        server.stop()
        photo = sample_paths[-1]
        pending = post_image(api, clinician, pid, photo, "left", **{"Idempotency-Key": "while-down"})
        assert pending.status_code == 202, pending.text
        assert int(pending.headers["Retry-After"]) > 0
        assert pending.json()["status"] == "pending" and pending.json()["result"] is None
        sid = pending.json()["id"]
        retry = post_image(api, clinician, pid, photo, "left", **{"Idempotency-Key": "while-down"})
        assert retry.status_code == 202 and retry.json()["id"] == sid
        ready = requests.get(f"{api.url}/api/v1/readiness", headers=new_key(env, "admin"), timeout=10)
        assert ready.status_code == 503 and ready.json()["checks"]["torchserve"]["ok"] is False
        assert flask_cli(env, "grade-pending").returncode == 1  # still down: stays pending

        server.start(timeout=120)
        server.wait_model_ready("dr", "1.0", timeout=120)
        graded = flask_cli(env, "grade-pending")
        assert graded.returncode == 0, graded.stderr
        assert f"{sid} graded" in graded.stdout
        again = flask_cli(env, "grade-pending")
        assert "0 graded" in again.stdout  # nothing graded twice

        detail = requests.get(f"{api.url}/api/v1/patients/{pid}/screenings/{sid}", headers=clinician, timeout=10)
        assert detail.json()["status"] == "graded" and len(detail.json()["gradings"]) == 1
        image = requests.get(f"{api.url}/api/v1/patients/{pid}/screenings/{sid}/image", headers=clinician, timeout=10)
        assert image.status_code == 200
        assert hashlib.sha256(image.content).hexdigest() == hashlib.sha256(photo.read_bytes()).hexdigest()
        api.stop()
        assert_logs_are_json_without_phi(api.log_path.read_text())
    finally:
        server.stop()


def test_a_killed_worker_is_replaced_and_requests_keep_working(live_api, api_env, torchserve):
    env = {**api_env, **torchserve_env(torchserve)}
    api = live_api(env)
    clinician = new_key(env, "clinician")
    api.kill_worker()
    deadline = time.monotonic() + 30
    while len(api.worker_pids()) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    for _ in range(6):
        assert requests.post(f"{api.url}/api/v1/patients", headers=clinician, json={"name": "K"},
                             timeout=10).status_code == 201
