"""Shadow grading: a candidate model version grades new photographs after the default has
answered, so its answers can be compared with the clinical ones before anyone promotes it.

- An admin puts one registered version in shadow (a ShadowSetting row; see blueprints/shadow.py).
- After an upload's clinical grading is stored, `offer()` puts a job on a bounded queue in this
  process and returns at once; one background thread per process asks TorchServe for the
  candidate's answer and stores it as a ShadowGrading row. The clinical answer never waits on
  it, and the thread waits until no clinical call of any API process on this host is in flight
  before it asks.
  A full queue, a process busy for too long or a failed call drops the job (counted in
  clarity_shadow_gradings_total{outcome}); nothing is retried.
- ShadowGrading is a table of its own. Every clinical read (the latest result, the history, the
  summary, reports and exports) reads Grading only, so a shadow answer cannot reach a clinician.
- A re-grade with a named version (admin) is `trial()`: the same storing path, synchronously.

The same background thread loads each version's model card once (held-out grade shares for the
drift alerts, metrics.MODEL_CARD_GRADE_SHARE), so the upload path never asks TorchServe for it.
"""
from __future__ import annotations

import hashlib
import logging
import os
import queue
import random
import tempfile
import threading
import time
from dataclasses import dataclass

import peewee

from . import metrics
from .db import db
from .models import Grading, Screening, ShadowGrading, ShadowSetting, utcnow
from .torchserve import ImageRejected, TorchServeUnavailable, UnknownModelVersion

log = logging.getLogger(__name__)

SETTING_CACHE_SECONDS = 5.0  # a new shadow setting reaches every worker process within this
QUIET_WAIT_SECONDS = 30.0  # how long a shadow job waits for clinical calls to finish before it is dropped
QUIET_GAP_SECONDS = 0.1  # and how long none must have started or ended before it goes
POLL_SECONDS = 0.02

# Clinical calls to TorchServe in flight (grading.grade counts them). A shadow job waits until
# no API process on this host has one in flight, so the candidate never competes with a
# clinical answer for TorchServe's CPU. In this process a counter says so; across gunicorn's
# worker processes, a marker file per busy process in MARKER_DIR (created on 0 -> 1, removed on
# 1 -> 0: two system calls per busy period, nothing per request when calls overlap).
_in_flight = 0
_in_flight_lock = threading.Lock()
MARKER_DIR: str | None = None


def use_marker_dir(path: str) -> None:
    global MARKER_DIR
    os.makedirs(path, exist_ok=True)
    MARKER_DIR = path


class clinical_call:
    """`with shadow.clinical_call(): client.predict(...)` around every clinical prediction."""

    def __enter__(self):
        global _in_flight
        with _in_flight_lock:
            _in_flight += 1
            if _in_flight == 1 and MARKER_DIR:
                try:
                    open(os.path.join(MARKER_DIR, str(os.getpid())), "w").close()
                except OSError:
                    pass

    def __exit__(self, *exc):
        global _in_flight
        with _in_flight_lock:
            _in_flight -= 1
            if _in_flight == 0 and MARKER_DIR:
                try:
                    os.unlink(os.path.join(MARKER_DIR, str(os.getpid())))
                except OSError:
                    pass


# Requests that wait on TorchServe for a clinician: from the moment they arrive (storage and
# database work first), not only during the call, so a shadow job never slips into the gap
# between an upload's arrival and its prediction.
CLINICAL_ENDPOINTS = frozenset({"screenings.create_screening", "exams.add_image", "screenings.regrade",
                                "screenings.read_explanation", "exams.read_report"})


def init_app(app) -> None:
    from flask import g, request

    def started():
        if request.endpoint in CLINICAL_ENDPOINTS:
            g.clinical_call = clinical_call()
            g.clinical_call.__enter__()

    def finished(exc):
        call = g.pop("clinical_call", None)
        if call is not None:
            call.__exit__(None, None, None)

    app.before_request(started)
    app.teardown_request(finished)


def marker_dir_for(database_url: str) -> str:
    """One directory per deployment on this host (its processes share a database URL)."""
    tag = hashlib.sha256(database_url.encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), f"clarity-clinical-{os.getuid()}-{tag}")


