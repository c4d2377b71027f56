"""The DR handler without TorchServe: TorchServe's own Context and RequestProcessor, a model dir
unpacked from a real archive, and a metrics cache that insists on torchserve-metrics.yaml's declarations."""
from __future__ import annotations

import base64
import io
import json
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from ts.context import Context, RequestProcessor
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

from handlers import dr_handler
from tests.support import images

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "samples"
CONTRACT_KEYS = {"grade", "label", "probabilities", "referable", "referable_threshold", "gradable",
                 "quality", "model", "disclaimer", "timings_ms"}


class DeclaredMetrics(MetricsCacheYamlImpl):
    """TorchServe's metric cache over our torchserve-metrics.yaml; records every update and refuses metrics
    that are not declared there with exactly the dimensions sent (those never reach /metrics)."""

    def __init__(self):
        super().__init__(str(REPO / "torchserve-metrics.yaml"))
        self.initialize_cache()
        self.model_name = "dr"
        self.updates: list[tuple[str, float, dict]] = []

    def _get_or_add_metric(self, metric_name, unit, dimensions, metric_type):
        metric = self.get_metric(metric_name, metric_type)  # raises when undeclared
        sent = [d.name for d in dimensions]
        assert sent == metric.dimension_names, f"{metric_name}: sent {sent}, declared {metric.dimension_names}"
        self.updates.append((metric_name, None, {d.name: d.value for d in dimensions}))
        return metric

    def add_metric(self, name, value, unit, idx=None, dimensions=[], metric_type=None):
        super().add_metric(name, value, unit, idx=idx, dimensions=dimensions, metric_type=metric_type)
        metric_name, _, dims = self.updates[-1]
        self.updates[-1] = (metric_name, value, dims)

    def values(self, name: str) -> list[tuple[float, dict]]:
        return [(v, d) for n, v, d in self.updates if n == name]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, model_store) -> Path:
    """dr_1.0.mar unpacked, as TorchServe does before starting a worker."""
    out = tmp_path_factory.mktemp("model_dir")
    with zipfile.ZipFile(model_store / "dr_1.0.mar") as z:
        z.extractall(out)
    return out


def make_context(model_dir: Path, headers: list[dict] | None = None, yaml_config=None) -> Context:
    manifest = json.loads((model_dir / "MAR-INF" / "MANIFEST.json").read_text())
    ctx = Context("dr", str(model_dir), manifest, 8, None, "0.12.0", metrics=DeclaredMetrics(),
                  model_yaml_config=yaml_config or {})
    if headers is not None:
        ctx.request_processor = [RequestProcessor(h) for h in headers]
        ctx.request_ids = {i: f"req-{i}" for i in range(len(headers))}
        ctx.metrics.set_request_ids(ctx.request_ids)
    return ctx


@pytest.fixture(scope="module")
def handler(model_dir):
    h = dr_handler.DRHandler()
    h.initialize(make_context(model_dir))
    return h


def run(handler, model_dir, rows, explain=()):
    ctx = make_context(model_dir, [{"explain": "True"} if i in explain else {} for i in range(len(rows))])
    return handler.handle(rows, ctx), ctx


