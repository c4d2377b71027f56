"""The test harness for tests through real processes: a whole private stack (gunicorn, TorchServe,
SeaweedFS S3, a scratch PostgreSQL database), fake PHI with distinctive markers, and a TCP proxy
that cuts the API off from PostgreSQL on demand. The `make_stack` fixture (tests/plugins/stack.py)
starts stacks per test module.

What is stored is checked with the load test's own audit (bench.loadtest.consistency), so the
fault tests and `python -m bench.loadtest` mean the same by "nothing lost".
"""
from __future__ import annotations

import io
import re
import select
import socket
import struct
import threading
import uuid
from pathlib import Path

import requests

from bench.loadtest import MODEL_VERSION, StackClient, consistency, problems, stored_rows
from scripts.serving.processes import Gunicorn, PostgresDatabase, SeaweedS3, TorchServe, free_port

__all__ = ["PrivateStack", "problems", "TcpProxy", "phi_patient", "phi_in", "jpeg", "upload", "new_patient"]


class PrivateStack(StackClient):
    """The API under gunicorn with everything behind it, on loopback.

    Services passed in are used as they are and left running at stop(); the others are started
    here and stopped at stop(). `api_env` overrides the API's environment (e.g. a DATABASE_URL
    through a fault-injecting proxy): `self.env` is what gunicorn and the CLI get, while
    `self.database_url` always reaches PostgreSQL directly, for checks. Each stack stores its
    images in a bucket of its own (`self.bucket`), so on the session's shared S3 server it sees
    only its own objects.
    """

    def __init__(self, workdir: Path, model_store: Path, *, torchserve: TorchServe | None = None,
                 s3: SeaweedS3 | None = None, database: PostgresDatabase | None = None,
                 api_env: dict | None = None, workers: int = 2, torch_threads: int = 1):
        self.workdir = Path(workdir)
        self.model_store = Path(model_store)
        self.torchserve, self.s3, self.database = torchserve, s3, database
        self.owned: list = []
        self.api_env = dict(api_env or {})
        self.workers = workers
        self.torch_threads = torch_threads
        self.api: Gunicorn | None = None
        self.env: dict = {}
        self.bucket = f"clarity-stack-{uuid.uuid4().hex[:12]}"

    @property
    def database_url(self) -> str:
        return self.database.url

    def start(self) -> "PrivateStack":
        try:
            if self.database is None:
                self.database = PostgresDatabase(prefix="clarity_stack").create()
                self.owned.append(self.database)
            if self.s3 is None:
                self.s3 = SeaweedS3(self.workdir / "seaweedfs")
                self.owned.append(self.s3)
                self.s3.start(timeout=60)
            self.s3.create_bucket(self.bucket)
            if self.torchserve is None:
                self.torchserve = TorchServe(self.workdir / "torchserve", self.model_store,
                                             models=f"dr=dr_{MODEL_VERSION}.mar",
                                             env={"DR_TORCH_THREADS": str(self.torch_threads)})
                self.owned.append(self.torchserve)
                self.torchserve.start(timeout=120)
                self.torchserve.wait_model_ready("dr", MODEL_VERSION, timeout=120)
            self.env = {
                "DATABASE_URL": self.database.url, **self.s3.settings_env(self.bucket), **self.torchserve.settings_env(),
                "LOG_LEVEL": "INFO", "UPLOAD_RATE_LIMIT": "100000/minute", **self.api_env,
            }
            result = self.cli("migrate")
            if result.returncode != 0:
                raise RuntimeError(f"flask migrate failed: {result.stderr}")
            self.api = Gunicorn(self.workdir / "gunicorn", self.env, workers=self.workers)
            self.api.start(timeout=60)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.api is not None:
            self.api.stop()
        for service in reversed(self.owned):
            if isinstance(service, PostgresDatabase):
                service.drop()
            else:
                service.stop()
        self.owned.clear()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def log_files(self) -> list[Path]:
        """Every log these processes wrote: gunicorn (the app's stdout and stderr too),
        TorchServe's frontend, model and access logs, SeaweedFS."""
        paths = [self.api.log_path] if self.api else []
        if self.torchserve is not None:
            paths += [self.torchserve.log_path, *sorted(self.torchserve.log_dir.glob("*"))]
        if self.s3 is not None:
            paths.append(self.s3.log_path)
        return [p for p in paths if p.is_file()]

    # ---------------------------------------------------------------- what is stored

    def sql(self, statement: str, params=()) -> list[tuple]:
        """The rows of one statement (none for a write, which is committed), run on PostgreSQL directly."""
        return self.database.sql(statement, params)

    def rows(self) -> dict[str, dict]:
        """screening id -> {image_key, sha256, status, gradings}, read from PostgreSQL directly."""
        return stored_rows(self.database)

    def object_keys(self) -> set[str]:
        return self.s3.object_keys("screenings/", bucket=self.bucket)

    def consistency(self, expected: dict[str, str] | None = None) -> dict:
        """What is wrong with what is stored: bench.loadtest.consistency (every list empty means consistent)."""
        return consistency(self.rows(), self.object_keys(), expected)



