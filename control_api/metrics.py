"""Prometheus metrics. Labels hold route templates, methods, statuses and outcomes only:
never a raw path, an id or anything about a patient.

Under gunicorn, PROMETHEUS_MULTIPROC_DIR makes prometheus-client keep each worker's values
in files there; /metrics then sums every worker (gunicorn.conf.py cleans up dead ones).
"""
from __future__ import annotations

import os

from prometheus_client import (CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Histogram,
                               generate_latest, multiprocess)

REQUESTS = Counter("clarity_api_requests_total", "HTTP requests answered",
                   ["method", "route", "status"])
REQUEST_SECONDS = Histogram("clarity_api_request_duration_seconds", "Time to answer a request",
                            ["method", "route"],
                            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
TORCHSERVE_SECONDS = Histogram("clarity_torchserve_request_duration_seconds", "Calls to TorchServe",
                               ["operation", "outcome"],
                               buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
RESULT_CACHE = Counter("clarity_result_cache_total", "Uploads whose grading was reused or not", ["outcome"])
SCREENINGS = Counter("clarity_screenings_total", "Screening gradings by outcome", ["outcome"])
STORAGE_SECONDS = Histogram("clarity_storage_operation_duration_seconds", "Image storage calls",
                            ["backend", "operation"],
                            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))

CONTENT_TYPE = CONTENT_TYPE_LATEST


def render() -> bytes:
    """The exposition text: this process's metrics, or every gunicorn worker's in multiprocess mode."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = REGISTRY
    return generate_latest(registry)
