"""The DR model for tests: a tiny checkpoint, archives built from it, and a real TorchServe serving it.

The model is random-initialised (seeded), so its grades mean nothing: tests check the serving
machinery, never accuracy.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from scripts.ml import archive
from scripts.ml.tiny_model import make_checkpoint
from scripts.serving.processes import TorchServe, free_port

BATCH_SIZE, MAX_BATCH_DELAY_MS = 8, 100


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """mobilenet_v3_small at 128 px, random weights (seed 0), synthetic=True."""
    return make_checkpoint(tmp_path_factory.mktemp("checkpoint") / "tiny.pt")


@pytest.fixture(scope="session")
def model_store(tmp_path_factory, tiny_checkpoint) -> Path:
    """A model store holding dr_1.0.mar and dr_2.0.mar (the same tiny weights), archived once.

    Both archives batch up to 8 requests and wait up to 100 ms for a batch to fill, with 1 worker.
    """
    store = tmp_path_factory.mktemp("model_store")
    for version in ("1.0", "2.0"):
        archive.archive(tiny_checkpoint, version, model_store=store, batch_size=BATCH_SIZE,
                        max_batch_delay=MAX_BATCH_DELAY_MS, workers=1, response_timeout=60)
    return store


@pytest.fixture(scope="session")
def torchserve(tmp_path_factory, model_store):
    """A real TorchServe 0.12 serving model `dr`, started once per session and stopped at its end.

    - `dr` version 1.0 is registered at startup and is the default; one worker is READY before
      the fixture returns. dr_2.0.mar lies in the store, not registered.
    - batchSize 8, maxBatchDelay 100 ms: concurrent requests are batched, and a lone request
      waits up to 100 ms for company.
    - Loopback ports from free_port(): use `.inference_url`, `.management_url`, `.metrics_url`.
      Token authorization off, model API on, registration limited to archives in the store,
      metrics in Prometheus format with the DR metrics of torchserve-metrics.yaml.
    - One torch thread per worker (DR_TORCH_THREADS=1).
    Tests that register, promote or scale must put things back as they found them (version
    1.0 default, 2.0 unregistered, one worker) since later tests share this server.
    """
    # gRPC cannot be switched off in 0.12: give it free ports so parallel servers don't clash on 7070.
    grpc = {"grpc_inference_port": free_port(), "grpc_management_port": free_port()}
    server = TorchServe(tmp_path_factory.mktemp("torchserve"), model_store, models="dr=dr_1.0.mar",
                        overrides=grpc, env={"DR_TORCH_THREADS": "1"})
    server.start(timeout=120)
    try:
        server.wait_model_ready("dr", "1.0", timeout=120)
    except BaseException:
        server.stop()
        raise
    yield server
    server.stop()
