"""The one module that talks to TorchServe.

TorchServe is archived upstream; moving to another server (e.g. one speaking the Open
Inference Protocol) means rewriting this file and nothing else. The rest of the API sees
`TorchServeClient.predict()` returning the prediction dict of docs/contracts.md §4,
`explain()` returning it with a Grad-CAM explanation,
`models()` and `ready()`, and the three exceptions below.

TorchServe's token authorization is on: every call carries the inference or management key
from TorchServe's key file, renewed when TorchServe refuses it (torchserve_keys.py).
"""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass

import requests
from flask import current_app
from requests.adapters import HTTPAdapter
from tenacity import retry, retry_if_exception_type, stop_after_attempt, wait_exponential

from . import metrics
from .torchserve_keys import KeyFileError, TorchServeKeys, refused


class TorchServeUnavailable(Exception):
    """Down, timed out, overloaded or answering 5xx: try again later. `reached` says whether
    TorchServe got the request (a 5xx or a timeout: counted against the screening's attempts)
    or not (unreachable, or this process already has as many calls in flight as it allows)."""

    def __init__(self, message: str, *, reached: bool = False):
        super().__init__(message)
        self.reached = reached


class ImageRejected(Exception):
    """The model server refused this one image (its 4xx); retrying will not help. Arguments by name,
    in the order of the handler's own fundus.ImageRejected(code, status, message)."""

    def __init__(self, *, code: str, status: int, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class UnknownModelVersion(Exception):
    def __init__(self, version: str | None):
        super().__init__(f"model version {version!r} is not registered")
        self.version = version


@dataclass(frozen=True)
class ModelVersion:
    version: str
    default: bool
    ready_workers: int
    workers: int
    batch_size: int | None
    max_batch_delay_ms: int | None


NOT_FOUND = ("ModelNotFoundException", "ModelVersionNotFoundException")
# How long an API process trusts the default version it last read (the result cache's key).
DEFAULT_VERSION_TTL_SECONDS = 5.0

# At the in-flight bound, an upload waits this long for a slot unless TorchServe looks hung: a
# busy TorchServe frees a slot within one inference, and turning such an upload away made a
# healthy, merely busy system answer 202 pending (5-18% of uploads at 8 concurrent clients on
# 2 cores, and the first burst after an idle spell). Hung means no answer for
# ANSWERING_WINDOW_SECONDS while a prediction was in flight: then nothing waits and extra
# uploads are pending at once as before, so a thread stays free for /healthz.
ADMISSION_WAIT_SECONDS = 1.0
ANSWERING_WINDOW_SECONDS = 1.0

# Only a refused or reset connection is retried: the request never reached a worker, so
# asking again cannot double any work. A timeout is not retried, it already cost the budget.
_retry_connect = retry(retry=retry_if_exception_type(requests.ConnectionError),
                       stop=stop_after_attempt(3), wait=wait_exponential(multiplier=0.1, max=0.5),
                       reraise=True)


class Admission:
    """At most `slots` predictions of one process in flight, and what tells busy from hung: when
    each thread's prediction was sent and when TorchServe last answered (ADMISSION_WAIT_SECONDS
    says why)."""

    def __init__(self, slots: int):
        self.slots = threading.BoundedSemaphore(slots)
        self.lock = threading.Lock()
        self.sent: dict[int, float] = {}  # thread -> time.monotonic() its prediction was sent
        self.last_answer = float("-inf")  # time.monotonic() of TorchServe's latest answer

    def enter(self) -> bool:
        """A slot for this thread's prediction: at once if one is free, else after a short wait
        unless TorchServe looks hung; False when none came."""
        if not self.slots.acquire(blocking=False):
            now = time.monotonic()
            with self.lock:
                oldest = min(self.sent.values(), default=now)
            # Silent since the oldest prediction in flight was sent (or since its last answer,
            # if that came later) for longer than the window: hung, not busy.
            if now - max(self.last_answer, oldest) >= ANSWERING_WINDOW_SECONDS:
                return False
            if not self.slots.acquire(timeout=ADMISSION_WAIT_SECONDS):
                return False
        with self.lock:
            self.sent[threading.get_ident()] = time.monotonic()
        return True

    def answered(self) -> None:
        self.last_answer = time.monotonic()

    def leave(self) -> None:
        with self.lock:
            self.sent.pop(threading.get_ident(), None)
        self.slots.release()


class TorchServeClient:
    def __init__(self, inference_url: str, management_url: str, model_name: str, timeout: float,
                 pool_size: int = 16, max_in_flight: int | None = None, key_file: str = ""):
        # At most this many predictions at once per process: with TorchServe hung, the other
        # threads stay free for probes and reads, and further uploads are kept pending (202)
        # at once instead of each waiting out the timeout.
        self.admission = Admission(max_in_flight) if max_in_flight else None
        self.inference_url = inference_url.rstrip("/")
        self.management_url = management_url.rstrip("/")
        self.model_name = model_name
        self.timeout = timeout
        # One pooled session per process: keep-alive saves a TCP handshake per prediction.
        self.session = requests.Session()
        adapter = HTTPAdapter(pool_connections=2, pool_maxsize=pool_size)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self._default: tuple[str | None, float] | None = None  # (version, when read)
        # TorchServe's token authorization: the keys from its key file (torchserve_keys.py).
        self.keys = TorchServeKeys(key_file, self.management_url)

    def predict(self, image: bytes, content_type: str, version: str | None = None) -> dict:
        return self._ask("predictions", image, content_type, version)

    def explain(self, image: bytes, content_type: str, version: str | None = None) -> dict:
        """The prediction plus `explanation` (Grad-CAM: `map`, `crop_box`, ...; null when the
        image is ungradable), from TorchServe's explanations API."""
        return self._ask("explanations", image, content_type, version)

    def _ask(self, api: str, image: bytes, content_type: str, version: str | None) -> dict:
        url = f"{self.inference_url}/{api}/{self.model_name}" + (f"/{version}" if version else "")
        operation = "predict" if api == "predictions" else "explain"
        if self.admission is not None and not self.admission.enter():
            metrics.TORCHSERVE_SECONDS.labels(operation, "busy").observe(0)
            raise TorchServeUnavailable("this process already waits on as many predictions as it allows")
        started = time.perf_counter()
        outcome = "error"
        try:
            response = self._post(url, image, content_type)
            if self.admission is not None:
                self.admission.answered()
            outcome = str(response.status_code)
            return self._prediction(response, version)
        except requests.Timeout:
            outcome = "timeout"
            raise TorchServeUnavailable(f"TorchServe did not answer within {self.timeout:g} s",
                                        reached=True) from None
        except requests.ConnectionError:
            outcome = "unreachable"
            raise TorchServeUnavailable("TorchServe is unreachable") from None
        finally:
            metrics.TORCHSERVE_SECONDS.labels(operation, outcome).observe(time.perf_counter() - started)
            if self.admission is not None:
                self.admission.leave()

    def _post(self, url: str, image: bytes, content_type: str) -> requests.Response:
        return self._with_key("inference", lambda auth: self._send_post(url, image, content_type, auth))

    @_retry_connect
    def _send_post(self, url: str, image: bytes, content_type: str, auth: dict) -> requests.Response:
        return self.session.post(url, data=image, headers={"Content-Type": content_type, **auth},
                                 timeout=(3, self.timeout))

    def _with_key(self, kind: str, send) -> requests.Response:
        """send(auth headers) with the key held; when TorchServe refuses it (expired, renewed by
        another process, or TorchServe restarted with new keys), renew it and send once more.
        A key problem is a 503 for this request, never a lasting state: the next request reads
        the file again."""
        try:
            key = self.keys.key(kind)
            response = send(self.keys.headers(key))
            if not refused(response):
                return response
            self.keys.renew(kind, key)
            response = send(self.keys.headers(self.keys.key(kind)))
        except KeyFileError as exc:
            raise TorchServeUnavailable(f"TorchServe {kind} key: {exc}") from None
        if refused(response):
            raise TorchServeUnavailable(f"TorchServe refused the {kind} key just renewed")
        return response

    def _prediction(self, response: requests.Response, version: str | None) -> dict:
        body = _json(response)
        if response.status_code == 200 and isinstance(body, dict) and "gradable" in body:
            return body
        if response.status_code == 404 and isinstance(body, dict) and body.get("type") in NOT_FOUND:
            raise UnknownModelVersion(version)
        if response.status_code in (400, 413, 415, 422):
            # Our handler answers {"code": "...", "message": "..."}; TorchServe's own 413 is bare.
            body = body if isinstance(body, dict) else {}
            code = body.get("code") if isinstance(body.get("code"), str) else "rejected_by_model_server"
            raise ImageRejected(code=code, status=response.status_code,
                                message=body.get("message") or "The model server refused the image.")
        if response.status_code == 500 and isinstance(body, dict) and isinstance(body.get("code"), str):
            # Our handler failed on this one image (context.set_response_status, the others in
            # its batch were answered): the image, not the server. Asking again gives the same
            # answer, so it is a rejection, not "TorchServe unavailable" (which kept it pending
            # and stopped grade-pending at it for ever).
            raise ImageRejected(code=body["code"], status=500,
                                message=body.get("message") or "The model failed on this image.")
        raise TorchServeUnavailable(f"TorchServe answered {response.status_code}", reached=True)

    def _get(self, path: str) -> requests.Response:
        return self._with_key("management", lambda auth: self._send_get(path, auth))

    @_retry_connect
    def _send_get(self, path: str, auth: dict) -> requests.Response:
        return self.session.get(f"{self.management_url}{path}", headers=auth, timeout=(3, 10))

    def describe(self, version: str | None = None, customized: bool = False) -> list[dict]:
        """TorchServe's model description (GET /models/NAME[/VERSION])."""
        path = f"/models/{self.model_name}" + (f"/{version}" if version else "") + \
            ("?customized=true" if customized else "")
        started = time.perf_counter()
        outcome = "error"
        try:
            response = self._get(path)
            outcome = str(response.status_code)
        except requests.RequestException:
            outcome = "unreachable"
            raise TorchServeUnavailable("TorchServe management API is unreachable") from None
        finally:
            metrics.TORCHSERVE_SECONDS.labels("describe", outcome).observe(time.perf_counter() - started)
        if response.status_code == 404:
            raise UnknownModelVersion(version)
        body = _json(response)
        if response.status_code != 200 or not isinstance(body, list):
            raise TorchServeUnavailable(f"TorchServe management answered {response.status_code}")
        return body

    def models(self) -> list[ModelVersion]:
        default = {m.get("modelVersion") for m in self.describe()}
        return [ModelVersion(
            version=str(m.get("modelVersion")), default=m.get("modelVersion") in default,
            ready_workers=_ready_workers(m), workers=len(m.get("workers") or []),
            batch_size=m.get("batchSize"), max_batch_delay_ms=m.get("maxBatchDelay"),
        ) for m in self.describe("all")]

    def default_model_version(self) -> str | None:
        """The default version, read at most every DEFAULT_VERSION_TTL_SECONDS; None when unknown.

        Promotions go straight to TorchServe (scripts.models), so the API re-reads rather than
        being told: a new default is seen within the TTL."""
        now = time.monotonic()
        if self._default is None or now - self._default[1] > DEFAULT_VERSION_TTL_SECONDS:
            try:
                described = self.describe()
                version = str(described[0]["modelVersion"]) if described else None
            except (TorchServeUnavailable, UnknownModelVersion, KeyError, TypeError):
                version = None
            self._default = (version, now)
        return self._default[0]

    def metadata(self, version: str) -> dict:
        """The version's model_meta.json (provenance, and held-out metrics when the archive has
        them), as the handler answers TorchServe's customized description. Runs on a worker."""
        body = self.describe(version, customized=True)
        meta = body[0].get("customizedMetadata") if body else None
        if isinstance(meta, str):
            meta = _json_text(meta)
        return meta if isinstance(meta, dict) else {}

    def ready(self) -> bool:
        """The default version has a READY worker (TorchServe's /ping is healthy before that)."""
        return any(_ready_workers(m) for m in self.describe())


def _ready_workers(description: dict) -> int:
    return sum(1 for w in description.get("workers") or [] if w.get("status") == "READY")


def _json_text(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return None


def _json(response: requests.Response):
    try:
        return response.json()
    except ValueError:
        return None


def from_settings(settings, bounded: bool = True) -> TorchServeClient:
    return TorchServeClient(settings.torchserve_inference_url, settings.torchserve_management_url,
                            settings.torchserve_model_name, settings.torchserve_timeout_seconds,
                            pool_size=max(4, settings.gunicorn_threads * 2),
                            max_in_flight=settings.torchserve_max_in_flight_effective if bounded else None,
                            key_file=settings.torchserve_key_file)


def get_client() -> TorchServeClient:
    return current_app.extensions["clarity"]["torchserve"]
