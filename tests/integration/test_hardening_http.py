"""Findings 1, 2, 3, 11, 12 of issue 15 and gunicorn's own error answers, through real gunicorn
(and nginx with the shipped deploy/nginx/clarity.conf), PostgreSQL, SeaweedFS, TorchServe and
Redis (127.0.0.1:6379, a key prefix of this module's own).

- a long name is refused in milliseconds, and /healthz answers while such requests arrive;
- a keep-alive client never has a request dropped after an early answer (401, 403, 413, 415,
  422, 429), directly and through nginx;
- JSON bodies are limited to 64 KiB, chunked ones too;
- Swagger UI comes from the pinned local copy under a CSP that allows only this origin;
- rate limits hold across workers (Redis), re-grades and deletions are limited, and with Redis
  unreachable each worker counts on its own instead of failing.
"""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import socket
import subprocess
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import urllib3

from scripts.serving.processes import REPO, Process, free_port
from tests.support.harness import jpeg, new_patient

pytestmark = pytest.mark.integration

PREFIX = f"clarity-test-{uuid.uuid4().hex[:8]}"
MAX_UPLOAD = 1_000_000
BIG = 300 * 1024  # far past the 64 KiB gunicorn drains by itself after an early answer


def _redis_up() -> None:
    try:
        socket.create_connection(("127.0.0.1", 6379), timeout=2).close()
    except OSError as exc:
        pytest.fail(f"Redis is required at 127.0.0.1:6379: {exc}", pytrace=False)


@pytest.fixture(scope="module")
def stack(make_stack):
    _redis_up()
    return make_stack(name="hardening-http", workers=3, api_env={
        "MAX_UPLOAD_BYTES": str(MAX_UPLOAD), "UPLOAD_RATE_LIMIT": "5/minute", "REGRADE_RATE_LIMIT": "2/minute",
        "DELETE_RATE_LIMIT": "2/minute", "RATE_LIMIT_STORAGE_URI": "redis://127.0.0.1:6379/0",
        "RATE_LIMIT_PREFIX": PREFIX})


@pytest.fixture(scope="module")
def clinician(stack):
    return stack.key("clinician")


@pytest.fixture(scope="module")
def patient(stack, clinician):
    return new_patient(stack, clinician, "hardening-http")


def multipart(size: int) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"eye\"\r\n\r\nleft\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"e.jpg\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + b"\xff" * size + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


# ------------------------------------------------------------------ finding 1: regex


def test_long_names_are_refused_at_once_and_liveness_answers(stack, clinician):
    """Six concurrent names of 60,000 characters that end in a control character: the earlier
    pattern backtracked over each for over a minute, holding every thread of a worker. Each
    answer and /healthz must come within the ECS health check's 5 s."""
    name = "a" * 60_000 + "\x01"
    with ThreadPoolExecutor(7) as pool:
        posts = [pool.submit(requests.post, f"{stack.url}/api/v1/patients", headers=clinician,
                             json={"name": name}, timeout=5) for _ in range(6)]
        time.sleep(0.3)
        health = pool.submit(requests.get, f"{stack.url}/healthz", timeout=5)
        assert health.result().status_code == 200
        for post in posts:
            answer = post.result()
            assert answer.status_code == 422, answer.text
            assert answer.json()["error"]["details"]["json"]["name"] == ["Length must be between 1 and 200."]
    # A 250 KB name is past the JSON body limit (finding 3): refused before it is parsed.
    answer = requests.post(f"{stack.url}/api/v1/patients", headers=clinician, json={"name": "a" * 250_000},
                           timeout=5)
    assert answer.status_code == 413 and answer.json()["error"]["code"] == "payload_too_large"


# ------------------------------------------------------------------ finding 2: keep-alive


