"""The archived model on a real TorchServe 0.12 (one server per session, the `torchserve` fixture)."""
from __future__ import annotations

import base64
import concurrent.futures as cf
import io
import json
import re
from pathlib import Path

import pytest
import requests
from PIL import Image

from scripts.serving import management, model_state, registry as models

pytestmark = pytest.mark.integration

SAMPLES = Path(__file__).resolve().parents[2] / "samples"
NORMAL = (SAMPLES / "right_normal_600.jpg").read_bytes()
IDRID = (SAMPLES / "idrid_05.jpg").read_bytes()


def predict(ts, body: bytes, *, explain=False, version=None, **kw) -> requests.Response:
    route = "explanations" if explain else "predictions"
    url = f"{ts.inference_url}/{route}/dr" + (f"/{version}" if version else "")
    return requests.post(url, data=body, timeout=60, headers={**ts.auth("inference"), **kw.pop("headers", {})}, **kw)


def concurrently(calls):
    with cf.ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(lambda call: call(), calls))


def metric_samples(ts, name: str) -> dict[str, float]:
    """{labels: value} for one metric family on /metrics."""
    text = requests.get(f"{ts.metrics_url}/metrics", timeout=10).text
    pattern = re.compile(rf"^{re.escape(name)}\{{(.*)\}} (\S+)$", re.M)
    return {labels: float(value) for labels, value in pattern.findall(text)}


def batches_larger_than_one(ts) -> float:
    samples = metric_samples(ts, "DRBatchSize_bucket")
    total = sum(v for k, v in samples.items() if 'le="+Inf"' in k)
    single = sum(v for k, v in samples.items() if 'le="1.0"' in k)
    return total - single


def test_prediction_has_the_contract_shape(torchserve):
    r = predict(torchserve, NORMAL)
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"grade", "label", "probabilities", "referable", "referable_threshold", "gradable",
                         "quality", "model", "disclaimer", "timings_ms"}
    assert body["gradable"] is True and 0 <= body["grade"] <= 4
    assert body["model"] == {"name": "dr", "version": "1.0", "synthetic_training_data": True}
    assert body["disclaimer"] == "Demo model trained on synthetic images. Not for clinical use."
    assert set(body["timings_ms"]) == {"decode", "preprocess", "inference"}


def test_multipart_upload_under_any_field_name_and_a_versioned_route(torchserve):
    r = requests.post(f"{torchserve.inference_url}/predictions/dr/1.0", timeout=60, headers=torchserve.auth(),
                      files={"photo": ("eye.jpg", IDRID, "image/jpeg")}, data={"eye": "right"})
    assert r.status_code == 200, r.text
    assert r.json()["gradable"] is True


def test_fundus_photographs_over_the_6_5_mb_default_are_accepted(torchserve):
    # A real JPEG padded past TorchServe's default max_request_size; decoders ignore bytes after EOI.
    big = IDRID + b"\0" * (12 * 1024 * 1024)
    r = predict(torchserve, big)
    assert r.status_code == 200, r.text


def test_concurrent_requests_are_batched(torchserve):
    before = batches_larger_than_one(torchserve)
    answers = concurrently([lambda: predict(torchserve, NORMAL)] * 32)
    assert [a.status_code for a in answers] == [200] * 32
    assert batches_larger_than_one(torchserve) > before


def test_a_bad_image_in_a_batch_gets_its_own_4xx(torchserve):
    bodies = [NORMAL, NORMAL[:4000], NORMAL, b"hello", NORMAL, b"", NORMAL, NORMAL] * 2
    answers = concurrently([lambda b=b: predict(torchserve, b) for b in bodies])
    expected = {NORMAL: 200, NORMAL[:4000]: 422, b"hello": 415, b"": 400}
    assert [a.status_code for a in answers] == [expected[b] for b in bodies]
    for body, answer in zip(bodies, answers):
        if body == NORMAL:
            assert answer.json()["gradable"] is True
        else:
            assert set(answer.json()) == {"code", "message"}


def test_explanations_and_predictions_mixed_in_batches(torchserve):
    kinds = [True, False] * 8
    answers = concurrently([lambda e=e: predict(torchserve, NORMAL, explain=e) for e in kinds])
    for explain, answer in zip(kinds, answers):
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert ("explanation" in body) is explain
        if explain:
            exp = body["explanation"]
            assert exp["method"] == "grad-cam" and exp["target_grade"] == body["grade"]
            assert all(1 <= s <= 128 for s in exp["map_size"])
            png = Image.open(io.BytesIO(base64.b64decode(exp["overlay_png_base64"])))
            assert png.format == "PNG" and png.size == (128, 128)


