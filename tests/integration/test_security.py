"""Security properties of the running stack: real gunicorn (at LOG_LEVEL=DEBUG, the most
talkative setting), TorchServe with the tiny model, SeaweedFS S3 and PostgreSQL.

- every route: no key 401, a revoked key 401, a role that may not 403, walked from the URL map
  with the role table of tests/unit/test_api_auth.py (so a new route must be added there);
- one patient's screening cannot be read through another patient's URL (404), and the
  attempt leaves an audit event with outcome not_found;
- every read and write of patient data leaves an audit event naming the request, found by its
  X-Request-ID; a table lists each patient-data endpoint, and the URL map must not have more;
- no PHI (the distinctive markers of tests.plugins.stack) in any log: gunicorn's (with the
  app's stdout and stderr), TorchServe's, SeaweedFS's;
- TorchServe's management API has no route through the API, and registering a model from a
  remote URL is refused by TorchServe's allowed_urls, with a clear message from scripts.serving.registry;
- images are encrypted at rest (SSE-S3, AES256) and object keys and download links carry no
  patient data;
- security headers on every kind of answer; uploads rate-limited per API key (429 + Retry-After).
"""
from __future__ import annotations

import re
import subprocess
import sys
import uuid

import pytest
import requests

from control_api import create_app
from control_api.settings import Settings
from scripts.serving.processes import REPO
from tests.support.harness import PHI_MRN, PHI_PATTERN, jpeg, new_patient, phi_in, phi_patient, upload
from tests.unit.test_api_auth import EXPECTED, PUBLIC_ENDPOINTS, routes

pytestmark = pytest.mark.integration

