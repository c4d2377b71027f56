"""The TorchServe client: how each answer maps to a result or an exception.

These tests talk to a throwaway http.server stub; tests/integration/test_api_torchserve_live.py to a
real TorchServe serving the tiny test model (tests/plugins/model.py)."""
import json
from concurrent.futures import ThreadPoolExecutor
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from control_api import torchserve
from control_api.torchserve import ImageRejected, TorchServeClient, TorchServeUnavailable, UnknownModelVersion
from scripts.ml.card import SYNTHETIC_DISCLAIMER
from scripts.serving.processes import free_port

PREDICTION = {"grade": 0, "label": "No DR", "probabilities": [0.9, 0.025, 0.025, 0.025, 0.025], "referable": False,
              "referable_threshold": 2, "gradable": True, "quality": {"gradable": True, "score": 0.9, "reasons": []},
              "model": {"name": "dr", "version": "1.0", "synthetic_training_data": True},
              "disclaimer": SYNTHETIC_DISCLAIMER,
              "timings_ms": {"decode": 1, "preprocess": 1, "inference": 1}}


class Stub:
    """Answers (status, body, delay) set by the test; records requests and client ports.
    HTTP/1.1 with keep-alive, like TorchServe."""

    def __init__(self):
        self.answer = (200, PREDICTION, 0)
        self.requests = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _answer(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                stub.requests.append({"path": self.path, "body": body, "type": self.headers.get("Content-Type"),
                                      "peer": self.client_address[1]})
                status, payload, delay = stub.answer
                time.sleep(delay)
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _answer

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()


@pytest.fixture
def stub():
    server = Stub()
    yield server
    server.server.shutdown()
    server.server.server_close()


def client_for(url, timeout=5.0):
    return TorchServeClient(url, url, "dr", timeout)


def test_prediction_is_returned_as_sent(stub):
    client = client_for(stub.url)
    assert client.predict(b"jpeg bytes", "image/jpeg") == PREDICTION
    assert stub.requests[-1] == {"path": "/predictions/dr", "body": b"jpeg bytes", "type": "image/jpeg",
                                 "peer": stub.requests[-1]["peer"]}
    client.predict(b"x", "image/png", version="2.0")
    assert stub.requests[-1]["path"] == "/predictions/dr/2.0"


def test_connections_are_reused(stub):
    client = client_for(stub.url)
    for _ in range(3):
        client.predict(b"x", "image/jpeg")
    assert len({r["peer"] for r in stub.requests}) == 1


@pytest.mark.parametrize("status, body, code", [
    (422, {"code": "truncated_image", "message": "The image data ends early."}, "truncated_image"),
    (415, {"code": "not_an_image", "message": "Not an image."}, "not_an_image"),
    (413, b"", "rejected_by_model_server"),  # TorchServe's own max_request_size answer is bare
])
def test_per_request_4xx_is_image_rejected(stub, status, body, code):
    stub.answer = (status, body, 0)
    with pytest.raises(ImageRejected) as info:
        client_for(stub.url).predict(b"x", "image/jpeg")
    assert info.value.status == status and info.value.code == code and info.value.message


@pytest.mark.parametrize("kind", ["ModelVersionNotFoundException", "ModelNotFoundException"])
def test_unknown_version_is_its_own_error(stub, kind):
    stub.answer = (404, {"code": 404, "type": kind, "message": "Model version: 9 does not exist for model: dr"}, 0)
    with pytest.raises(UnknownModelVersion):
        client_for(stub.url).predict(b"x", "image/jpeg", version="9")


def test_a_per_request_handler_failure_is_a_rejection(stub):
    """Our handler's per-request 500 (the rest of its batch was answered): the image, not the
    server; kept pending it stopped grade-pending at it for ever (issue 15, finding 4)."""
    stub.answer = (500, {"code": "preprocess_failed", "message": "boom"}, 0)
    with pytest.raises(ImageRejected) as caught:
        client_for(stub.url).predict(b"x", "image/jpeg")
    assert (caught.value.status, caught.value.code) == (500, "preprocess_failed")


@pytest.mark.parametrize("status, body", [(503, {"code": 503, "type": "ServiceUnavailableException"}),
                                          (500, {"code": 500, "type": "InternalServerException"}),
                                          (200, b"<html>not json</html>"), (507, b"")])
def test_server_trouble_is_unavailable(stub, status, body):
    stub.answer = (status, body, 0)
    with pytest.raises(TorchServeUnavailable):
        client_for(stub.url).predict(b"x", "image/jpeg")


def test_timeout_is_unavailable_and_not_retried(stub):
    stub.answer = (200, PREDICTION, 1.0)
    with pytest.raises(TorchServeUnavailable, match="did not answer"):
        client_for(stub.url, timeout=0.2).predict(b"x", "image/jpeg")
    assert len(stub.requests) == 1


def test_refused_connection_is_retried_then_unavailable():
    with pytest.raises(TorchServeUnavailable, match="unreachable"):
        client_for(f"http://127.0.0.1:{free_port()}").predict(b"x", "image/jpeg")


def test_models_and_readiness(stub):
    described = [{"modelName": "dr", "modelVersion": "1.0", "batchSize": 8, "maxBatchDelay": 100,
                  "workers": [{"id": "9000", "status": "READY"}]}]
    stub.answer = (200, described, 0)
    client = client_for(stub.url)
    assert client.ready() is True
    (version,) = client.models()
    assert (version.version, version.default, version.ready_workers, version.batch_size) == ("1.0", True, 1, 8)
    stub.answer = (200, [{**described[0], "workers": [{"id": "9000", "status": "UNLOADING"}]}], 0)
    assert client.ready() is False
    stub.answer = (404, {"code": 404, "type": "ModelNotFoundException"}, 0)
    with pytest.raises(UnknownModelVersion):
        client.models()


def _bounded(url, in_flight=1, timeout=5.0):
    return TorchServeClient(url, url, "dr", timeout, max_in_flight=in_flight)


def test_at_the_bound_an_answering_torchserve_is_waited_for(stub):
    """A busy but answering TorchServe frees a slot within one inference: the extra prediction
    waits for it instead of being turned away (which answered uploads 202 pending)."""
    client = _bounded(stub.url)
    client.predict(b"x", "image/jpeg")  # TorchServe has answered just now
    stub.answer = (200, PREDICTION, 0.3)
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(client.predict, b"a", "image/jpeg")
        time.sleep(0.1)  # the first holds the only slot
        second = pool.submit(client.predict, b"b", "image/jpeg")
        assert first.result() == PREDICTION and second.result() == PREDICTION
    assert len(stub.requests) == 3


def test_at_the_bound_a_burst_after_an_idle_spell_waits_too(stub):
    """No answer yet, but the prediction in flight was sent just now: TorchServe is busy, not
    hung, so the extra prediction waits for the slot (a clinic's first burst of the morning)."""
    stub.answer = (200, PREDICTION, 0.3)
    client = _bounded(stub.url)
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(client.predict, b"a", "image/jpeg")
        time.sleep(0.1)
        assert client.predict(b"b", "image/jpeg") == PREDICTION
        assert first.result() == PREDICTION


def test_at_the_bound_a_silent_torchserve_turns_the_extra_prediction_away_at_once(stub):
    """The prediction in flight has had no answer for longer than the window: TorchServe looks
    hung, so the extra prediction is unavailable at once (no wait), and a thread stays free
    for health checks."""
    stub.answer = (200, PREDICTION, 2.5)
    client = _bounded(stub.url)
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(client.predict, b"a", "image/jpeg")
        time.sleep(torchserve.ANSWERING_WINDOW_SECONDS + 0.2)
        started = time.monotonic()
        with pytest.raises(TorchServeUnavailable, match="as many predictions"):
            client.predict(b"b", "image/jpeg")
        assert time.monotonic() - started < torchserve.ADMISSION_WAIT_SECONDS / 2  # it did not wait
        first.result()
