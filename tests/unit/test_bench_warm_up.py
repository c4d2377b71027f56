"""bench/systems.py warm_up: every TorchServe the benchmark starts gets real photographs before its
first measured cell (its Java frontend's JIT), and one that cannot grade them stops the run."""
import json
import threading
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from bench import systems


@pytest.fixture
def torchserve():
    """A stand-in for TorchServe's inference API that counts what it is sent; `status` sets its answer."""
    seen = {"posts": 0, "bytes": set(), "auth": set()}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            seen["posts"] += 1
            seen["bytes"].add(len(body))
            seen["auth"].add(self.headers.get("Authorization"))
            answer = json.dumps({"gradable": True, "grade": 0}).encode()
            self.send_response(server.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.status = 200
    threading.Thread(target=server.serve_forever, daemon=True).start()
    handle = types.SimpleNamespace(inference_url=f"http://127.0.0.1:{server.server_port}", server=server, seen=seen,
                                   auth=lambda: {"Authorization": "Bearer inference-key"})
    yield handle
    server.shutdown()
    server.server_close()


def test_sends_the_real_photograph_as_many_times_as_asked(torchserve):
    systems.warm_up(torchserve, 24)
    assert torchserve.seen["posts"] == 24
    assert torchserve.seen["bytes"] == {systems.WARM_UP_PHOTO.stat().st_size}
    assert torchserve.seen["auth"] == {"Bearer inference-key"}


def test_the_module_default_is_the_count_when_none_is_given(torchserve, monkeypatch):
    monkeypatch.setattr(systems, "WARM_UP_REQUESTS", 9)
    systems.warm_up(torchserve)
    assert torchserve.seen["posts"] == 9


def test_zero_sends_nothing(torchserve):
    systems.warm_up(torchserve, 0)
    assert torchserve.seen["posts"] == 0


def test_a_torchserve_that_does_not_grade_stops_the_run(torchserve):
    torchserve.server.status = 503
    with pytest.raises(RuntimeError, match="warm-up"):
        systems.warm_up(torchserve, 8)
