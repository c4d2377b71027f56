"""Prometheus metrics. Labels hold route templates, methods, statuses and outcomes only:
never a raw path, an id or anything about a patient.

Under gunicorn, PROMETHEUS_MULTIPROC_DIR makes prometheus-client keep each worker's values
in files there; /metrics then sums every worker (gunicorn.conf.py cleans up dead ones).
"""
from __future__ import annotations

import os

from prometheus_client import (CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Gauge, Histogram,
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

# Per model version (clinical default and shadow candidates alike), for drift alerts in
# deploy/alerts.yml. `grade` is 0-4 or "ungradable"; `version` is a model version string.
MODEL_GRADINGS = Counter("clarity_model_gradings_total", "Gradings by model version and grade",
                         ["version", "grade"])
MODEL_QUALITY = Histogram("clarity_model_quality_score", "Image quality score by model version", ["version"],
                          buckets=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0))
# The share of each grade in the version's held-out set, from its model card: what the
# alert rules compare the live distribution with. Set when the API first sees the version.
MODEL_CARD_GRADE_SHARE = Gauge("clarity_model_card_grade_share", "Held-out share of each grade (model card)",
                               ["version", "grade"], multiprocess_mode="max")
SHADOW = Counter("clarity_shadow_gradings_total", "Shadow work by outcome: graded, or dropped because "
                 "the queue was full or the model server failed (never retried)", ["outcome"])

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Backlog:
    """The pending screenings, counted at scrape time from the database (one indexed query),
    so the numbers are right whichever process or grader changed them. Left out when the
    database does not answer: /metrics itself must not fail."""

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        from .grading import backlog

        try:
            count, age = backlog()
        except Exception:
            return
        yield GaugeMetricFamily("clarity_pending_screenings", "Screenings waiting for a grade", value=count)
        yield GaugeMetricFamily("clarity_pending_oldest_age_seconds",
                                "Age of the oldest screening waiting for a grade (0 when none)", value=age)


def render() -> bytes:
    """The exposition text: this process's metrics, or every gunicorn worker's in multiprocess
    mode, and the pending backlog."""
    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.MultiProcessCollector(registry)
        for attempt in range(3):
            try:
                text = generate_latest(registry)
                break
            except FileNotFoundError:  # gunicorn.conf.py folded a dead worker's file meanwhile
                if attempt == 2:
                    raise
    else:
        text = generate_latest(REGISTRY)
    backlog = CollectorRegistry()
    backlog.register(Backlog())
    return text + generate_latest(backlog)
