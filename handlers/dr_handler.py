"""TorchServe handler for the DR grading model.

In the spirit of TorchServe's image_classifier handler it overrides only what differs from
BaseHandler:
- loading: the architecture comes from model_meta.json, since BaseHandler would call DRNet();
- handle: answers each request of a batch on its own (a rejected image gets its own 4xx, an
  ungradable one skips the network, and predictions and explanations may share a batch, where
  BaseHandler lets the first request's explain header decide for all).
"""
from __future__ import annotations

import base64
import http
import json
import logging
import os
import time
from pathlib import Path

import torch
from ts.metrics.dimension import Dimension
from ts.metrics.metric_type_enum import MetricTypes
from ts.torch_handler.base_handler import BaseHandler

# Inside a .mar the archived modules lie flat in the model directory; try them first so a
# worker runs the code it was archived with even when the repository is on PYTHONPATH too.
try:
    import engine
    import fundus
    import gradcam
    import quality
    from network import DRNet
except ImportError:
    from handlers import engine, fundus, gradcam, quality
    from handlers.network import DRNet

logger = logging.getLogger(__name__)

META_FILE = "model_meta.json"


class DRHandler(BaseHandler):
    def initialize(self, context):
        properties = context.system_properties
        model_dir = Path(properties["model_dir"])
        self.meta = json.loads((model_dir / META_FILE).read_text())
        self.model_yaml_config = getattr(context, "model_yaml_config", None) or {}
        self._set_threads()
        gpu_id = properties.get("gpu_id")
        cuda = torch.cuda.is_available() and gpu_id is not None
        self.device = torch.device(f"cuda:{gpu_id}" if cuda else "cpu")

        self.model = DRNet(arch=self.meta["arch"], num_classes=len(self.meta["grade_labels"]))
        state = torch.load(model_dir / self.meta["weights_file"], map_location=self.device,
                           weights_only=True)
        self.model.load_state_dict(state)
        self.model.to(self.device).eval().requires_grad_(False)
        # Predictions run on the archive's engine; Grad-CAM stays on the eager network.
        self.engine = engine.load(self.meta, model_dir, self.model, self.device, torch.get_num_threads())

        self.preprocess_config = fundus.PreprocessConfig.from_dict(self.meta["preprocess"])
        self.thresholds = quality.QualityThresholds.from_dict(self.meta["quality"])
        self.labels = self.meta["grade_labels"]
        self.model_info = {"name": self.meta["name"], "version": self.meta["version"],
                           "synthetic_training_data": bool(self.meta["synthetic"])}
        self.initialized = True
        logger.info("DR model %s %s (%s) on %s, engine %s, %d threads", self.meta["name"],
                    self.meta["version"], self.meta["arch"], self.device, self.engine.name,
                    torch.get_num_threads())

    def _set_threads(self) -> None:
        """DR_TORCH_THREADS, else model-config.yaml `handler.torch_threads`, else torch's default.

        One worker per core with one thread each usually beats one worker with many threads.
        """
        threads = os.environ.get("DR_TORCH_THREADS") or \
            (self.model_yaml_config.get("handler") or {}).get("torch_threads")
        if threads:
            torch.set_num_threads(int(threads))

    def handle(self, data, context):
        self.context = context
        if self._is_describe():  # GET /models/NAME/VERSION?customized=true
            return [self.describe_handle()]
        answers: list = [None] * len(data)
        ready: dict[bool, list] = {False: [], True: []}  # explain? -> [(idx, Prepared)]
        for idx, row in enumerate(data):
            context.set_response_content_type(idx, "application/json")
            try:
                prepared = fundus.prepare(_image_bytes(row), self.preprocess_config, self.thresholds)
            except fundus.ImageRejected as exc:
                answers[idx] = self._reject(idx, exc.status, exc.code, exc.message)
                continue
            except Exception:  # one odd file must not fail the whole batch with a 503
                logger.exception("preprocessing failed for request %d of %d", idx, len(data))
                answers[idx] = self._reject(idx, 500, "preprocess_failed",
                                            "The image could not be processed.")
                continue
            self._observe("DRPreprocessSeconds", sum(prepared.timings_ms.values()) / 1000, idx)
            if prepared.tensor is None:
                answers[idx] = self._ungradable(idx, prepared)
            else:
                ready[self._wants_explanation(idx)].append((idx, prepared))

        for explain, items in ready.items():
            if items:
                self._grade(items, explain, answers)
        self._observe("DRBatchSize", len(data))
        return answers

    def describe_handle(self) -> str:
        """model_meta.json as TorchServe's `customizedMetadata`: provenance without the model card."""
        return json.dumps(self.meta)

    def _wants_explanation(self, idx: int) -> bool:
        # The frontend marks /explanations requests with this header, per request.
        return str(self.context.get_request_header(idx, "explain") or "").lower() == "true"

    def _grade(self, items: list, explain: bool, answers: list) -> None:
        batch = torch.stack([p.tensor for _, p in items]).to(self.device)
        start = time.perf_counter()
        if explain:
            logits, maps, _ = gradcam.grad_cam(self.model, self.model.cam_layer(), batch)
        else:
            logits = self.engine(batch)
        probabilities = torch.softmax(logits.float(), dim=1).cpu()  # .cpu() waits for the GPU
        inference_ms = (time.perf_counter() - start) * 1000
        for row, (idx, prepared) in enumerate(items):
            probs = probabilities[row].tolist()
            grade = max(range(len(probs)), key=probs.__getitem__)
            answer = self._answer(prepared, inference_ms)
            answer.update(grade=grade, label=self.labels[grade],
                          probabilities=[round(p, 6) for p in probs],
                          referable=grade >= self.meta["referable_threshold"])
            if explain:
                answer["explanation"] = {
                    "method": "grad-cam", "target_grade": grade,
                    "map_size": list(maps[row].shape),
                    "overlay_png_base64": base64.b64encode(
                        gradcam.overlay_png(prepared.display, maps[row])).decode("ascii"),
                    # The map itself and where the network's crop lies in the photograph, so a
                    # client can draw it on the whole photograph at its own size.
                    "map": [[round(float(v), 4) for v in line] for line in maps[row]],
                    "crop_box": _crop_fractions(prepared.disc),
                }
            answers[idx] = answer
            self._count("DRImagesGraded", idx, Grade=grade)
            self._observe("DRInferenceSeconds", inference_ms / 1000, idx)

    def _answer(self, prepared, inference_ms: float | None) -> dict:
        """The fields every 200 answer has; grading fills in the rest."""
        return {
            "grade": None, "label": None, "probabilities": None, "referable": None,
            "referable_threshold": self.meta["referable_threshold"],
            "gradable": bool(prepared.quality["gradable"]),
            "quality": prepared.quality,
            "model": dict(self.model_info),
            "disclaimer": self.meta.get("disclaimer"),
            # prepare() rounds decode and preprocess already
            "timings_ms": {**prepared.timings_ms,
                           "inference": None if inference_ms is None else round(inference_ms, 2)},
        }

    def _ungradable(self, idx: int, prepared) -> dict:
        answer = self._answer(prepared, None)
        if self._wants_explanation(idx):
            answer["explanation"] = None
        for reason in prepared.quality.get("reasons", []):
            self._count("DRImagesUngradable", idx, Reason=reason["code"])
        return answer

    def _reject(self, idx: int, status: int, code: str, message: str) -> dict:
        self.context.set_response_status(status, http.HTTPStatus(status).phrase, idx)
        self._count("DRImagesRejected", idx, Code=code)
        return {"code": code, "message": message}

    # Metrics: each name is declared in torchserve-metrics.yaml with these dimensions, in this order,
    # followed by the ModelName and Level that TorchServe appends.
    def _count(self, name: str, idx: int, **dimension) -> None:
        self._metric(name, 1, "count", idx, MetricTypes.COUNTER, dimension)

    def _observe(self, name: str, value: float, idx: int | None = None) -> None:
        unit = "seconds" if name.endswith("Seconds") else "count"
        self._metric(name, value, unit, idx, MetricTypes.HISTOGRAM, {})

    def _metric(self, name, value, unit, idx, metric_type, dimension: dict) -> None:
        dimensions = [Dimension("ModelVersion", str(self.meta["version"]))]
        dimensions += [Dimension(k, str(v)) for k, v in dimension.items()]
        self.context.metrics.add_metric(name, value, unit, idx=idx, dimensions=dimensions,
                                        metric_type=metric_type)


