"""Findings 4, 5, 6, 7, 13 and 15 of issue 15, through real gunicorn, PostgreSQL (behind a
TcpProxy), SeaweedFS (behind another) and TorchServe.

TorchServe's inference API is reached through `Gate`, a small HTTP relay in this process: it
forwards to the real TorchServe, and can instead refuse (reset) connections, answer a
server-level 500, or answer the handler's own per-request 500 for images that carry a marker.
No input found makes the shipped handler fail on one image on purpose, so the relay plays that
one answer, in the handler's exact shape (handlers/dr_handler.py `_reject`).
"""
from __future__ import annotations

import http.server
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from scripts.serving.processes import REPO, free_port, wait_for
from tests.support.harness import TcpProxy, jpeg, new_patient, problems

pytestmark = pytest.mark.integration

POISON = b"CLARITY-POISON"


class Gate:
    """HTTP relay to TorchServe's inference API. mode: forward | refuse | server_error."""

    def __init__(self, target: str):
        self.target, self.mode, self.calls = target.rstrip("/"), "forward", 0
        gate = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                gate.calls += 1
                if gate.mode == "refuse":
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
                    self.close_connection = True
                    self.connection.close()
                    return
                if POISON in body:  # the handler's per-request failure (dr_handler._reject)
                    return self._answer(500, {"code": "preprocess_failed",
                                              "message": "The image could not be processed."})
                if gate.mode == "server_error":
                    return self._answer(500, {"code": 500, "type": "InternalServerException",
                                              "message": "Worker died."})
                upstream = requests.post(gate.target + self.path, data=body, timeout=60,
                                         headers={"Content-Type": self.headers.get("Content-Type", ""),
                                                  "Authorization": self.headers.get("Authorization", "")})
                self._answer(upstream.status_code, upstream.content, raw=True)

            def _answer(self, status, body, raw=False):
                data = body if raw else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def s3_proxy(s3_server):
    proxy = TcpProxy(("127.0.0.1", s3_server.ports["s3"])).up()
    yield proxy
    proxy.down()


@pytest.fixture(scope="module")
def gate(torchserve):
    gate = Gate(torchserve.settings_env()["TORCHSERVE_INFERENCE_URL"])
    yield gate
    gate.close()


@pytest.fixture(scope="module")
def stack(make_stack, scratch_database, pg_proxy, s3_proxy, gate):
    return make_stack(name="hardening-faults", database=scratch_database, api_env={
        "DATABASE_URL": pg_proxy.url_through(scratch_database.url),
        "S3_ENDPOINT_URL": f"http://127.0.0.1:{s3_proxy.port}", "TORCHSERVE_INFERENCE_URL": gate.url,
        # The database's deadline follows: 10 / 3 s (DATABASE_STATEMENT_TIMEOUT_SECONDS unset).
        "TORCHSERVE_TIMEOUT_SECONDS": "10"})


@pytest.fixture(scope="module")
def clinician(stack):
    return stack.key("clinician")


@pytest.fixture(scope="module")
def patient(stack, clinician):
    return new_patient(stack, clinician, "hardening-faults")


def post(stack, headers, pid, data, **extra):
    return requests.post(f"{stack.url}/api/v1/patients/{pid}/screenings", headers={**headers, **extra},
                         files={"image": ("e.jpg", io.BytesIO(data), "image/jpeg")}, data={"eye": "left"},
                         timeout=60)


def status_of(stack, sid) -> tuple[str, int, int]:
    (row,) = stack.sql("SELECT s.status, s.grading_attempts, count(g.id) FROM screening s LEFT JOIN grading g "
                       "ON g.screening_id = s.id WHERE s.id = %s GROUP BY s.id", (sid,))
    return row


# ------------------------------------------------------------------ finding 4


def test_grade_pending_goes_on_past_an_image_the_handler_fails_on(stack, clinician, patient, gate):
    gate.mode = "refuse"  # TorchServe unreachable: uploads are kept pending, nothing counted
    poison = post(stack, clinician, patient, jpeg(40) + POISON)
    good = [post(stack, clinician, patient, jpeg(41 + i)) for i in range(2)]
    assert [r.status_code for r in [poison, *good]] == [202, 202, 202], poison.text
    assert status_of(stack, poison.json()["id"]) == ("pending", 0, 0)
    gate.mode = "forward"
    run = stack.cli("grade-pending")
    assert run.returncode == 0, run.stdout + run.stderr
    assert status_of(stack, poison.json()["id"])[0] == "failed"
    assert [status_of(stack, r.json()["id"])[0] for r in good] == ["graded", "graded"], run.stdout
    # Uploaded while TorchServe is there: a 422 with the handler's code, nothing kept.
    rows = len(stack.rows())
    direct = post(stack, clinician, patient, jpeg(44) + POISON)
    assert direct.status_code == 422 and direct.json()["error"]["code"] == "preprocess_failed", direct.text
    assert len(stack.rows()) == rows


