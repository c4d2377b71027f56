"""Finding 14 of issue 15: `make run` (python -m scripts.serving.stack run) keeps the API
serving when TorchServe dies, starts TorchServe again with a backoff, and its background
grader grades what was kept pending meanwhile. A real stack process with its own ports, work
directory (STACK_VAR), a scratch PostgreSQL database and the test model store."""
from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import requests

from scripts.serving.processes import REPO, flask_cli, free_port, wait_for
from tests.support.harness import jpeg, phi_patient

pytestmark = pytest.mark.integration


def _up(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.RequestException:
        return False


def test_make_run_survives_torchserve_dying(tmp_path, model_store, scratch_database):
    port, ts_ports = free_port(), [free_port(), free_port(), free_port()]
    env = {**os.environ, "PYTHONPATH": str(REPO), "STACK_VAR": str(tmp_path / "var"), "MODEL_PATH": str(model_store),
           "DATABASE_URL": scratch_database.url, "LOCAL_STORAGE_DIR": str(tmp_path / "images"), "TORCHSERVE_TIMEOUT_SECONDS": "10"}
    log = open(tmp_path / "stack.log", "wb")
    stack = subprocess.Popen([sys.executable, "-m", "scripts.serving.stack", "run", "--port", str(port),
                              "--torchserve-ports", *map(str, ts_ports)], cwd=REPO, env=env, stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _up(f"{base}/healthz") or stack.poll() is not None, 240, "make run")
        assert stack.poll() is None, (tmp_path / "stack.log").read_text()[-3000:]
        api_env = {"DATABASE_URL": scratch_database.url, "LOCAL_STORAGE_DIR": str(tmp_path / "images")}
        key = {"Authorization": "Bearer " + flask_cli(api_env, "keys", "create", "--role", "clinician").stdout.strip()}
        admin = {"Authorization": "Bearer " + flask_cli(api_env, "keys", "create", "--role", "admin").stdout.strip()}
        pid = requests.post(f"{base}/api/v1/patients", headers=key, json=phi_patient("stackrun"), timeout=30).json()["id"]

        def upload(i):
            return requests.post(f"{base}/api/v1/patients/{pid}/screenings", headers=key, timeout=60,
                                 files={"image": ("e.jpg", io.BytesIO(jpeg(90 + i)), "image/jpeg")}, data={"eye": "left"})

        assert upload(0).status_code == 201
        java = [p for p in psutil.Process(stack.pid).children(recursive=True) if p.name() == "java"]
        assert java, "TorchServe's Java process"
        for p in java:
            p.send_signal(signal.SIGKILL)
        answers = [upload(1 + i) for i in range(6)]  # while TorchServe is gone and coming back
        assert all(a.status_code in (201, 202) for a in answers), [a.status_code for a in answers]
        assert stack.poll() is None and _up(f"{base}/healthz")
        pending = [a.json()["id"] for a in answers if a.status_code == 202]
        assert pending, "some uploads were kept pending while TorchServe was away"
        wait_for(lambda: requests.get(f"{base}/api/v1/readiness", headers=admin, timeout=10).status_code == 200,
                 240, "TorchServe started again")
        wait_for(lambda: all(requests.get(f"{base}/api/v1/patients/{pid}/screenings/{sid}", headers=key,
                                          timeout=10).json()["status"] == "graded" for sid in pending),
                 120, "the background grader")
        assert "exited; starting it again" in (tmp_path / "stack.log").read_text()
    finally:
        if stack.poll() is None:
            os.killpg(stack.pid, signal.SIGINT)
            try:
                stack.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(stack.pid, signal.SIGKILL)
        log.close()


def test_deleting_a_patient_removes_every_version_of_their_photographs(make_stack):
    """Finding 9: with S3 versioning on (as docs/deployment.md recommends), a patient's deletion
    leaves no version and no delete marker of their images."""
    from tests.support.harness import new_patient

    stack = make_stack(shared_s3=False, name="versioned")
    s3 = stack.s3.client()
    s3.put_bucket_versioning(Bucket=stack.bucket, VersioningConfiguration={"Status": "Enabled"})
    key = stack.key("clinician")
    pid = new_patient(stack, key, "versioned")
    sids = [requests.post(f"{stack.url}/api/v1/patients/{pid}/screenings", headers=key, timeout=60,
                          files={"image": ("e.jpg", io.BytesIO(jpeg(100 + i)), "image/jpeg")},
                          data={"eye": "left"}).json()["id"] for i in range(2)]
    keys = {f"screenings/{sid}" for sid in sids}
    listed = s3.list_object_versions(Bucket=stack.bucket, Prefix="screenings/")
    assert {v["Key"] for v in listed.get("Versions", [])} >= keys
    assert requests.delete(f"{stack.url}/api/v1/patients/{pid}", headers=key, timeout=60).status_code == 204
    left = s3.list_object_versions(Bucket=stack.bucket, Prefix="screenings/")
    remaining = {v["Key"] for v in left.get("Versions", []) + left.get("DeleteMarkers", [])}
    assert not remaining & keys, remaining


def test_presigned_image_links_are_short_lived_and_not_cached(make_stack):
    from urllib.parse import parse_qs, urlsplit

    from control_api.settings import Settings, SettingsError
    from tests.support.harness import new_patient

    with pytest.raises(SettingsError):
        Settings(s3_presign_ttl_seconds=3600)
    stack = make_stack(name="presign")
    key = stack.key("clinician")
    pid = new_patient(stack, key, "presign")
    sid = requests.post(f"{stack.url}/api/v1/patients/{pid}/screenings", headers=key, timeout=60,
                        files={"image": ("e.jpg", io.BytesIO(jpeg(120)), "image/jpeg")}, data={"eye": "left"}).json()["id"]
    link = requests.get(f"{stack.url}/api/v1/patients/{pid}/screenings/{sid}/image", headers=key, timeout=30,
                        allow_redirects=False)
    assert link.status_code == 302
    query = parse_qs(urlsplit(link.headers["Location"]).query)
    assert int(query["X-Amz-Expires"][0]) <= 900
    image = requests.get(link.headers["Location"], timeout=30)
    assert image.status_code == 200 and "no-store" in image.headers["Cache-Control"]