ROLES = ("clinician", "admin", "auditor")
UUID_KEY = re.compile(r"^screenings/[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


@pytest.fixture(scope="module")
def stack(make_stack):
    return make_stack(name="security", api_env={"LOG_LEVEL": "DEBUG"})


@pytest.fixture(scope="module")
def keys(stack):
    return {role: stack.key(role) for role in ROLES}


@pytest.fixture(scope="module")
def url_map(tmp_path_factory):
    """The app's routes (built in-process only to read its URL map; the live server has the same code)."""
    settings = Settings.from_env({}, database_url=f"sqlite:///{tmp_path_factory.mktemp('urlmap') / 'x.db'}")
    return list(routes(create_app(settings)))


@pytest.fixture(scope="module")
def data(stack, keys):
    """Two patients with PHI markers; patient A has a screening."""
    clinician = keys["clinician"]
    a, b = new_patient(stack, clinician, "sec-a"), new_patient(stack, clinician, "sec-b")
    screening = upload(stack, clinician, a, jpeg(seed=11))
    assert screening.status_code == 201, screening.text
    return {"a": a, "b": b, "screening": screening.json()["id"]}


def audit_events(stack, request_id: str) -> list[tuple]:
    return stack.sql("SELECT action, outcome, resource_type, resource_id::text, patient_id::text, actor_prefix "
                     "FROM audit_event WHERE request_id = %s ORDER BY id", (request_id,))


def call(stack, method: str, path: str, headers=None, **kwargs) -> requests.Response:
    return requests.request(method, f"{stack.url}{path}", headers=headers or {}, timeout=60,
                            allow_redirects=False, **kwargs)


def test_every_route_needs_a_valid_key_and_the_right_role(stack, keys, url_map):
    """No key: 401 with WWW-Authenticate. A revoked key: 401 that says so. A role the route does
    not allow: 403. An allowed role: never 401/403 (the random ids give 404, missing bodies 422)."""
    revoked = stack.key("clinician")
    prefix = revoked["Authorization"].split("_")[1]
    assert stack.cli("keys", "revoke", prefix).returncode == 0
    private = [(e, m, p) for e, m, p in url_map if e not in PUBLIC_ENDPOINTS]
    assert {e for e, _, _ in private} == set(EXPECTED)

    for endpoint, method, path in private:
        anonymous = call(stack, method, path)
        assert anonymous.status_code == 401, (method, path)
        assert anonymous.json()["error"]["code"] == "unauthorized"
        assert anonymous.headers["WWW-Authenticate"].startswith("Bearer")
        gone = call(stack, method, path, revoked)
        assert gone.status_code == 401 and "revoked" in gone.json()["error"]["message"], (method, path)
        for role in ROLES:
            response = call(stack, method, path, keys[role])
            if role in EXPECTED[endpoint]:
                assert response.status_code not in (401, 403), (role, method, path, response.text)
            else:
                assert response.status_code == 403, (role, method, path)
                assert response.json()["error"]["code"] == "forbidden"
    for endpoint, method, path in url_map:
        if endpoint == "console.asset":  # a made-up file name under /console/
            assert call(stack, method, path).status_code == 404, path
        elif endpoint in PUBLIC_ENDPOINTS:
            assert call(stack, method, path).status_code == 200, path


def test_a_screening_cannot_be_read_through_another_patients_url(stack, keys, data):
    """Patient A's screening asked for under patient B's URL: 404 screening_not_found for the
    record, the image and a re-grade, B's list does not show it, and each attempt is audited
    as not_found against patient B's URL."""
    clinician, sid = keys["clinician"], data["screening"]
    base = f"/api/v1/patients/{data['b']}/screenings"
    for method, path in (("GET", f"{base}/{sid}"), ("GET", f"{base}/{sid}/image"), ("POST", f"{base}/{sid}/grade")):
        response = call(stack, method, path, clinician)
        assert response.status_code == 404, (path, response.text)
        assert response.json()["error"]["code"] == "screening_not_found"
        assert sid not in response.text and data["a"] not in response.text
        events = audit_events(stack, response.headers["X-Request-ID"])
        assert [(e[1], e[3], e[4]) for e in events] == [("not_found", sid, data["b"])], events
    listed = call(stack, "GET", base, clinician).json()["items"]
    assert listed == []
    assert stack.sql("SELECT count(*) FROM grading WHERE screening_id = %s", (sid,)) == [(1,)]


# Every endpoint that touches patient data: (endpoint, method, path, body kind, action, resource type).
AUDITED = [
    ("patients.create_patient", "POST", "/api/v1/patients", "patient", "patient.create", "patient"),
    ("patients.list_patients", "GET", "/api/v1/patients", None, "patient.list", "patient"),
    ("patients.read_patient", "GET", "/api/v1/patients/{p}", None, "patient.read", "patient"),
    ("patients.update_patient", "PATCH", "/api/v1/patients/{p}", "patch", "patient.update", "patient"),
    ("patients.patient_summary", "GET", "/api/v1/patients/{p}/summary", None, "patient.summary.read", "patient"),
    ("screenings.create_screening", "POST", "/api/v1/patients/{p}/screenings", "upload", "screening.create",
     "screening"),
    ("screenings.list_screenings", "GET", "/api/v1/patients/{p}/screenings", None, "screening.list", "patient"),
    ("screenings.read_screening", "GET", "/api/v1/patients/{p}/screenings/{s}", None, "screening.read", "screening"),
    ("screenings.read_image", "GET", "/api/v1/patients/{p}/screenings/{s}/image", None, "screening.image.read",
     "screening"),
    ("screenings.regrade", "POST", "/api/v1/patients/{p}/screenings/{s}/grade", None, "screening.grade", "screening"),
    ("exams.create_exam", "POST", "/api/v1/patients/{p}/exams", "exam", "exam.create", "exam"),
    ("exams.list_exams", "GET", "/api/v1/patients/{p}/exams", None, "exam.list", "patient"),
    ("exams.read_exam", "GET", "/api/v1/patients/{p}/exams/{e}", None, "exam.read", "exam"),
    ("exams.add_image", "POST", "/api/v1/patients/{p}/exams/{e}/images", "exam_upload", "screening.create",
     "screening"),
    ("exams.read_report", "GET", "/api/v1/patients/{p}/exams/{e}/report", None, "exam.report.read", "exam"),
    ("exams.read_fhir", "GET", "/api/v1/patients/{p}/exams/{e}/fhir", None, "exam.fhir.read", "exam"),
    ("screenings.read_explanation", "GET", "/api/v1/patients/{p}/screenings/{s}/explanation", None,
     "screening.explanation.read", "screening"),
    ("patients.delete_patient", "DELETE", "/api/v1/patients/{p}", None, "patient.delete", "patient"),
]


def send(stack, headers, method, template, body, p, s, n, e=None):
    path = template.format(p=p, s=s, e=e)
    if body == "patient":
        return call(stack, method, path, headers, json=phi_patient(f"audit-{n}"))
    if body == "patch":
        return call(stack, method, path, headers, json={"sex": "other"})
    if body == "upload":
        return upload(stack, headers, p, jpeg(seed=20 + n))
    if body == "exam":
        return call(stack, method, path, headers, json={"accession_number": f"{PHI_MRN}acc-{n}"})
    if body == "exam_upload":
        return call(stack, method, path, headers, files={"image": ("eye.jpg", jpeg(seed=20 + n), "image/jpeg")},
                    data={"eye": "left", "field": "disc"})
    return call(stack, method, path, headers)


def expected_ids(endpoint, outcome, template, p, sid, response, eid=None) -> tuple:
    """(patient_id, resource_id) the audit row must carry."""
    if endpoint == "patients.create_patient":
        new = response.json()["id"] if outcome == "success" else None
        return new, new
    if endpoint in ("screenings.create_screening", "exams.create_exam", "exams.add_image"):
        return p, response.json()["id"] if outcome == "success" else None
    return p, sid if "{s}" in template else eid if "{e}" in template else p


def test_every_read_and_write_of_patient_data_is_audited(stack, keys, url_map):
    """Each patient-data endpoint, called with success, by a role that may not (403), and for
    an unknown patient (404), leaves audit rows carrying the request's X-Request-ID, the action,
    the outcome, the ids and the key's prefix. A listing leaves one row per patient shown.
    The table must name every patient-data route of the URL map; the others (models, audit,
    probes, docs) hold no patient data."""
    patient_data = {e for e, _, _ in url_map if e.startswith(("patients.", "screenings.", "exams."))}
    assert {row[0] for row in AUDITED} == patient_data
    clinician, auditor = keys["clinician"], keys["auditor"]
    pid = new_patient(stack, clinician, "audited")
    first = upload(stack, clinician, pid, jpeg(seed=19)).json()
    sid, eid = first["id"], first["exam_id"]
    nobody = str(uuid.uuid4())
    statuses = {"success": (200, 201, 204, 302), "denied": (403,), "not_found": (404,)}
    for n, (endpoint, method, template, body, action, resource) in enumerate(AUDITED):
        for headers, p, outcome in ((clinician, pid, "success"), (auditor, pid, "denied"),
                                    (clinician, nobody, "not_found")):
            if outcome == "not_found" and "{p}" not in template:
                continue  # no patient in the URL to miss
            response = send(stack, headers, method, template, body, p, sid, 3 * n + len(outcome), eid)
            assert response.status_code in statuses[outcome], (endpoint, outcome, response.text)
            events = audit_events(stack, response.headers["X-Request-ID"])
            prefix = headers["Authorization"].split("_")[1]
            assert events and all(e[:3] + e[5:] == (action, outcome, resource, prefix) for e in events), \
                (endpoint, outcome, events)
            if endpoint == "patients.list_patients" and outcome == "success":
                shown = [item["id"] for item in response.json()["items"]]
                assert [(e[3], e[4]) for e in events] == [(i, i) for i in shown]
            elif endpoint != "patients.list_patients":
                patient_id, resource_id = expected_ids(endpoint, outcome, template, p, sid, response, eid)
                assert [(e[4], e[3]) for e in events] == [(patient_id, resource_id)], (endpoint, outcome, events)


def test_torchserve_management_is_not_reachable_through_the_api(stack, keys, url_map):
    """The API proxies nothing to TorchServe: /api/v1/models only reads, nothing else with
    'models', 'predictions' or 'explanations' exists (a photograph's Grad-CAM `explanation`
    is a read of one screening, not a pass-through; /api/v1/models/shadow stores the admin's
    shadow setting in the database and reads a version's description, it never writes to
    TorchServe), and writes on /api/v1/models are 405. Registering a
    model from a remote or local file URL is refused by TorchServe (allowed_urls) and
    scripts.serving.registry says so on one line with exit status 1; nothing gets registered."""
    for endpoint, method, path in url_map:
        if "models" in path or "prediction" in path or "explanation" in path:
            assert (endpoint, method) in {("models.list_models", "GET"), ("screenings.read_explanation", "GET"),
                                          ("shadow.read_shadow", "GET"), ("shadow.start_shadow", "PUT"),
                                          ("shadow.stop_shadow", "DELETE"), ("shadow.shadow_report", "GET"),
                                          ("shadow.read_shadow_grading", "GET")}, (endpoint, method, path)
    admin = keys["admin"]
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        response = call(stack, method, "/api/v1/models?url=http://127.0.0.1:1/evil.mar", admin)
        assert response.status_code == 405 and response.json()["error"]["code"] == "method_not_allowed"
    for method, path in (("GET", "/api/v1/models/dr"), ("PUT", "/api/v1/models/dr/1.0/set-default"),
                         ("POST", "/api/v1/models/dr/1.0/workers"), ("POST", "/predictions/dr"),
                         ("POST", "/api/v1/predictions/dr"), ("GET", "/api/v1/models/dr/all")):
        assert call(stack, method, path, admin).status_code == 404, path

    ts = stack.torchserve
    before = requests.get(f"{ts.management_url}/models/dr/all", timeout=10, headers=ts.auth("management")).json()
    for url in ("http://127.0.0.1:1/evil.mar", "https://example.com/dr_9.mar", "file:///etc/passwd"):
        for names in (["--name", "dr", "--version", "9.9"], []):
            result = models_cli(ts, "register", url, *names)
            assert result.returncode == 1 and "Traceback" not in result.stderr, result
            # Progress lines ("registering dr 9.9") may come first; the failure is one line, the last.
            message = [line for line in result.stderr.strip().splitlines() if not line.startswith("registering ")]
            assert len(message) == 1 and message[0].startswith("error: "), result.stderr
            # Named, TorchServe refuses the URL; unnamed, the tool may stop first as it cannot name it.
            assert "does not match any allowed URL" in message[0] or (
                not names and "pass --name and --version" in message[0]), message
    assert requests.get(f"{ts.management_url}/models/dr/all", timeout=10,
                        headers=ts.auth("management")).json() == before


def models_cli(ts, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scripts.serving.registry", "--management", ts.management_url,
                           "--key-file", str(ts.key_file), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})