# ------------------------------------------------------------------ finding 15


def grader(stack, interval="0.3") -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "flask", "--app", "control_api", "grade-worker",
                             "--interval", interval], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), **stack.env},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def backlog(stack) -> dict:
    text = requests.get(f"{stack.url}/metrics", timeout=30).text
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
            if line.startswith("clarity_pending_")}


def test_two_background_graders_grade_each_pending_screening_once(stack, clinician, patient, gate):
    gate.mode = "refuse"
    ids = [post(stack, clinician, patient, jpeg(50 + i)).json()["id"] for i in range(6)]
    assert backlog(stack)["clarity_pending_screenings"] >= 6
    assert backlog(stack)["clarity_pending_oldest_age_seconds"] > 0
    workers = [grader(stack), grader(stack)]
    try:
        time.sleep(2)  # both pass over the queue while TorchServe is away: nothing counted
        assert {status_of(stack, sid)[:2] for sid in ids} == {("pending", 0)}
        gate.mode = "forward"
        wait_for(lambda: all(status_of(stack, sid)[0] == "graded" for sid in ids), 120, "background grading")
    finally:
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
        for worker in workers:
            assert worker.wait(timeout=30) == 0
    assert [status_of(stack, sid)[2] for sid in ids] == [1] * 6, "each graded exactly once"
    assert not problems(stack.consistency())
    assert backlog(stack) == {"clarity_pending_screenings": 0.0, "clarity_pending_oldest_age_seconds": 0.0}


def test_background_grader_gives_up_after_bounded_attempts(stack, clinician, patient, gate):
    gate.mode = "refuse"
    sid = post(stack, clinician, patient, jpeg(60)).json()["id"]
    gate.mode = "server_error"  # TorchServe answers, but a 500 of its own each time
    worker = grader(stack, interval="0.2")
    try:
        wait_for(lambda: status_of(stack, sid)[0] == "failed", 60, "the screening to fail")
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=30)
        gate.mode = "forward"
    assert status_of(stack, sid) == ("failed", 5, 0)


# ------------------------------------------------------------------ finding 5


def test_a_body_cut_off_by_the_network_is_a_503_not_a_corrupted_image(stack, clinician, patient, s3_proxy):
    uploaded = post(stack, clinician, patient, jpeg(70, size=(1600, 1200)))
    assert uploaded.status_code == 201, uploaded.text
    sid = uploaded.json()["id"]
    s3_proxy.truncate = 4000
    try:
        regrade = requests.post(f"{stack.url}/api/v1/patients/{patient}/screenings/{sid}/grade", headers=clinician,
                                timeout=60)
        assert regrade.status_code == 503 and regrade.json()["error"]["code"] == "storage_unavailable", regrade.text
        check = stack.cli("check-storage")
        assert check.returncode == 1 and "mismatch" not in check.stdout and "could not be read" in check.stdout
    finally:
        s3_proxy.truncate = None
    assert requests.post(f"{stack.url}/api/v1/patients/{patient}/screenings/{sid}/grade", headers=clinician,
                         timeout=60).status_code == 201
    assert stack.check_storage().returncode == 0


# ------------------------------------------------------------------ finding 6


def test_a_change_whose_audit_row_fails_is_rolled_back(stack, clinician, patient, pg_proxy):
    before = stack.sql("SELECT name FROM patient WHERE id = %s", (patient,))
    pg_proxy.cut_when(b'INSERT INTO "audit_event"')
    answer = requests.patch(f"{stack.url}/api/v1/patients/{patient}", headers=clinician,
                            json={"name": "Renamed While Audit Fails"}, timeout=30)
    assert answer.status_code == 503, answer.text
    assert pg_proxy.cuts >= 1
    assert stack.sql("SELECT name FROM patient WHERE id = %s", (patient,)) == before, "change kept without audit row"
    count = stack.sql("SELECT count(*) FROM patient")[0][0]
    pg_proxy.cut_when(b'INSERT INTO "audit_event"')
    created = requests.post(f"{stack.url}/api/v1/patients", headers=clinician, json={"name": "Never Audited"},
                            timeout=30)
    assert created.status_code == 503 and stack.sql("SELECT count(*) FROM patient")[0][0] == count
    pg_proxy.cut_when(None)