# Distinctive fake PHI: these strings must never show up in a log, an object key or a URL.
PHI_NAME = "Quenby Phimarker"
PHI_BIRTH_DATE = "1937-07-19"
PHI_MRN = "MRN-PHIMARK-"
PHI_PATTERN = re.compile(r"phimark|quenby|1937-07-19", re.IGNORECASE)

def phi_patient(n: int | str, **fields) -> dict:
    return {"name": f"{PHI_NAME} {n}", "birth_date": PHI_BIRTH_DATE, "medical_record_number": f"{PHI_MRN}{n}",
            "sex": "female", **fields}


def phi_in(paths: list[Path]) -> list[str]:
    """'file: line' for every log line that carries a PHI marker."""
    leaks = []
    for path in paths:
        for line in path.read_text(errors="replace").splitlines():
            if PHI_PATTERN.search(line):
                leaks.append(f"{path.name}: {line[:300]}")
    return leaks


def jpeg(seed: int = 0, size=(640, 480)) -> bytes:
    """A fundus-like JPEG that passes the quality gate (distinct bytes per seed)."""
    from tests.support.images import encode, fundus_like

    return encode(fundus_like(size, seed=seed))


def upload(stack: PrivateStack, headers: dict, patient_id: str, data: bytes, *, eye: str = "left",
           idempotency_key: str | None = None, filename: str = "eye.jpg", content_type: str = "image/jpeg",
           timeout: float = 120, **fields) -> requests.Response:
    extra = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
    return requests.post(f"{stack.url}/api/v1/patients/{patient_id}/screenings", headers={**headers, **extra},
                         files={"image": (filename, io.BytesIO(data), content_type)},
                         data={"eye": eye, **fields}, timeout=timeout)


def new_patient(stack: PrivateStack, headers: dict, n) -> str:
    response = requests.post(f"{stack.url}/api/v1/patients", headers=headers, json=phi_patient(n), timeout=30)
    assert response.status_code == 201, response.text
    return response.json()["id"]


class TcpProxy:
    """A TCP forwarder on a loopback port to `target`, which tests can cut.

    - `down()`: stop listening and reset every open connection (RST), so the server is
      unreachable: connects are refused and pooled connections are dead.
    - `up()`: listen again on the same port.
    - `cut_when(pattern)`: reset the next connection whose client sends bytes containing
      `pattern` (e.g. b'INSERT INTO "screening"'), before they reach the server: the database
      dies exactly at that statement.
    - `truncate = n`: reset each connection once the server has sent n bytes on it (a body
      cut off mid-way); `None` again to stop.
    - `blackholed = True`: bytes are swallowed in both directions and nothing is answered or
      reset, as when a network drops packets; new connections are accepted and hang too.
    """

    def __init__(self, target: tuple[str, int] = ("127.0.0.1", 5432)):
        self.target = target
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._lock = threading.Lock()
        self._trigger: bytes | None = None
        self.cuts = 0
        self.truncate: int | None = None  # reset a connection once the server sent this many bytes
        self.blackholed = False  # swallow everything both ways, answer nothing, reset nothing

    def up(self) -> "TcpProxy":
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    def down(self) -> None:
        if self._listener is not None:
            try:
                # close() alone leaves a socket that a thread is accept()ing on still listening.
                self._listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._listener.close()
            self._listener = None
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            self._reset(*pair)

    def url_through(self, url: str) -> str:
        """`url` (which names the target as 127.0.0.1:PORT) with this proxy's port instead."""
        host, port = self.target
        proxied = url.replace(f"{host}:{port}", f"127.0.0.1:{self.port}")
        assert proxied != url, f"{url} does not name {host}:{port}"
        return proxied

    def cut_when(self, pattern: bytes) -> None:
        self._trigger = pattern

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # closed by down()
                return
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                self._reset(client)
                continue
            server.settimeout(None)
            with self._lock:
                self._pairs.append((client, server))
            threading.Thread(target=self._pump, args=(client, server), daemon=True).start()

    def _pump(self, client: socket.socket, server: socket.socket) -> None:
        tail = b""
        sent = 0
        sockets = [client, server]
        try:
            while True:
                readable, _, _ = select.select(sockets, [], [], 1.0)
                for sock in readable:
                    data = sock.recv(65536)
                    if not data:
                        raise ConnectionError
                    if self.blackholed:
                        continue
                    if sock is client:
                        trigger = self._trigger
                        if trigger and trigger in tail + data:
                            self._trigger = None
                            self.cuts += 1
                            raise ConnectionError
                        tail = (tail + data)[-256:]
                        server.sendall(data)
                    else:
                        if self.truncate is not None:
                            sent += len(data)
                            if sent > self.truncate:
                                client.sendall(data[:max(0, len(data) - (sent - self.truncate))])
                                raise ConnectionError
                        client.sendall(data)
        except (OSError, ValueError, ConnectionError):
            self._reset(client, server)
            with self._lock:
                if (client, server) in self._pairs:
                    self._pairs.remove((client, server))

    @staticmethod
    def _reset(*socks: socket.socket) -> None:
        for sock in socks:
            try:
                # Linger 0: close() sends RST, as a crashed server or a dropped network path would.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()
            except OSError:
                pass