def test_images_are_encrypted_at_rest_and_keys_carry_no_patient_data(stack, keys, data):
    """Every object in the bucket is screenings/<screening uuid>, SSE-S3 (AES256); no key holds a
    patient id or a PHI marker, and neither does the presigned download link."""
    s3 = stack.s3.client()
    keys_in_bucket = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=stack.bucket)
                      for o in page.get("Contents", [])]
    ours = {row[0] for row in stack.sql("SELECT image_key FROM screening")}
    patients = {row[0] for row in stack.sql("SELECT id::text FROM patient")}
    assert ours and ours <= set(keys_in_bucket)
    for key in keys_in_bucket:
        assert UUID_KEY.match(key), key
        assert not PHI_PATTERN.search(key) and not any(p in key for p in patients), key
    for key in ours:
        assert s3.head_object(Bucket=stack.bucket, Key=key)["ServerSideEncryption"] == "AES256", key
    link = call(stack, "GET", f"/api/v1/patients/{data['a']}/screenings/{data['screening']}/image",
                keys["clinician"])
    assert link.status_code == 302
    location = link.headers["Location"]
    assert data["a"] not in location and not PHI_PATTERN.search(location)
    assert "X-Amz-Expires=300" in location


SECURITY_HEADERS = {"X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer"}


