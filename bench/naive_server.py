"""The naive alternative the benchmarks compare against: one Flask app with the model in-process.

This is what "a single container with in-process inference" amounts to: no model server, no
batching, no separate storage or database. It answers `POST /predictions/dr` (image as the raw
body) with the same fields as TorchServe's DR handler, using the same preprocessing
(handlers/fundus.py) and the same network (handlers/network.py), one image per forward pass.

The benchmark serves it exactly like this, i.e. gunicorn with ONE synchronous worker, so one
request is handled at a time and the others wait in the listen backlog:

    NAIVE_CHECKPOINT=models/demo/checkpoint.pt \
        gunicorn -w 1 -k sync -b 127.0.0.1:8090 --timeout 120 bench.naive_server:app

Torch uses its default thread count (one per core) unless NAIVE_TORCH_THREADS is set.
The demo model is trained on synthetic images: its grades are not for clinical use.
"""
from __future__ import annotations

import os
import time

import torch
from flask import Flask, jsonify, request

from handlers import fundus
from handlers.network import DRNet
from scripts.ml.archive import SYNTHETIC_DISCLAIMER


def load(path: str) -> dict:
    ck = torch.load(path, map_location="cpu", weights_only=True)
    model = DRNet(arch=ck["arch"], num_classes=len(ck["grade_labels"]))
    model.load_state_dict(ck["state_dict"])
    model.eval().requires_grad_(False)
    return {"model": model, "labels": ck["grade_labels"], "threshold": int(ck["referable_threshold"]),
            "preprocess": fundus.PreprocessConfig.from_dict(ck["preprocess"]),
            "quality": fundus.QualityThresholds.from_dict(ck["quality"]),
            "synthetic": bool(ck["dataset"].get("synthetic"))}


def create_app(checkpoint: str | None = None) -> Flask:
    if os.environ.get("NAIVE_TORCH_THREADS"):
        torch.set_num_threads(int(os.environ["NAIVE_TORCH_THREADS"]))
    state = load(checkpoint or os.environ["NAIVE_CHECKPOINT"])
    app = Flask(__name__)

    @app.get("/ping")
    def ping():
        return jsonify(status="Healthy")

    @app.post("/predictions/dr")
    def predict():
        data = request.get_data()
        try:
            prepared = fundus.prepare(data, state["preprocess"], state["quality"])
        except fundus.ImageRejected as exc:
            return jsonify(exc.to_dict()), exc.status
        answer = {"grade": None, "label": None, "probabilities": None, "referable": None,
                  "referable_threshold": state["threshold"], "gradable": bool(prepared.quality["gradable"]),
                  "quality": prepared.quality,
                  "model": {"name": "dr", "version": "naive", "synthetic_training_data": state["synthetic"]},
                  "disclaimer": SYNTHETIC_DISCLAIMER if state["synthetic"] else None,
                  "timings_ms": {**prepared.timings_ms, "inference": None}}
        if prepared.tensor is not None:
            started = time.perf_counter()
            with torch.inference_mode():
                probs = torch.softmax(state["model"](prepared.tensor[None]), dim=1)[0].tolist()
            grade = max(range(len(probs)), key=probs.__getitem__)
            answer.update(grade=grade, label=state["labels"][grade], probabilities=[round(p, 6) for p in probs],
                          referable=grade >= state["threshold"])
            answer["timings_ms"]["inference"] = round((time.perf_counter() - started) * 1000, 2)
        return jsonify(answer)

    return app


if os.environ.get("NAIVE_CHECKPOINT"):
    app = create_app()
