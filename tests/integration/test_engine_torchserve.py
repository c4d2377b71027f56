"""An archive with the ONNX engine, served by the real TorchServe beside the eager archive of the
same weights: the same answers, and Grad-CAM still works (it runs on the eager network)."""
from __future__ import annotations

import pytest
import requests

from scripts.ml import archive

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def onnx_model(torchserve, model_store, tiny_checkpoint):
    """`dronnx` 1.0: the tests' tiny checkpoint archived with --engine onnx, registered for this
    module on the shared server and unregistered afterwards."""
    archive.archive(tiny_checkpoint, "1.0", name="dronnx", model_store=model_store, engine="onnx",
                    batch_size=8, max_batch_delay=100, workers=1)
    r = requests.post(f"{torchserve.management_url}/models", timeout=120, headers=torchserve.auth("management"),
                      params={"url": "dronnx_1.0.mar", "initial_workers": 1, "synchronous": "true"})
    assert r.status_code == 200, r.text
    try:
        torchserve.wait_model_ready("dronnx", "1.0", timeout=120)
        yield "dronnx"
    finally:
        requests.delete(f"{torchserve.management_url}/models/dronnx/1.0", timeout=60,
                        headers=torchserve.auth("management"))
        (model_store / "dronnx_1.0.mar").unlink(missing_ok=True)
        (model_store / "dronnx_1.0.md").unlink(missing_ok=True)


def predict(torchserve, name, data, route="predictions"):
    r = requests.post(f"{torchserve.inference_url}/{route}/{name}", data=data, timeout=60,
                      headers={"Content-Type": "image/jpeg", **torchserve.auth()})
    assert r.status_code == 200, r.text
    return r.json()


def test_onnx_archive_answers_like_the_eager_one(torchserve, onnx_model, sample_paths):
    for path in sample_paths:
        data = path.read_bytes()
        eager, onnx = predict(torchserve, "dr", data), predict(torchserve, onnx_model, data)
        assert onnx["grade"] == eager["grade"] and onnx["gradable"] == eager["gradable"]
        if eager["probabilities"]:
            assert max(abs(a - b) for a, b in zip(onnx["probabilities"], eager["probabilities"])) <= 1e-4
    described = requests.get(f"{torchserve.management_url}/models/{onnx_model}/1.0",
                             params={"customized": "true"}, timeout=30, headers=torchserve.auth("management")).json()
    assert described[0]["customizedMetadata"]["engine"]["name"] == "onnx"


def test_onnx_archive_still_explains(torchserve, onnx_model, sample_paths):
    answer = predict(torchserve, onnx_model, sample_paths[0].read_bytes(), route="explanations")
    assert answer["explanation"]["method"] == "grad-cam"