@pytest.fixture(scope="module")
def inputs() -> dict[str, bytes]:
    normal = (SAMPLES / "right_normal_600.jpg").read_bytes()
    return {
        "normal": normal,
        "idrid": (SAMPLES / "idrid_01.jpg").read_bytes(),
        "truncated": normal[: len(normal) // 3],
        "text": b"patient notes, not a photograph",
        "blank": images.encode(Image.new("RGB", (800, 800)), quality=90),
    }


def assert_graded(answer: dict, handler) -> None:
    assert CONTRACT_KEYS <= set(answer)
    assert answer["gradable"] is True and answer["quality"]["gradable"] is True
    assert 0 <= answer["grade"] <= 4
    assert answer["label"] == handler.labels[answer["grade"]]
    assert len(answer["probabilities"]) == 5
    assert sum(answer["probabilities"]) == pytest.approx(1.0, abs=1e-4)
    assert answer["grade"] == max(range(5), key=answer["probabilities"].__getitem__)
    assert answer["referable"] == (answer["grade"] >= 2)
    assert answer["referable_threshold"] == 2
    assert answer["model"] == {"name": "dr", "version": "1.0", "synthetic_training_data": True}
    assert "synthetic" in answer["disclaimer"] and "Not for clinical use" in answer["disclaimer"]
    assert set(answer["timings_ms"]) == {"decode", "preprocess", "inference"}
    assert all(v >= 0 for v in answer["timings_ms"].values())


def test_mixed_batch_answers_each_request_on_its_own(handler, model_dir, inputs):
    rows = [
        {"body": bytearray(inputs["normal"])},               # raw body, as TorchServe delivers it
        {"data": inputs["truncated"]},
        {"fundus": bytearray(inputs["idrid"]), "eye": "left"},  # multipart under any field name
        {"body": "patient notes, not a photograph"},          # text/plain arrives decoded
        {"body": inputs["text"]},
        {"body": inputs["blank"]},
        {"body": {"image": "not here"}},                      # application/json arrives parsed
        {"body": bytearray()},
    ]
    answers, ctx = run(handler, model_dir, rows)
    assert len(answers) == len(rows)
    status = [ctx.get_response_status(i)[0] for i in range(len(rows))]
    assert status == [200, 422, 200, 415, 415, 200, 415, 400]
    for i in (0, 2):
        assert_graded(answers[i], handler)
    for i in (1, 3, 4, 6, 7):
        assert set(answers[i]) == {"code", "message"} and answers[i]["message"]
    assert answers[1]["code"] == "truncated_image"
    assert answers[3]["code"] == answers[4]["code"] == "not_an_image"
    assert all(ctx.get_response_content_type(i) == "application/json" for i in range(len(rows)))

    blank = answers[5]
    assert blank["gradable"] is False and blank["quality"]["gradable"] is False
    assert blank["quality"]["reasons"] and all({"code", "message"} <= set(r) for r in blank["quality"]["reasons"])
    assert blank["grade"] is blank["label"] is blank["probabilities"] is blank["referable"] is None
    assert blank["timings_ms"]["inference"] is None  # the network never saw it
    assert blank["model"]["version"] == "1.0"
    json.dumps(answers)  # TorchServe serialises every answer as JSON


def test_metrics_are_declared_and_counted(handler, model_dir, inputs):
    rows = [{"body": inputs["normal"]}, {"body": inputs["text"]}, {"body": inputs["blank"]},
            {"body": inputs["normal"]}]
    answers, ctx = run(handler, model_dir, rows)
    m = ctx.metrics
    graded = m.values("DRImagesGraded")
    assert len(graded) == 2
    assert {d["Grade"] for _, d in graded} == {str(answers[0]["grade"])}
    assert [d["Code"] for _, d in m.values("DRImagesRejected")] == ["not_an_image"]
    reasons = {d["Reason"] for _, d in m.values("DRImagesUngradable")}
    assert reasons == {r["code"] for r in answers[2]["quality"]["reasons"]}
    assert [v for v, _ in m.values("DRBatchSize")] == [4]
    assert len(m.values("DRPreprocessSeconds")) == 3
    assert len(m.values("DRInferenceSeconds")) == 2
    # no request content in any label: only version, grade/reason/code, model name and level
    for _, _, dims in m.updates:
        assert set(dims) <= {"ModelVersion", "Grade", "Reason", "Code", "ModelName", "Level"}


def test_explanations_and_predictions_share_a_batch(handler, model_dir, inputs):
    rows = [{"body": inputs["normal"]}, {"body": inputs["normal"]}, {"body": inputs["blank"]},
            {"body": inputs["text"]}]
    answers, ctx = run(handler, model_dir, rows, explain={1, 2, 3})
    assert "explanation" not in answers[0]
    explained = answers[1]
    assert_graded(explained, handler)
    # the gradient pass grades exactly like the inference pass
    assert explained["probabilities"] == pytest.approx(answers[0]["probabilities"], abs=1e-5)
    exp = explained["explanation"]
    assert exp["method"] == "grad-cam" and exp["target_grade"] == explained["grade"]
    size = handler.preprocess_config.input_size
    h, w = exp["map_size"]
    assert 1 <= h <= size and 1 <= w <= size
    png = Image.open(io.BytesIO(base64.b64decode(exp["overlay_png_base64"])))
    assert png.format == "PNG" and png.size == (size, size)
    # the raw map at the layer's resolution, and the crop's place in the photograph
    assert len(exp["map"]) == h and all(len(line) == w for line in exp["map"])
    assert all(0 <= v <= 1 for line in exp["map"] for v in line)
    left, top, right, bottom = exp["crop_box"]
    assert left < right and top < bottom and -0.5 < left < 1 and 0 < right < 1.5
    assert answers[2]["gradable"] is False and answers[2]["explanation"] is None
    assert ctx.get_response_status(3)[0] == 415
    assert not any(p.grad is not None for p in handler.model.parameters())


def test_explanation_only_batch(handler, model_dir, inputs):
    answers, _ = run(handler, model_dir, [{"body": inputs["normal"]}], explain={0})
    assert answers[0]["explanation"]["overlay_png_base64"]


def test_image_bytes_takes_any_bytes_field():
    assert dr_handler._image_bytes({"whatever": bytearray(b"\xff\xd8\xff"), "note": "x"}) == b"\xff\xd8\xff"
    assert dr_handler._image_bytes({"eye": bytearray(b"left"), "photo": bytearray(b"\xff\xd8\xff..")}) \
        == b"\xff\xd8\xff.."
    assert dr_handler._image_bytes({"data": b"a", "body": b"b"}) == b"a"
    assert dr_handler._image_bytes(b"raw") == b"raw"


def test_torch_threads_come_from_env_before_model_config(model_dir, monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("DR_TORCH_THREADS", raising=False)
        dr_handler.DRHandler().initialize(make_context(model_dir, yaml_config={"handler": {"torch_threads": 2}}))
        assert torch.get_num_threads() == 2
        monkeypatch.setenv("DR_TORCH_THREADS", "1")
        dr_handler.DRHandler().initialize(make_context(model_dir, yaml_config={"handler": {"torch_threads": 2}}))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