def _crop_fractions(disc) -> list[float]:
    """The square the network saw, as (left, top, right, bottom) fractions of the photograph's
    width and height after EXIF orientation (it may reach outside [0, 1])."""
    width, height = disc.image_size
    left, top, right, bottom = disc.bbox
    return [round(left / width, 5), round(top / height, 5), round(right / width, 5), round(bottom / height, 5)]


def _image_bytes(row) -> bytes:
    """The image of one request: `data`, the raw body, or else the largest multipart field.

    Multipart text fields (say eye=left) arrive as bytes too; a photograph is always the largest.
    """
    value = row
    if isinstance(row, dict):
        value = row.get("data") or row.get("body")
        if not isinstance(value, (bytes, bytearray)):
            blobs = [v for v in row.values() if isinstance(v, (bytes, bytearray)) and v]
            value = max(blobs, key=len) if blobs else value
    if isinstance(value, str):  # a text body: let the decoder say it is not an image
        value = value.encode("utf-8", "replace")
    if isinstance(value, (bytes, bytearray)) and value:
        return bytes(value)
    if not value:
        raise fundus.ImageRejected("empty_request", 400, "The request carries no image.")
    raise fundus.ImageRejected("not_an_image", 415,
                               "Send the photograph as the raw body or as a multipart file, not as JSON.")
