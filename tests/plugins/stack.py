"""A whole private stack per test module (scripts.load.PrivateStack: gunicorn, TorchServe, S3,
a scratch PostgreSQL database), fake PHI with distinctive markers, and a TCP proxy that cuts
the API off from PostgreSQL on demand.

When a module's stacks stop, every log they wrote is searched for the PHI markers: a leak
fails that module's teardown, so each module that uses a stack checks its own logs.
"""
from __future__ import annotations

import io
import re
import select
import socket
import struct
import threading
from pathlib import Path

import pytest
import requests

from scripts.load import PrivateStack, problems
from scripts.services import PostgresDatabase, free_port

# Distinctive fake PHI: these strings must never show up in a log, an object key or a URL.
PHI_NAME = "Quenby Phimarker"
PHI_BIRTH_DATE = "1937-07-19"
PHI_MRN = "MRN-PHIMARK-"
PHI_PATTERN = re.compile(r"phimark|quenby|1937-07-19", re.IGNORECASE)

__all__ = ["PrivateStack", "problems", "TcpProxy", "phi_patient", "phi_in", "jpeg"]


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
    from tests.images import encode, fundus_like

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


@pytest.fixture(scope="module")
def make_stack(request, tmp_path_factory, model_store):
    """make_stack(shared_torchserve=True, shared_s3=True, database=None, api_env=None, workers=2)
    -> a started PrivateStack, stopped when the module ends.

    Shared services are the session's `torchserve` and `s3_server`: a module that kills or
    stops one asks for its own. PostgreSQL is a scratch database on the local server; its
    absence fails (never skips) the module.
    """
    started: list[PrivateStack] = []

    def start(*, shared_torchserve: bool = True, shared_s3: bool = True, database: PostgresDatabase | None = None,
              api_env: dict | None = None, workers: int = 2, name: str = "stack") -> PrivateStack:
        stack = PrivateStack(
            tmp_path_factory.mktemp(name), model_store,
            torchserve=request.getfixturevalue("torchserve") if shared_torchserve else None,
            s3=request.getfixturevalue("s3_server") if shared_s3 else None,
            database=database, api_env=api_env, workers=workers)
        started.append(stack)
        return stack.start()

    yield start
    logs = []
    for stack in started:
        logs += stack.log_files()
        stack.stop()
    leaks = phi_in(logs)
    assert not leaks, "PHI markers in the logs:\n" + "\n".join(leaks[:20])


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