def test_custom_metrics_reach_prometheus(torchserve):
    predict(torchserve, NORMAL)
    predict(torchserve, b"not an image")
    # Other modules register models of other names on this shared server (test_engine_torchserve).
    graded = {k: v for k, v in metric_samples(torchserve, "DRImagesGraded").items() if 'ModelName="dr"' in k}
    assert graded and all('ModelVersion="1.0"' in k for k in graded)
    assert any('Code="not_an_image"' in k for k in metric_samples(torchserve, "DRImagesRejected"))
    for histogram in ("DRPreprocessSeconds", "DRInferenceSeconds", "DRBatchSize"):
        assert sum(metric_samples(torchserve, f"{histogram}_count").values()) > 0


def test_model_description_carries_model_meta(torchserve):
    r = requests.get(f"{torchserve.management_url}/models/dr/1.0", params={"customized": "true"}, timeout=10,
                     headers=torchserve.auth("management"))
    assert r.status_code == 200
    meta = r.json()[0]["customizedMetadata"]  # TorchServe embeds the JSON it got
    assert meta["version"] == "1.0" and meta["synthetic"] is True and len(meta["weights_sha256"]) == 64


def test_remote_and_outside_urls_are_refused_for_registration(torchserve, model_store):
    api = torchserve.management()
    for url in ("http://example.com/dr_9.mar", "https://127.0.0.1:1/dr_9.mar", "file:///etc/passwd"):
        with pytest.raises(management.ManagementError, match="does not match any allowed URL") as info:
            models.register(api, url, model_store=model_store, name="dr", version="9", wait=False)
        assert info.value.status == 404
    assert [v["version"] for v in models.versions(api, "dr")] == ["1.0"]


def test_register_promote_rollback_unregister(torchserve, model_store, capsys):
    cli = ["--management", torchserve.management_url, "--key-file", str(torchserve.key_file),
           "--model-store", str(model_store)]
    history = model_store / models.HISTORY_FILE
    try:
        assert models.main(cli + ["register", "dr_2.0.mar", "--wait"]) == 0
        assert "registered dr 2.0 (READY)" in capsys.readouterr().out
        assert models.main(cli + ["list"]) == 0
        listing = capsys.readouterr().out
        assert re.search(r"^\* dr\s+1\.0", listing, re.M) and re.search(r"^  dr\s+2\.0", listing, re.M)

        assert models.main(cli + ["promote", "dr", "2.0"]) == 1  # the fixture's archive has no held-out metrics
        assert "no held-out metrics" in capsys.readouterr().err
        assert models.main(cli + ["promote", "dr", "2.0", "--force"]) == 1
        assert "--force needs --reason" in capsys.readouterr().err
        assert models.main(cli + ["promote", "dr", "2.0", "--force", "--reason", "test of the machinery"]) == 0
        event = json.loads((model_store / model_state.PROMOTIONS_FILE).read_text().splitlines()[-1])
        assert event["forced"] and event["reason"] == "test of the machinery" and event["to"] == "2.0"
        assert event["gate"]["failures"]
        assert models.main(cli + ["serve-models", "dr"]) == 0
        assert capsys.readouterr().out.strip().endswith("dr=dr_2.0.mar,dr=dr_1.0.mar")
        assert predict(torchserve, NORMAL).json()["model"]["version"] == "2.0"
        assert predict(torchserve, NORMAL, version="1.0").json()["model"]["version"] == "1.0"

        assert models.main(cli + ["rollback", "dr"]) == 0
        assert "back to 1.0" in capsys.readouterr().out
        assert predict(torchserve, NORMAL).json()["model"]["version"] == "1.0"
        assert models.main(cli + ["rollback", "dr"]) == 1
        assert "no earlier default" in capsys.readouterr().err

        assert models.main(cli + ["register", "dr_2.0.mar"]) == 1  # already registered
        assert "2.0" in capsys.readouterr().err

        assert models.main(cli + ["scale", "dr", "2.0", "--min", "0", "--max", "1"]) == 0
        assert models.main(cli + ["unregister", "dr", "2.0"]) == 0
        assert predict(torchserve, NORMAL, version="2.0").status_code == 404
        assert models.main(cli + ["unregister", "dr", "2.0"]) == 1
        assert "not found" in capsys.readouterr().err
    finally:  # later tests share this server: leave 1.0 the only, default version
        api = torchserve.management()
        if models.default_version(api, "dr") != "1.0":
            api.call("PUT", "/models/dr/1.0/set-default")
        if "2.0" in [v["version"] for v in models.versions(api, "dr")]:
            api.call("DELETE", "/models/dr/2.0")
        history.unlink(missing_ok=True)
        (model_store / model_state.PROMOTIONS_FILE).unlink(missing_ok=True)