def assert_security_headers(response, api=True):
    for name, value in SECURITY_HEADERS.items():
        assert response.headers.get(name) == value, (response.request.url, name, response.headers)
    assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"]
    assert response.headers["X-Request-ID"]
    if api:
        assert response.headers["Content-Security-Policy"].startswith("default-src 'none'")
        assert response.headers["Cache-Control"] == "no-store"


def test_security_headers_on_every_kind_of_answer(stack, keys, data):
    clinician = keys["clinician"]
    base = f"/api/v1/patients/{data['a']}"
    answers = [
        call(stack, "GET", base, clinician),                                       # 200
        call(stack, "POST", "/api/v1/patients", clinician, json={"name": "H"}),    # 201
        call(stack, "GET", f"{base}/screenings/{data['screening']}/image", clinician),  # 302
        call(stack, "GET", f"{base}/screenings", clinician, params={"cursor": "!"}),    # 400
        call(stack, "GET", base),                                                  # 401
        call(stack, "GET", base, keys["auditor"]),                                 # 403
        call(stack, "GET", "/nowhere"),                                            # 404
        call(stack, "PUT", "/api/v1/patients", clinician),                         # 405
        call(stack, "POST", "/api/v1/patients", clinician, json={}),               # 422
        upload(stack, clinician, data["a"], b"%PDF-1.4"),                         # 415
        call(stack, "GET", "/healthz"), call(stack, "GET", "/readyz"), call(stack, "GET", "/metrics"),
    ]
    assert sorted({r.status_code for r in answers}) == [200, 201, 302, 400, 401, 403, 404, 405, 415, 422]
    for response in answers:
        assert_security_headers(response)
    for path in ("/api/v1/docs", "/api/v1/openapi.json"):
        docs = call(stack, "GET", path)
        assert docs.status_code == 200
        assert_security_headers(docs, api=path.endswith(".json"))  # the Swagger UI page has its own CSP