def early_answers(base: str, patient: str, keys: dict) -> list[tuple[int | tuple, dict]]:
    """(expected status, requests kwargs) for each way the API answers before reading the body."""
    upload = f"{base}/api/v1/patients/{patient}/screenings"
    body, ctype = multipart(BIG)
    oversize, octype = multipart(MAX_UPLOAD + 200_000)
    return [
        (401, dict(method="POST", url=upload, data=body, headers={"Content-Type": ctype})),
        (403, dict(method="POST", url=upload, data=body, headers={"Content-Type": ctype, **keys["auditor"]})),
        (413, dict(method="POST", url=upload, data=oversize, headers={"Content-Type": octype, **keys["clinician"]})),
        (413, dict(method="POST", url=f"{base}/api/v1/patients", data=b"[" + b"{}," * (BIG // 3) + b"{}]",
                   headers={"Content-Type": "application/json", **keys["clinician"]})),
        ((413, 415), dict(method="POST", url=f"{base}/api/v1/patients", data=b"x" * BIG,
                          headers={"Content-Type": "text/plain", **keys["clinician"]})),
        (422, dict(method="POST", url=upload, data=jpeg(1, size=(1200, 900)) + b"\0" * BIG,
                   headers={"Content-Type": "image/jpeg", **keys["clinician"]})),
        (429, dict(method="POST", url=upload, data=body, headers={"Content-Type": ctype, **keys["limited"]})),
    ]


def probe(session: requests.Session, cases, follow_up: str, rounds: int, **kwargs) -> tuple[int, int, list]:
    """Each early answer, then a GET on the same connection; (dropped, total, statuses)."""
    dropped = total = 0
    statuses = []
    for _ in range(rounds):
        for expected, request in cases:
            for call in (lambda: session.request(timeout=30, **request, **kwargs),
                         lambda: session.get(follow_up, timeout=30, **kwargs)):
                total += 1
                try:
                    response = call()
                except requests.ConnectionError:
                    dropped += 1
                    continue
                statuses.append(response.status_code)
    return dropped, total, statuses


@pytest.fixture(scope="module")
def keys(stack, patient):
    keys = {"clinician": stack.key("clinician"), "auditor": stack.key("auditor"), "limited": stack.key("clinician")}
    for _ in range(6):  # spend the limited key's 5 uploads a minute
        requests.post(f"{stack.url}/api/v1/patients/{patient}/screenings", headers=keys["limited"], timeout=30)
    return keys


def test_keep_alive_connections_survive_early_answers(stack, patient, keys):
    cases = early_answers(stack.url, patient, keys)
    with requests.Session() as session:
        for expected, request in cases:  # each case answers what it should
            status = session.request(timeout=30, **request).status_code
            assert status in (expected if isinstance(expected, tuple) else (expected,)), (request["url"], status)
            session.close()
        dropped, total, statuses = probe(session, cases, f"{stack.url}/healthz", rounds=3)
    assert dropped == 0, f"{dropped} of {total} requests dropped on a keep-alive connection"
    assert statuses.count(200) == total // 2


class Nginx(Process):
    """nginx with the shipped site config, on loopback ports, in front of `upstream_port`."""

    name = "nginx"

    def __init__(self, workdir: Path, upstream_port: int):
        super().__init__(workdir)
        self.port, self.http_port = free_port(), free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.ready_url = None
        key, cert = self.workdir / "privkey.pem", self.workdir / "fullchain.pem"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                        "/CN=localhost", "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True,
                       timeout=60)
        (self.workdir / "logs").mkdir(exist_ok=True)
        site = (REPO / "deploy" / "nginx" / "clarity.conf").read_text()
        site = (site.replace("/etc/nginx/tls/fullchain.pem", str(cert)).replace("/etc/nginx/tls/privkey.pem", str(key))
                .replace("/var/log/nginx/", f"{self.workdir}/logs/").replace("server 127.0.0.1:8000;",
                                                                             f"server 127.0.0.1:{upstream_port};")
                .replace("listen [::]:80;\n", "").replace("listen [::]:443 ssl http2;\n", "")
                .replace("listen 80;", f"listen 127.0.0.1:{self.http_port};")
                .replace("listen 443 ssl http2;", f"listen 127.0.0.1:{self.port} ssl http2;"))
        (self.workdir / "clarity.conf").write_text(site)
        temp = "".join(f"  {kind}_temp_path {self.workdir}/{kind};\n"
                       for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        (self.workdir / "nginx.conf").write_text(
            f"daemon off;\npid {self.workdir}/nginx.pid;\nerror_log {self.workdir}/logs/error.log;\nevents {{}}\n"
            f"http {{\n{temp}  include {self.workdir}/clarity.conf;\n}}\n")

    def command(self) -> list[str]:
        return [shutil.which("nginx") or "/usr/sbin/nginx", "-c", str(self.workdir / "nginx.conf"),
                "-p", str(self.workdir)]

    def wait_ready(self, timeout: float) -> None:
        self.wait_until(lambda: _answers(f"{self.url}/healthz"), timeout, "nginx")


def _answers(url: str) -> bool:
    try:
        return requests.get(url, verify=False, timeout=2).status_code == 200
    except requests.RequestException:
        return False


@pytest.fixture(scope="module")
def nginx(stack, tmp_path_factory):
    if not (shutil.which("nginx") or Path("/usr/sbin/nginx").exists()):
        pytest.fail("nginx is required (apt-get install nginx-light)", pytrace=False)
    urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
    proxy = Nginx(tmp_path_factory.mktemp("nginx"), stack.api.port)
    proxy.start(timeout=30)
    yield proxy
    proxy.stop()


def test_keep_alive_connections_survive_early_answers_through_nginx(stack, patient, keys, nginx):
    """nginx reads the whole body first (proxy_request_buffering on), so the client's own
    connection is safe; the risk is nginx's pooled upstream connection, which gunicorn closed
    after announcing keep-alive: nginx's next request on it failed as a 502."""
    cases = early_answers(nginx.url, patient, keys)
    with requests.Session() as session:
        dropped, total, statuses = probe(session, cases, f"{nginx.url}/healthz", rounds=2, verify=False)
    assert dropped == 0, f"{dropped} of {total} requests dropped"
    assert 502 not in statuses and statuses.count(200) == total // 2, statuses


# ------------------------------------------------------------------ finding 3: JSON body limits


def test_json_bodies_are_limited_to_64_kib(stack, clinician, patient):
    many = b"[" + b"{}," * 400_000 + b"{}]"  # 1.2 MB that would take ~30 MB once parsed
    for method, url in (("POST", "/api/v1/patients"), ("PATCH", f"/api/v1/patients/{patient}"),
                        ("POST", f"/api/v1/patients/{patient}/screenings/{uuid.uuid4()}/grade")):
        answer = requests.request(method, f"{stack.url}{url}", data=many, timeout=30,
                                  headers={"Content-Type": "application/json", **clinician})
        assert answer.status_code == 413, (url, answer.status_code, answer.text[:200])
        assert answer.json()["error"]["code"] == "payload_too_large"
    # Chunked, without a Content-Length: cut off once 64 KiB have been read.
    chunked = requests.post(f"{stack.url}/api/v1/patients", data=iter([many[i:i + 8192] for i in
                                                                       range(0, len(many), 8192)]),
                            headers={"Content-Type": "application/json", **clinician}, timeout=30)
    assert chunked.status_code == 413, chunked.text[:200]
    # A small body is still read and validated as before.
    ok = requests.post(f"{stack.url}/api/v1/patients", json={"name": "x" * 200}, headers=clinician, timeout=30)
    assert ok.status_code == 201


# ------------------------------------------------------------------ gunicorn's own errors


def raw(stack, request: bytes) -> tuple[int, dict, bytes]:
    with socket.create_connection(("127.0.0.1", stack.api.port), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


def test_gunicorn_own_errors_are_json(stack):
    for request, status in ((b"GET /" + b"a" * 6000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
                            (b"GET /\x01bad HTTP/1.1\r\nHost: x\r\n\r\n", 400),
                            (b"NOT A REQUEST LINE\r\n\r\n", 400)):
        code, headers, body = raw(stack, request)
        assert code == status, body[:200]
        assert headers["Content-Type"] == "application/json"
        error = json.loads(body)["error"]
        assert error["code"] and error["message"] and error["request_id"]


# ------------------------------------------------------------------ finding 11: Swagger UI


def test_swagger_ui_is_served_locally_under_a_strict_csp(stack, tmp_path):
    page = requests.get(f"{stack.url}/api/v1/docs", timeout=10)
    assert page.status_code == 200
    csp = page.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "default-src 'none'" in csp and "unsafe-inline" not in csp
    assert "http" not in page.text.replace("https://", "").split("<body>")[1] and "cdn" not in page.text
    assert "<script>" not in page.text  # no inline script: the CSP would block it
    pinned = dict(reversed(line.split()) for line in
                  (REPO / "control_api/static/swagger-ui/VERSION").read_text().splitlines()[1:])
    for name, sha in pinned.items():
        asset = requests.get(f"{stack.url}/api/v1/docs/{name}", timeout=10)
        assert asset.status_code == 200 and hashlib.sha256(asset.content).hexdigest() == sha
    # A real browser runs it under that policy and renders the document's title.
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("chromium is required (apt-get install chromium)", pytrace=False)
    dom = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path}",
                          "--virtual-time-budget=15000", "--dump-dom", f"{stack.url}/api/v1/docs"],
                         capture_output=True, text=True, timeout=120)
    assert "Clarity in Care API" in dom.stdout and 'class="swagger-ui"' in dom.stdout, dom.stderr[-2000:]


