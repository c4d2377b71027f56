"""Faults injected into real processes: TorchServe killed, the S3 server stopped, PostgreSQL
unreachable, a gunicorn worker killed mid-request, and every process restarted.

One private stack for the module: gunicorn (2 workers), its own TorchServe (tiny model) and
its own SeaweedFS S3, both restartable at the same ports, and a scratch PostgreSQL database
that the API reaches through a TCP proxy (tests.support.harness.TcpProxy). The machine's
PostgreSQL server is shared with other tests and cannot be stopped, so "PostgreSQL is
unreachable" is the proxy going down (connections refused, open ones reset) or cutting the
connection exactly when a given statement is sent. Checks read PostgreSQL directly.

Every test leaves the stack running and consistent for the next. docs/guarantees.md lists
what each fault does to clients and data and how to recover.
"""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from scripts.serving.processes import REPO, wait_for
from tests.support.harness import jpeg, new_patient, problems, upload

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stack(make_stack, scratch_database, pg_proxy):
    return make_stack(shared_torchserve=False, shared_s3=False, database=scratch_database, name="faults",
                      api_env={"DATABASE_URL": pg_proxy.url_through(scratch_database.url),
                               "TORCHSERVE_TIMEOUT_SECONDS": "10"})


@pytest.fixture(scope="module")
def clinician(stack):
    return stack.key("clinician")


_admins: dict = {}


def admin(stack) -> dict:
    """An admin key: which dependency /readyz found missing is in GET /api/v1/readiness."""
    if id(stack) not in _admins:
        _admins[id(stack)] = stack.key("admin")
    return _admins[id(stack)]


def cli_env(stack) -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), **stack.env}


def expire_leases(stack) -> None:
    """As if grading.LEASE (5 minutes) had passed since a grader took its pending screenings."""
    stack.sql("UPDATE screening SET grading_started_at = now() at time zone 'utc' - interval '10 minutes' "
              "WHERE status = 'pending' AND grading_started_at IS NOT NULL")


def assert_consistent(stack, expected: dict | None = None) -> dict:
    report = stack.consistency(expected)
    assert not problems(report), report
    check = stack.check_storage()
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"{report['rows']} checked, 0 problems" in check.stdout
    return report


def photo(tag: str, i: int) -> bytes:
    return jpeg(seed=zlib.crc32(f"{tag}-{i}".encode()) % 10_000)


def eye(i: int) -> str:
    return "left" if i % 2 else "right"


def stream(stack, headers, patient_id, count: int, tag: str, *, concurrency: int, after: int, fault):
    """Upload `count` distinct photographs with `concurrency` clients; once `after` have been
    answered, call fault() while the rest are in flight or queued. Returns [(sha, response or
    exception)] in upload order."""
    images = [photo(tag, i) for i in range(count)]

    def one(i):
        try:
            return upload(stack, headers, patient_id, images[i], eye=eye(i),
                          idempotency_key=f"{tag}-{i}")
        except requests.RequestException as exc:
            return exc

    with ThreadPoolExecutor(concurrency) as pool:
        futures = [pool.submit(one, i) for i in range(count)]
        wait_for(lambda: sum(f.done() for f in futures) >= after, 120, f"{after} uploads answered", interval=0.05)
        fault()
        results = [f.result() for f in futures]
    return [(hashlib.sha256(data).hexdigest(), r) for data, r in zip(images, results)]