def test_uploads_are_rate_limited_per_key(stack, make_stack):
    """A second gunicorn on the same database and storage with UPLOAD_RATE_LIMIT=3/minute and one
    worker (the memory:// counter is per worker): a key's 4th upload is a 429 rate_limited with
    Retry-After and stores nothing, while another key still uploads and the limited key can
    still read. The refusal is audited as rejected."""
    limited = make_stack(name="ratelimit", database=stack.database, workers=1,
                         api_env={"UPLOAD_RATE_LIMIT": "3/minute", "LOG_LEVEL": "DEBUG"})
    first, second = limited.key("clinician"), limited.key("clinician")
    pid = new_patient(limited, first, "ratelimit")
    for n in range(3):
        assert upload(limited, first, pid, jpeg(seed=30 + n)).status_code == 201
    rows = stack.sql("SELECT count(*) FROM screening")
    refused = upload(limited, first, pid, jpeg(seed=33))
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"]["code"] == "rate_limited" and int(refused.headers["Retry-After"]) > 0
    assert_security_headers(refused)
    assert stack.sql("SELECT count(*) FROM screening") == rows
    assert [e[:2] for e in audit_events(stack, refused.headers["X-Request-ID"])] == [("screening.create", "rejected")]
    assert upload(limited, second, pid, jpeg(seed=34)).status_code == 201
    assert call(limited, "GET", f"/api/v1/patients/{pid}", first).status_code == 200


def raw_request(stack, data: bytes) -> bytes:
    import socket

    with socket.create_connection(("127.0.0.1", stack.api.port), timeout=10) as sock:
        sock.sendall(data)
        return sock.recv(4096)


def test_logs_carry_no_phi(stack, keys, data):
    """After everything above (patients with PHI markers created, read, listed, updated and
    deleted, uploads, errors, a duplicate record number, PHI-looking input in a query string
    and in unknown URLs), no log line of gunicorn (the app's stdout/stderr included, at DEBUG),
    TorchServe or SeaweedFS carries a name, birth date or record number marker. The logs are
    not empty: they name the patients by UUID."""
    clinician = keys["clinician"]
    assert call(stack, "POST", "/api/v1/patients", clinician, json=phi_patient("sec-a")).status_code == 409
    call(stack, "GET", "/api/v1/patients", clinician, params={"name": "Quenby Phimarker"})
    call(stack, "GET", f"/api/v1/patients/{phi_patient('x')['medical_record_number']}", clinician)
    call(stack, "GET", "/api/v1/patients/Quenby-Phimarker/screenings", clinician)
    call(stack, "POST", "/api/v1/patients", clinician, json={**phi_patient("bad"), "birth_date": "1937-07-19x"})
    raw_request(stack, b"GET /api/v1/patients/Quenby Phimarker HTTP/1.1\r\nHost: x\r\n\r\n")  # not even HTTP
    stack.cli("grade-pending")
    logs = stack.log_files()
    gunicorn_log = stack.api.log_path.read_text()
    assert data["a"] in gunicorn_log and '"level": "DEBUG"' in gunicorn_log
    assert len(logs) >= 3
    leaks = phi_in(logs)
    assert not leaks, "\n".join(leaks[:20])