def _others_busy() -> tuple[bool, float]:
    """(another process has a clinical call in flight, when the marker directory last changed)."""
    if not MARKER_DIR:
        return False, 0.0
    try:
        names = os.listdir(MARKER_DIR)
        changed = os.stat(MARKER_DIR).st_mtime
    except OSError:
        return False, 0.0
    me = str(os.getpid())
    for name in names:
        if name == me or not name.isdigit():
            continue
        try:
            os.kill(int(name), 0)
        except ProcessLookupError:  # a worker died mid-call: its marker must not block shadow forever
            try:
                os.unlink(os.path.join(MARKER_DIR, name))
            except OSError:
                pass
            continue
        except PermissionError:
            pass
        return True, changed
    return False, changed


def wait_quiet(timeout: float) -> bool:
    """True once no clinical call has been in flight on this host for QUIET_GAP_SECONDS."""
    deadline = time.monotonic() + timeout
    while True:
        others, changed = _others_busy()
        if not _in_flight and not others and time.time() - changed >= QUIET_GAP_SECONDS:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL_SECONDS)


@dataclass(frozen=True)
class Active:
    model_name: str
    version: str
    sample_rate: float


def active_setting() -> ShadowSetting | None:
    return ShadowSetting.select().where(ShadowSetting.stopped_at.is_null()) \
        .order_by(ShadowSetting.id.desc()).first()


def observe(version: str, gradable: bool, grade: int | None, quality: dict | None) -> None:
    """Per-version monitoring of one grading (clinical or shadow); labels hold the version only."""
    metrics.MODEL_GRADINGS.labels(version, str(grade) if gradable and grade is not None else "ungradable").inc()
    score = (quality or {}).get("score")
    if isinstance(score, (int, float)) and not isinstance(score, bool):
        metrics.MODEL_QUALITY.labels(version).observe(score)


def card(meta: dict | None) -> dict | None:
    """The held-out part of a version's model_meta.json (scripts/ml/archive writes it), flattened
    to values: {"images", "data", "quadratic_kappa", "referable_sensitivity", ...}."""
    held_out = (meta or {}).get("held_out")
    if not isinstance(held_out, dict):
        return None
    out = {}
    for key, value in held_out.items():
        if isinstance(value, dict) and "value" in value:
            out[key] = value["value"]
        elif key != "operating_point":
            out[key] = value
    return out


def card_shares(meta: dict | None) -> dict[str, float] | None:
    """Held-out share of each predicted grade (and "ungradable"), for the drift alert."""
    held_out = (meta or {}).get("held_out") or {}
    counts = held_out.get("predicted_counts") or held_out.get("counts")
    if not counts or not sum(counts):
        return None
    total = sum(counts) + int(held_out.get("ungradable") or 0)
    shares = {str(g): n / total for g, n in enumerate(counts)}
    shares["ungradable"] = int(held_out.get("ungradable") or 0) / total
    return shares


def set_card_gauges(version: str, meta: dict | None) -> None:
    for grade, share in (card_shares(meta) or {}).items():
        metrics.MODEL_CARD_GRADE_SHARE.labels(version, grade).set(share)


def store(prediction: dict, screening_id, baseline: Grading | None, version: str, model_name: str,
          source: str) -> ShadowGrading:
    model = prediction.get("model") or {}
    row = ShadowGrading.create(
        screening=screening_id, baseline=baseline.id if baseline else None, source=source,
        model_name=str(model.get("name") or model_name), model_version=str(model.get("version") or version),
        gradable=bool(prediction.get("gradable")), grade=prediction.get("grade"), label=prediction.get("label"),
        probabilities=prediction.get("probabilities"), referable=prediction.get("referable"),
        referable_threshold=prediction.get("referable_threshold"), quality=prediction.get("quality") or {},
        timings=prediction.get("timings_ms"), created_at=utcnow())
    observe(row.model_version, row.gradable, row.grade, row.quality)
    return row


def latest_clinical(screening: Screening) -> Grading | None:
    return Grading.select().where(Grading.screening == screening.id) \
        .order_by(Grading.created_at.desc(), Grading.id.desc()).first()