def test_torchserve_killed_during_uploads(stack, clinician):
    """TorchServe (frontend and workers) is SIGKILLed while 20 uploads stream in, 4 at a time.

    Expected: no upload fails. Each is stored: 201 if graded before the kill, otherwise 202
    with Retry-After and status `pending`. /readyz says TorchServe is not ready and
    `flask grade-pending` exits 1, leaving them pending. Once TorchServe is back on its ports,
    the re-grade endpoint grades one, and two `grade-pending` runs started together grade the
    rest: each screening ends with exactly one grading.
    """
    pid = new_patient(stack, clinician, "ts-kill")
    ts = stack.torchserve
    results = stream(stack, clinician, pid, 20, "ts-kill", concurrency=4, after=4, fault=ts.kill)
    try:
        for _, r in results:
            assert isinstance(r, requests.Response), r
            assert r.status_code in (201, 202), r.text
        pending = [r.json()["id"] for _, r in results if r.status_code == 202]
        assert pending and len(pending) < len(results)  # some graded before the kill, the rest after
        for _, r in results:
            if r.status_code == 202:
                assert int(r.headers["Retry-After"]) > 0
                assert r.json()["status"] == "pending" and r.json()["result"] is None
            else:
                assert r.json()["status"] in ("graded", "ungradable") and r.json()["result"]
        expected = {r.json()["id"]: sha for sha, r in results}
        assert_consistent(stack, expected)

        ready = requests.get(f"{stack.url}/api/v1/readiness", headers=admin(stack), timeout=30)
        assert ready.status_code == 503 and ready.json()["checks"]["torchserve"]["ok"] is False
        still_down = stack.cli("grade-pending")
        assert still_down.returncode == 1, still_down.stdout
        assert {i: r["status"] for i, r in stack.rows().items() if i in pending} == {i: "pending" for i in pending}
    finally:
        ts.start(timeout=120)
        ts.wait_model_ready("dr", "1.0", timeout=120)

    first = pending[0]
    regraded = requests.post(f"{stack.url}/api/v1/patients/{pid}/screenings/{first}/grade", headers=clinician,
                             timeout=60)
    assert regraded.status_code == 201, regraded.text
    assert regraded.json()["status"] in ("graded", "ungradable") and regraded.json()["result"]

    runs = [subprocess.Popen([sys.executable, "-m", "flask", "--app", "control_api", "grade-pending"], cwd=REPO,
                             env=cli_env(stack), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    outputs = [run.communicate(timeout=300) for run in runs]
    assert all(run.returncode == 0 for run in runs), outputs
    graded_by_runs = sum(out.count(" graded\n") + out.count(" ungradable\n") for out, _ in outputs)
    assert graded_by_runs == len(pending) - 1, outputs

    rows = stack.rows()
    for sid in expected:
        assert rows[sid]["status"] in ("graded", "ungradable"), (sid, rows[sid])
        assert rows[sid]["gradings"] == 1, (sid, rows[sid])
    assert_consistent(stack, expected)
    assert "0 graded" in stack.cli("grade-pending").stdout


def test_torchserve_hung(stack, clinician):
    """TorchServe is frozen (SIGSTOP on its process group): it accepts connections and never
    answers, like an overloaded or wedged server.

    Expected: the upload waits TORCHSERVE_TIMEOUT_SECONDS (10 s here), then answers 202 +
    Retry-After with the screening stored as `pending`. When TorchServe resumes (SIGCONT) it
    answers the abandoned request to nobody: nothing is written from it. `grade-pending` then
    grades the screening exactly once.
    """
    pid = new_patient(stack, clinician, "ts-hung")
    ts = stack.torchserve
    os.killpg(ts.proc.pid, signal.SIGSTOP)
    try:
        response = upload(stack, clinician, pid, jpeg(seed=77), idempotency_key="ts-hung-1")
    finally:
        os.killpg(ts.proc.pid, signal.SIGCONT)
    assert response.status_code == 202, response.text
    assert int(response.headers["Retry-After"]) > 0 and response.json()["status"] == "pending"
    sid = response.json()["id"]
    ts.wait_model_ready("dr", "1.0", timeout=120)
    row = stack.rows()[sid]
    assert row["status"] == "pending" and row["gradings"] == 0, row
    graded = stack.cli("grade-pending")
    assert graded.returncode == 0 and sid in graded.stdout, graded.stdout + graded.stderr
    assert stack.rows()[sid]["gradings"] == 1
    assert_consistent(stack)


def test_s3_server_stopped(stack, clinician):
    """The S3 server is stopped (SIGTERM), then started again at the same ports on the same data.

    Expected while it is down: an upload answers 503 storage_unavailable with Retry-After and
    leaves no database row; reading an existing image answers 503, not 500 or a redirect to a
    dead URL; re-grading (which reads the image) answers 503; deleting the patient answers 503
    and deletes nothing; the screening's record still reads (200: it lives in PostgreSQL);
    /readyz is 503 naming storage while /healthz stays 200. Afterwards every image is there
    with its SHA-256, and uploads work again.
    """
    pid = new_patient(stack, clinician, "s3-down")
    stored = upload(stack, clinician, pid, jpeg(seed=101))
    assert stored.status_code == 201, stored.text
    sid = stored.json()["id"]
    rows_before = stack.rows()
    base = f"{stack.url}/api/v1/patients/{pid}"

    stack.s3.stop()
    try:
        refused = upload(stack, clinician, pid, jpeg(seed=102))
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "storage_unavailable" and int(refused.headers["Retry-After"]) > 0
        assert stack.rows() == rows_before

        image = requests.get(f"{base}/screenings/{sid}/image", headers=clinician, allow_redirects=False, timeout=60)
        assert image.status_code == 503, (image.status_code, image.headers.get("Location"))
        assert image.json()["error"]["code"] == "storage_unavailable"
        regrade = requests.post(f"{base}/screenings/{sid}/grade", headers=clinician, timeout=60)
        assert regrade.status_code == 503 and regrade.json()["error"]["code"] == "storage_unavailable"
        delete = requests.delete(base, headers=clinician, timeout=60)
        assert delete.status_code == 503
        assert requests.get(base, headers=clinician, timeout=30).status_code == 200
        assert requests.get(f"{base}/screenings/{sid}", headers=clinician, timeout=30).status_code == 200
        assert stack.rows() == rows_before

        ready = requests.get(f"{stack.url}/api/v1/readiness", headers=admin(stack), timeout=60)
        assert ready.status_code == 503 and ready.json()["checks"]["storage"]["ok"] is False
        assert requests.get(f"{stack.url}/healthz", timeout=10).status_code == 200
    finally:
        stack.s3.start(timeout=60)

    assert_consistent(stack)
    image = requests.get(f"{base}/screenings/{sid}/image", headers=clinician, allow_redirects=False, timeout=30)
    assert image.status_code == 302
    assert hashlib.sha256(requests.get(image.headers["Location"], timeout=30).content).hexdigest() == \
        stored.json()["image"]["sha256"]
    assert upload(stack, clinician, pid, jpeg(seed=103)).status_code == 201
    wait_for(lambda: requests.get(f"{stack.url}/readyz", timeout=30).status_code == 200, 30, "/readyz")


def test_postgres_unreachable(stack, clinician, pg_proxy):
    """PostgreSQL becomes unreachable: the proxy stops listening and resets every open
    connection (the API's pooled connections die).

    Expected: every call that needs the database answers 503 (database_unavailable, or
    audit_unavailable when only the audit row cannot be written), never 500; an upload leaves
    no object in S3; /healthz stays 200 and /readyz is 503. Once the database is reachable
    again, the next requests succeed: dead pooled connections are dropped, not reused.
    """
    pid = new_patient(stack, clinician, "pg-down")
    objects_before = stack.object_keys()
    rows_before = stack.rows()
    pg_proxy.down()
    try:
        for call in (lambda: upload(stack, clinician, pid, jpeg(seed=201)),
                     lambda: requests.get(f"{stack.url}/api/v1/patients/{pid}", headers=clinician, timeout=60),
                     lambda: requests.post(f"{stack.url}/api/v1/patients", headers=clinician,
                                           json={"name": "Nobody"}, timeout=60)):
            response = call()
            assert response.status_code == 503, response.text
            assert response.json()["error"]["code"] in ("database_unavailable", "audit_unavailable")
        assert requests.get(f"{stack.url}/healthz", timeout=10).status_code == 200
        # No admin key can be checked without the database: the public answer (cached up to 5 s) says it.
        wait_for(lambda: requests.get(f"{stack.url}/readyz", timeout=60).status_code == 503, 30, "/readyz 503")
        assert stack.object_keys() == objects_before
    finally:
        pg_proxy.up()
    for _ in range(6):  # more requests than each worker's pooled connections
        assert requests.get(f"{stack.url}/api/v1/patients/{pid}", headers=clinician, timeout=30).status_code == 200
    assert stack.rows() == rows_before
    assert_consistent(stack)


def test_postgres_dies_while_the_screening_row_is_written(stack, clinician, pg_proxy):
    """The database connection is reset exactly when the upload sends INSERT INTO screening,
    after the image is already in S3.

    Expected: 503; the API deletes the object it had stored, so neither an orphan object nor
    a row is left (reconcile's dry run finds nothing); a retry with the same Idempotency-Key
    then stores the screening once.
    """
    pid = new_patient(stack, clinician, "pg-insert")
    objects_before, rows_before = stack.object_keys(), stack.rows()
    pg_proxy.cut_when(b'INSERT INTO "screening"')
    data = jpeg(seed=301)
    response = upload(stack, clinician, pid, data, idempotency_key="pg-insert-1")
    assert pg_proxy.cuts == 1
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] in ("database_unavailable", "audit_unavailable")
    assert stack.object_keys() == objects_before
    assert stack.rows() == rows_before
    dry_run = stack.cli("reconcile", "--grace-minutes", "0")
    assert dry_run.returncode == 0 and "0 objects without rows, 0 rows without objects" in dry_run.stdout

    retry = upload(stack, clinician, pid, data, idempotency_key="pg-insert-1")
    assert retry.status_code == 201, retry.text
    again = upload(stack, clinician, pid, data, idempotency_key="pg-insert-1")
    assert again.json()["id"] == retry.json()["id"] and again.headers["Idempotent-Replayed"] == "true"
    assert_consistent(stack)


def test_postgres_dies_while_the_grading_is_written(stack, clinician, pg_proxy):
    """The connection is reset when the upload sends INSERT INTO grading (after TorchServe answered).

    Expected: the client gets 503 and nothing is kept: the screening row was in the same
    transaction as the grading and the audit row (issue 15, finding 6), so it is rolled back,
    and the API deletes the object it had stored. A retry with the same Idempotency-Key then
    stores and grades the screening once.
    """
    pid = new_patient(stack, clinician, "pg-grading")
    rows_before = len(stack.rows())
    pg_proxy.cut_when(b'INSERT INTO "grading"')
    data = jpeg(seed=401)
    response = upload(stack, clinician, pid, data, idempotency_key="pg-grading-1")
    assert pg_proxy.cuts >= 1
    assert response.status_code == 503, response.text
    assert len(stack.rows()) == rows_before
    assert_consistent(stack)

    retry = upload(stack, clinician, pid, data, idempotency_key="pg-grading-1")
    assert retry.status_code == 201 and retry.json()["status"] == "graded", retry.text
    assert stack.rows()[retry.json()["id"]]["gradings"] == 1
    assert_consistent(stack)


def test_reconcile_repairs_orphans_in_both_directions(stack, clinician):
    """What a crash between the S3 write and the row write (or an object lost from S3) leaves
    behind, made directly: an object without a row, and a row whose object is gone.

    Expected: `flask reconcile` (dry run) names both and changes nothing; `--apply` deletes
    the orphan object and the row (with its gradings); afterwards everything is consistent.
    Objects and rows younger than --grace-minutes are left alone. Meanwhile the image of the
    row without its object answers 404 image_missing, not a redirect to a missing object.
    """
    pid = new_patient(stack, clinician, "reconcile")
    doomed = upload(stack, clinician, pid, jpeg(seed=501))
    assert doomed.status_code == 201
    doomed_id = doomed.json()["id"]
    s3 = stack.s3.client()
    s3.delete_object(Bucket=stack.bucket, Key=f"screenings/{doomed_id}")
    orphan_key = "screenings/00000000-0000-4000-8000-00000000beef"
    s3.put_object(Bucket=stack.bucket, Key=orphan_key, Body=jpeg(seed=502), ServerSideEncryption="AES256")

    assert stack.check_storage().returncode == 1
    gone = requests.get(f"{stack.url}/api/v1/patients/{pid}/screenings/{doomed_id}/image", headers=clinician,
                        allow_redirects=False, timeout=30)
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "image_missing"
    young = stack.cli("reconcile")  # default grace: both are too young to touch
    assert "0 objects without rows, 0 rows without objects" in young.stdout
    dry_run = stack.cli("reconcile", "--grace-minutes", "0")
    assert dry_run.returncode == 0
    assert f"object without row: {orphan_key}" in dry_run.stdout
    assert f"row without object: screening {doomed_id}" in dry_run.stdout
    assert orphan_key in stack.object_keys() and doomed_id in stack.rows()

    applied = stack.cli("reconcile", "--apply", "--grace-minutes", "0")
    assert applied.returncode == 0 and "1 objects without rows, 1 rows without objects repaired" in applied.stdout
    assert orphan_key not in stack.object_keys() and doomed_id not in stack.rows()
    assert stack.sql("SELECT count(*) FROM grading WHERE screening_id = %s", (doomed_id,)) == [(0,)]
    assert_consistent(stack)


def test_gunicorn_worker_killed_mid_request(stack, clinician):
    """A gunicorn worker is SIGKILLed twice while 16 uploads are in flight, 6 at a time.

    Expected: each client gets either an answer (201/202) or a dropped connection, never a 5xx;
    the master starts new workers. No screening is half-written: every row has its object (with
    its SHA-256), every graded row its grading. A kill between the S3 write and the row write can
    leave an object without a row: `flask reconcile` lists exactly those and `--apply` removes
    them. Clients that lost their connection retry with the same Idempotency-Key and get one
    screening per key; screenings whose grader died stay pending until the lease passes, then
    `grade-pending` grades each once.
    """
    pid = new_patient(stack, clinician, "worker-kill")
    api = stack.api
    objects_before = stack.object_keys()
    kills = []

    def kill_two():
        kills.append(api.kill_worker())
        time.sleep(0.3)  # spread the second kill over other requests; no assertion depends on it
        kills.append(api.kill_worker())

    results = stream(stack, clinician, pid, 16, "worker-kill", concurrency=6, after=3, fault=kill_two)
    for _, r in results:
        if isinstance(r, requests.Response):
            assert r.status_code in (201, 202), r.text
        else:
            assert isinstance(r, (requests.ConnectionError, requests.exceptions.ChunkedEncodingError)), repr(r)
    wait_for(lambda: len(api.worker_pids()) == 2 and not set(kills) & set(api.worker_pids()), 120, "workers replaced",
             interval=0.05)

    report = stack.consistency()
    for name in ("rows_without_object", "ungraded", "graded_twice"):
        assert not report[name], report
    orphans = report["objects_without_row"]
    dry_run = stack.cli("reconcile", "--grace-minutes", "0")
    assert f"{len(orphans)} objects without rows, 0 rows without objects" in dry_run.stdout, dry_run.stdout
    for key in orphans:
        assert f"object without row: {key}" in dry_run.stdout
    stack.cli("reconcile", "--apply", "--grace-minutes", "0")

    # The clients that saw a dropped connection retry with their key.
    retried = {}
    for i, (sha, r) in enumerate(results):
        if not isinstance(r, requests.Response):
            retried[i] = upload(stack, clinician, pid, photo("worker-kill", i), eye=eye(i),
                                idempotency_key=f"worker-kill-{i}")
            assert retried[i].status_code in (201, 202), retried[i].text
    final = {i: (retried.get(i) or r) for i, (_, r) in enumerate(results)}
    expected = {final[i].json()["id"]: sha for i, (sha, _) in enumerate(results)}
    assert len(expected) == 16  # one screening per Idempotency-Key
    assert stack.sql("SELECT count(*) FROM screening WHERE idempotency_key LIKE 'worker-kill-%%'") == [(16,)]

    expire_leases(stack)
    graded = stack.cli("grade-pending")
    assert graded.returncode == 0, graded.stderr
    rows = stack.rows()
    assert all(rows[sid]["status"] in ("graded", "ungradable") and rows[sid]["gradings"] == 1 for sid in expected), \
        {sid: rows[sid] for sid in expected}
    assert_consistent(stack, expected)
    assert stack.object_keys() - objects_before == {rows[sid]["image_key"] for sid in expected}


def test_every_process_restarted(stack, clinician):
    """gunicorn, TorchServe and the S3 server are stopped and started again (same ports, same
    data), and PostgreSQL drops every connection of the API (pg_terminate_backend, as a
    database restart would).

    Expected: every record and image is still there and consistent (`flask check-storage`
    verifies each object's SHA-256), each image downloads with its SHA-256, and the stack
    takes uploads again.
    """
    rows_before = stack.rows()
    objects_before = stack.object_keys()
    assert rows_before and objects_before

    stack.api.stop()
    stack.torchserve.stop()
    stack.s3.stop()
    stack.s3.start(timeout=60)
    stack.torchserve.start(timeout=120)
    stack.torchserve.wait_model_ready("dr", "1.0", timeout=120)
    stack.api.start(timeout=60)
    # Opens pooled connections (the admin readiness runs every check now; /readyz may answer from its 5 s cache).
    assert requests.get(f"{stack.url}/api/v1/readiness", headers=admin(stack), timeout=30).status_code == 200
    terminated = stack.sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                           "WHERE datname = current_database() AND pid <> pg_backend_pid()")
    assert terminated, "the API holds no database connection to drop"

    assert stack.rows() == rows_before
    assert stack.object_keys() == objects_before
    assert_consistent(stack)
    assert requests.get(f"{stack.url}/api/v1/readiness", headers=admin(stack), timeout=30).status_code == 200

    for sid, row in sorted(rows_before.items())[:5]:
        pid = stack.sql("SELECT patient_id FROM screening WHERE id = %s", (sid,))[0][0]
        link = requests.get(f"{stack.url}/api/v1/patients/{pid}/screenings/{sid}/image", headers=clinician,
                            allow_redirects=False, timeout=30)
        assert link.status_code == 302, link.text
        assert hashlib.sha256(requests.get(link.headers["Location"], timeout=30).content).hexdigest() == row["sha256"]
    pid = new_patient(stack, clinician, "after-restart")
    assert upload(stack, clinician, pid, jpeg(seed=601)).status_code == 201