def test_audit_rows_carry_the_servers_request_id_and_reads_of_the_trail_are_audited(stack, clinician, patient):
    chosen = f"client-{uuid.uuid4().hex[:8]}"
    answer = requests.get(f"{stack.url}/api/v1/patients/{patient}", headers={**clinician, "X-Request-ID": chosen},
                          timeout=30)
    assert answer.status_code == 200 and answer.headers["X-Request-ID"] != chosen
    assert stack.sql("SELECT count(*) FROM audit_event WHERE request_id = %s", (chosen,)) == [(0,)]
    assert stack.sql("SELECT action FROM audit_event WHERE request_id = %s",
                     (answer.headers["X-Request-ID"],)) == [("patient.read",)]
    auditor = stack.key("auditor")
    trail = requests.get(f"{stack.url}/api/v1/audit-events", headers=auditor, params={"patient_id": patient},
                         timeout=30)
    assert trail.status_code == 200
    assert stack.sql("SELECT action, patient_id::text FROM audit_event WHERE request_id = %s",
                     (trail.headers["X-Request-ID"],)) == [("audit.list", patient)]


# ------------------------------------------------------------------ finding 13


def test_a_black_holed_database_is_a_503_within_the_deadline(stack, clinician, patient, pg_proxy):
    """A database whose packets are dropped (no answer, no reset): every request that needs it,
    a read on a pooled connection, one that must connect anew, a write, is a JSON 503 within
    the TorchServe timeout window (TORCHSERVE_TIMEOUT_SECONDS), which bounds the database's
    connect and statement deadlines (control_api/settings.py), and /healthz stays answerable."""
    window = float(stack.env["TORCHSERVE_TIMEOUT_SECONDS"])
    # Busy first: every worker thread leaves a connection in its worker's pool, each of which
    # peewee's pool would ping (a deadline each) before connecting anew.
    with ThreadPoolExecutor(8) as pool:
        reads = list(pool.map(lambda _: requests.get(f"{stack.url}/api/v1/patients/{patient}", headers=clinician,
                                                     timeout=30).status_code, range(32)))
    assert reads == [200] * 32
    pg_proxy.blackholed = True
    took = {}
    try:
        for what, method, path, body in (("pooled read", "GET", f"/api/v1/patients/{patient}", None),
                                         ("new connection", "GET", f"/api/v1/patients/{patient}", None),
                                         ("write", "PATCH", f"/api/v1/patients/{patient}", {"sex": "male"})):
            started = time.monotonic()
            answer = requests.request(method, f"{stack.url}{path}", headers=clinician, json=body, timeout=3 * window)
            took[what] = time.monotonic() - started
            assert answer.status_code == 503, (what, answer.status_code, answer.text)
            assert answer.json()["error"]["code"] == "database_unavailable", answer.text
            assert took[what] < window, (what, took)
            assert requests.get(f"{stack.url}/healthz", timeout=5).status_code == 200
    finally:
        pg_proxy.blackholed = False
    print(f"black-holed database: 503 after {', '.join(f'{k} {v:.1f} s' for k, v in took.items())} "
          f"(window {window:g} s)")
    wait_for(lambda: requests.get(f"{stack.url}/api/v1/patients/{patient}", headers=clinician,
                                  timeout=30).status_code == 200, 30, "the database again")


# ------------------------------------------------------------------ finding 7


@pytest.fixture(scope="module")
def hung_torchserve():
    """Accepts connections and reads, never answers: a hung TorchServe."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", free_port()))
    listener.listen(64)
    held = []

    def accept():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            held.append(conn)

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    listener.close()
    for conn in held:
        conn.close()


def test_a_hung_torchserve_leaves_liveness_answering_and_extra_uploads_pending(make_stack, stack, hung_torchserve,
                                                                               patient):
    hung = make_stack(name="hung-torchserve", database=stack.database, workers=1, api_env={
        **{k: v for k, v in stack.env.items() if k.startswith(("S3_", "AWS_"))},
        "TORCHSERVE_INFERENCE_URL": hung_torchserve, "TORCHSERVE_TIMEOUT_SECONDS": "20", "GUNICORN_THREADS": "4"})
    key = hung.key("clinician")
    with ThreadPoolExecutor(9) as pool:
        uploads = [pool.submit(post, hung, key, patient, jpeg(80 + i)) for i in range(8)]
        time.sleep(2)
        health = requests.get(f"{hung.url}/healthz", timeout=5)  # the ECS health check's timeout
        assert health.status_code == 200
        statuses = [u.result().status_code for u in uploads]
    assert statuses == [202] * 8, statuses