class Shadow:
    """The per-process queue and thread. Made once per app; the thread starts on first use in
    each process (gunicorn forks after the app may have been built)."""

    def __init__(self, client, queue_size: int = 16, marker_dir: str | None = None):
        self.client = client
        if marker_dir:
            use_marker_dir(marker_dir)
        self.queue_size = queue_size
        self._lock = threading.Lock()
        self._pid = None
        self._queue: queue.Queue | None = None
        self._cached: tuple[float, Active | None] = (float("-inf"), None)
        self._cards_seen: set[str] = set()

    # What is in shadow, read at most every few seconds per process.
    def active(self) -> Active | None:
        read_at, value = self._cached
        if time.monotonic() - read_at < SETTING_CACHE_SECONDS:
            return value
        row = active_setting()
        value = Active(row.model_name, row.model_version, row.sample_rate) if row else None
        self._cached = (time.monotonic(), value)
        return value

    def forget(self) -> None:
        """Drop the cached setting (this process changed it)."""
        self._cached = (float("-inf"), None)

    def offer(self, screening: Screening, model_input: tuple[bytes, str], baseline: Grading) -> bool:
        """After a clinical grading is stored: queue the candidate's grading of the same model
        input (grading.model_input: a DICOM photograph's frame, not its file) when one is in
        shadow and this photograph is sampled. Never blocks and never raises."""
        self.seen(baseline.model_version)
        try:
            setting = self.active()
        except peewee.PeeweeException:
            log.warning("shadow setting unreadable; shadow skipped")
            return False
        if setting is None or setting.version == baseline.model_version:
            return False
        if setting.sample_rate < 1 and random.random() >= setting.sample_rate:
            return False
        args = (screening.id, model_input, baseline.id, setting)
        if self._submit(lambda: self._grade(*args)):
            return True
        metrics.SHADOW.labels("dropped_queue_full").inc()
        return False

    def seen(self, version: str) -> None:
        """Load this version's card into the drift gauges once per process, in the background."""
        if version in self._cards_seen:
            return
        self._cards_seen.add(version)
        self._submit(lambda: self._load_card(version))

    def trial(self, screening: Screening, model_input: tuple[bytes, str], version: str) -> ShadowGrading:
        """An admin's re-grade with a named version: stored as a shadow answer, not clinical.
        TorchServe's exceptions pass through with nothing written."""
        prediction = self.client.predict(*model_input, version)
        with db.atomic():
            return store(prediction, screening.id, latest_clinical(screening), version, self.client.model_name,
                         "regrade")

    def drain(self, timeout: float = 30) -> None:
        """Wait until the queue is empty (tests, benchmarks, shutdown)."""
        q = self._queue
        deadline = time.monotonic() + timeout
        while q is not None and q.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)

    def _submit(self, job) -> bool:
        q = self._ensure_thread()
        try:
            q.put_nowait(job)
            return True
        except queue.Full:
            return False

    def _ensure_thread(self) -> queue.Queue:
        pid = os.getpid()
        if self._pid != pid:
            with self._lock:
                if self._pid != pid:  # a new process: the parent's thread did not come along
                    self._queue = queue.Queue(maxsize=self.queue_size)
                    threading.Thread(target=self._run, args=(self._queue,), name="clarity-shadow",
                                     daemon=True).start()
                    self._pid = pid
        return self._queue

    def _run(self, q: queue.Queue) -> None:
        while True:
            job = q.get()
            try:
                job()
            except Exception:
                log.exception("background job failed")
            finally:
                if not db.is_closed():
                    db.close()  # back to the pool
                q.task_done()

    def _grade(self, screening_id, model_input: tuple[bytes, str], baseline_id, setting: Active) -> None:
        if not wait_quiet(QUIET_WAIT_SECONDS):
            metrics.SHADOW.labels("dropped_busy").inc()
            return
        try:
            prediction = self.client.predict(*model_input, setting.version)
        except (TorchServeUnavailable, UnknownModelVersion, ImageRejected) as exc:
            metrics.SHADOW.labels("dropped_error").inc()
            log.warning("shadow grading dropped", extra={"screening_id": str(screening_id),
                                                         "model_version": setting.version,
                                                         "error_type": type(exc).__name__})
            return
        try:
            with db.atomic():
                store(prediction, screening_id, Grading(id=baseline_id), setting.version, setting.model_name,
                      "shadow")
        except peewee.IntegrityError:  # the photograph was deleted meanwhile
            metrics.SHADOW.labels("dropped_error").inc()
            return
        metrics.SHADOW.labels("graded").inc()

    def _load_card(self, version: str) -> None:
        try:
            set_card_gauges(version, self.client.metadata(version))
        except (TorchServeUnavailable, UnknownModelVersion, AttributeError):
            self._cards_seen.discard(version)  # try again with a later grading