# ------------------------------------------------------------------ finding 12: rate limits


def test_upload_limit_holds_across_workers(stack, patient):
    """Three workers, one Redis count: 5 uploads a minute means 5, however the 15 concurrent
    attempts (each on a new connection) spread over the workers."""
    key = stack.key("clinician")
    url = f"{stack.url}/api/v1/patients/{patient}/screenings"
    with ThreadPoolExecutor(15) as pool:
        statuses = list(pool.map(lambda _: requests.post(url, headers=key, timeout=30).status_code, range(15)))
    assert statuses.count(429) == 10, statuses


def test_regrade_and_delete_are_limited(stack):
    key = stack.key("clinician")
    pid = uuid.uuid4()
    regrades = [requests.post(f"{stack.url}/api/v1/patients/{pid}/screenings/{uuid.uuid4()}/grade",
                              headers=key, timeout=30).status_code for _ in range(3)]
    deletes = [requests.delete(f"{stack.url}/api/v1/patients/{uuid.uuid4()}", headers=key, timeout=30).status_code
               for _ in range(3)]
    assert regrades == [404, 404, 429] and deletes == [404, 404, 429], (regrades, deletes)


def test_with_redis_unreachable_each_worker_counts_alone(stack, make_stack, patient):
    """Fail-open within a bound (control_api/ratelimit.py): uploads go on, and a worker still
    refuses a key past its limit."""
    dead = free_port()
    alone = make_stack(name="redis-down", database=stack.database, workers=1, api_env={
        "UPLOAD_RATE_LIMIT": "3/minute", "RATE_LIMIT_STORAGE_URI": f"redis://127.0.0.1:{dead}/0",
        "RATE_LIMIT_PREFIX": PREFIX})
    key = alone.key("clinician")
    url = f"{alone.url}/api/v1/patients/{patient}/screenings"
    first = requests.post(url, headers=key, timeout=30,
                          files={"image": ("e.jpg", io.BytesIO(jpeg(7)), "image/jpeg")}, data={"eye": "left"})
    assert first.status_code in (201, 202), first.text
    statuses = [requests.post(url, headers=key, timeout=30).status_code for _ in range(4)]
    assert statuses == [422, 422, 429, 429], statuses
