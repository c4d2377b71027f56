"""The DICOM receiver: a C-STORE SCP (pynetdicom) for fundus cameras and PACS, a process of its own.

Run it with `flask --app control_api dicom-receiver`. It shares the API's settings, database,
image storage and TorchServe client, and adds DICOM_HOST/PORT, DICOM_AE_TITLE,
DICOM_ALLOWED_AE_TITLES, DICOM_SPOOL_DIR and DICOM_HEALTH_PORT.

What a store goes through, and what the sender hears:
1. Association: the calling AE title must be in DICOM_ALLOWED_AE_TITLES (an empty list refuses
   every association) and the called AE title must be DICOM_AE_TITLE; otherwise A-ASSOCIATE-RJ.
   Only the accepted SOP classes (control_api/dicom.py) and Verification are negotiated.
2. C-STORE: the file is checked exactly as an HTTP upload is (`dicom.read`, the JPEG frame
   decoded at 1/8 scale). A bad file gets a failure status (dicom.DICOM_STATUS) with its error
   code in ErrorComment, and nothing is kept. A file without PatientID or without laterality
   is refused too: the receiver has no form to ask.
3. A good file is written to the spool directory (temporary name, fsync, rename, fsync of the
   directory) and only then answered Success (0x0000). If the spool cannot be written, the
   answer is 0xA700 (out of resources) and the sender keeps its copy and retries.
4. The ingest thread takes spool files in arrival order: the patient by PatientID (the record
   number; an unknown one is created from the header, see below), the exam of the study (one
   exam per StudyInstanceUID, opened by its first image, with the header's AccessionNumber),
   the object into storage, the screening and dicom_instance rows and their audit rows in one
   transaction, the spool file
   removed, then grading. While the database or storage is down, files stay in the spool and are
   retried with backoff; /readyz says so. While TorchServe is down, screenings stay `pending`
   and this thread grades them when it answers again (as `flask grade-pending` would).
   A Success answer is therefore never lost: the file is on disk before the answer, and it
   leaves the spool only after the database holds it.
A second store of the same SOP Instance UID is answered Success and changes nothing.

When an exam of a received study is graded (both eyes, nothing pending) and
DICOM_REPORT_DESTINATION is set, its PDF report goes back to the PACS as Encapsulated PDF in the
same study (control_api/dicom_report.py), retried on later sweeps until sent; the exam JSON
shows `dicom_report`.

Unknown PatientID: the patient is created from the header (name, birth date, sex, record
number). A camera's worklist gives the PatientID the clinic's system uses, so a new one is a
new patient, not a guess; an existing patient is matched on the record number only and never
updated from a header. Every action is audited under the receiver's own identity, an API-key
row (prefix `dicom-receiver`) that has no token and is revoked from birth, so it cannot sign in.

Nothing from the header (names, PatientID, birth date, accession number, UIDs) is logged or
used in a metric label; log lines name spool items and screenings by UUID.
"""
from __future__ import annotations

import json
import logging
import queue
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import peewee
from prometheus_client import Counter, Gauge, Histogram
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification

from . import dicom, dicom_report, metrics
from .dicom_ingest import Spool, audit, grade_screening, ingest, receiver_key, send_report
from .db import db
from .errors import ApiError
from .models import DicomInstance, DicomReport, Screening
from .storage import StorageError

log = logging.getLogger(__name__)

ASSOCIATIONS = Counter("clarity_dicom_associations_total", "DICOM associations by outcome", ["outcome"])
STORES = Counter("clarity_dicom_stores_total", "C-STORE requests by outcome (stored, or the refusal code)",
                 ["outcome"])
ECHOES = Counter("clarity_dicom_echoes_total", "C-ECHO requests answered")
INGESTED = Counter("clarity_dicom_ingested_total", "Spooled files moved into the database, by outcome",
                   ["outcome"])
SPOOL_BACKLOG = Gauge("clarity_dicom_spool_backlog", "Files received and not yet in the database",
                      multiprocess_mode="livemax")
STORE_TO_GRADED = Histogram("clarity_dicom_store_to_graded_seconds", "From C-STORE success to a graded screening",
                            buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 3600))
OUT_OF_RESOURCES = 0xA700
RETRY_SECONDS = (1, 2, 5, 10, 30)


# --------------------------------------------------------------------------- the process

class _ReceiverAE(AE):
    """pynetdicom accepts every calling AE title when require_calling_aet is empty; here an
    empty list refuses every association instead."""

    allowed: list[str] = []

    @property
    def require_calling_aet(self):
        return self.allowed if self.allowed else _RefuseAll()

    @require_calling_aet.setter
    def require_calling_aet(self, value):
        self.allowed = list(value)


class _RefuseAll(list):
    def __bool__(self):  # non-empty for "is a list required?", matching no title
        return True


class Receiver:
    def __init__(self, app):
        self.app = app
        self.settings = app.extensions["clarity"]["settings"]
        self.spool = Spool(self.settings.dicom_spool_dir)
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.refusals: queue.Queue = queue.Queue()
        self.problem: str | None = None  # why ingest is stalled, for /readyz
        self.server = None
        self.http = None
        self.threads: list[threading.Thread] = []

    # -- DICOM side (runs in pynetdicom's association threads: no database work here)
    def on_echo(self, event):
        ECHOES.inc()
        return 0x0000

    def on_store(self, event):
        calling = event.assoc.requestor.ae_title.strip()
        try:
            data = event.encoded_dataset(include_meta=True)
            image = dicom.read(data, check_pixels=True)
            if not image.patient.patient_id:
                raise ApiError(422, "dicom_missing_patient_id", "The header has no PatientID.")
            if not image.eye:
                raise ApiError(422, "laterality_missing", "The header has no ImageLaterality or Laterality (L or R).")
        except ApiError as exc:
            return self._refuse(exc.code, exc.message)
        except Exception as exc:  # noqa: BLE001 - a file we cannot read is the sender's to fix
            log.warning("store could not be read", extra={"error_type": type(exc).__name__})
            return self._refuse("dicom_unreadable", "The data set cannot be read.")
        try:
            item = self.spool.put(data, calling)
        except OSError as exc:
            STORES.labels("out_of_resources").inc()
            log.error("spool write failed", extra={"error_type": type(exc).__name__})
            return _status(OUT_OF_RESOURCES, "spool_unavailable")
        STORES.labels("stored").inc()
        SPOOL_BACKLOG.set(len(self.spool.items()))
        log.info("store received", extra={"spool_item": item, "sop_class": dicom._uid_name(image.sop_class_uid),
                                          "bytes": len(data)})
        self.wake.set()
        return 0x0000

    def _refuse(self, code: str, message: str):
        STORES.labels(code).inc()
        self.refusals.put(code)
        log.info("store refused", extra={"code": code})
        return _status(dicom.DICOM_STATUS.get(code, 0xC000), code)

    def on_association(self, outcome: str):
        def handler(event):
            ASSOCIATIONS.labels(outcome).inc()
            log.info("association " + outcome, extra={"calling_ae": event.assoc.requestor.ae_title.strip()})
        return handler

    # -- ingest thread
    def ingest_loop(self):
        failures = 0
        last_pending_sweep = 0.0
        while not self.stopping.is_set():
            self.wake.wait(timeout=5)
            self.wake.clear()
            with self.app.app_context():
                try:
                    self._write_refusals()
                    for item in self.spool.items():
                        if self.stopping.is_set():
                            return
                        self._ingest_one(item)
                    if time.monotonic() - last_pending_sweep > 30:
                        last_pending_sweep = time.monotonic()
                        self._grade_pending()
                    failures, self.problem = 0, None
                except (peewee.PeeweeException, StorageError, OSError) as exc:
                    failures += 1
                    self.problem = f"ingest stalled: {type(exc).__name__}"
                    log.warning("ingest stalled; files stay in the spool",
                                extra={"error_type": type(exc).__name__, "backlog": len(self.spool.items())})
                    self.stopping.wait(RETRY_SECONDS[min(failures, len(RETRY_SECONDS)) - 1])
                finally:
                    SPOOL_BACKLOG.set(len(self.spool.items()))
                    if not db.is_closed():
                        db.close()

    def _ingest_one(self, item: str) -> None:
        data, meta = self.spool.read(item)
        request_id = f"dicom-{item}"
        result = ingest(data, meta.get("calling_ae"), request_id)
        self.spool.remove(item)  # only now: the database holds it
        INGESTED.labels(result.outcome).inc()
        log.info("store ingested", extra={"spool_item": item, "outcome": result.outcome,
                                          "screening_id": str(result.screening.id)})
        if result.outcome == "stored":
            status = grade_screening(result.screening, request_id)
            if status in ("graded", "ungradable") and meta.get("received"):
                STORE_TO_GRADED.observe(time.time() - meta["received"])
            log.info("received photograph graded" if status != "pending" else "grading deferred",
                     extra={"screening_id": str(result.screening.id), "status": status})
            if status != "pending":
                send_report(Screening.get_by_id(result.screening.id).exam, request_id)

    def _grade_pending(self) -> None:
        """Screenings the receiver stored while TorchServe was down."""
        pending = (Screening.select(Screening.id).join(DicomInstance)
                   .where((Screening.status == "pending") & (DicomInstance.source == "receiver"))
                   .order_by(Screening.created_at).limit(100))
        for row in pending:
            if grade_screening(row, f"dicom-regrade-{row.id}") == "pending":
                return  # still down; try again on the next sweep
            send_report(Screening.get_by_id(row.id).exam, f"dicom-regrade-{row.id}")
        # Reports that could not be delivered yet.
        retry = DicomReport.select().where((DicomReport.status != "sent")
                                           & (DicomReport.attempts < dicom_report.MAX_ATTEMPTS)).limit(20)
        for row in retry:
            send_report(row.exam, f"dicom-report-{row.id}")

    def _write_refusals(self) -> None:
        key = None
        while True:
            try:
                code = self.refusals.get_nowait()
            except queue.Empty:
                return
            key = key or receiver_key()
            audit(key, "dicom.store", "screening", None, None, f"dicom-refused-{uuid.uuid4().hex[:12]}",
                  outcome="rejected")
            log.debug("refusal audited", extra={"code": code})

    # -- health
    def readiness(self) -> dict:
        checks = {}
        for name, check in (("spool", self.spool.check), ("database", self._db_check),
                            ("storage", lambda: self.app.extensions["clarity"]["storage"].check()),
                            ("scp", self._scp_check)):
            try:
                check()
                checks[name] = {"ok": True}
            except Exception as exc:  # noqa: BLE001
                checks[name] = {"ok": False, "problem": type(exc).__name__}
        if self.problem:
            checks["ingest"] = {"ok": False, "problem": self.problem}
        else:
            checks["ingest"] = {"ok": True}
        return {"status": "ready" if all(c["ok"] for c in checks.values()) else "not_ready",
                "backlog": len(self.spool.items()), "checks": checks}

    def _db_check(self):
        with self.app.app_context():
            try:
                db.execute_sql("SELECT 1")
            finally:
                db.close()

    def _scp_check(self):
        if self.server is None or not self.server.socket or self.server.socket.fileno() < 0:
            raise RuntimeError("not listening")

    # -- start/stop
    def start(self):
        settings = self.settings
        ae = _ReceiverAE(ae_title=settings.dicom_ae_title)
        ae.require_calling_aet = list(settings.dicom_allowed_ae_titles)
        ae.require_called_aet = True
        ae.maximum_pdu_size = 0  # no limit on PDU size from our side
        ae.add_supported_context(Verification)
        for sop_class in dicom.SOP_CLASSES:
            ae.add_supported_context(sop_class, list(dicom.TRANSFER_SYNTAXES))
        # No database work here: the receiver starts, and accepts stores, while the database is down.
        handlers = [(evt.EVT_C_ECHO, self.on_echo), (evt.EVT_C_STORE, self.on_store),
                    (evt.EVT_ACCEPTED, self.on_association("accepted")),
                    (evt.EVT_REJECTED, self.on_association("rejected"))]
        self.server = ae.start_server((settings.dicom_host, settings.dicom_port), block=False, evt_handlers=handlers)
        self.http = ThreadingHTTPServer((settings.dicom_host, settings.dicom_health_port), _health_handler(self))
        for target in (self.ingest_loop, self.http.serve_forever):
            thread = threading.Thread(target=target, daemon=True)
            thread.start()
            self.threads.append(thread)
        self.wake.set()  # files left in the spool by an earlier run go first
        log.info("dicom receiver listening", extra={"port": settings.dicom_port, "ae_title": settings.dicom_ae_title,
                                                    "health_port": settings.dicom_health_port,
                                                    "allowed_ae_titles": len(settings.dicom_allowed_ae_titles)})

    def stop(self):
        self.stopping.set()
        self.wake.set()
        if self.server:
            self.server.shutdown()
        if self.http:
            self.http.shutdown()
        for thread in self.threads:
            thread.join(timeout=30)


def _status(code: int, comment: str) -> Dataset:
    status = Dataset()
    status.Status = code
    status.ErrorComment = comment[:64]
    return status


def _health_handler(receiver: Receiver):
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            if self.path == "/healthz":
                self._send(200, "application/json", b'{"status": "ok"}')
            elif self.path == "/readyz":
                body = receiver.readiness()
                self._send(200 if body["status"] == "ready" else 503, "application/json", json.dumps(body).encode())
            elif self.path == "/metrics":
                self._send(200, metrics.CONTENT_TYPE, metrics.render())
            else:
                self._send(404, "application/json", b'{"status": "not found"}')

        def _send(self, status: int, content_type: str, body: bytes):
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # scrapes every few seconds: no access log
            pass

    return Handler


def quiet_libraries() -> None:
    # pynetdicom at DEBUG prints whole data sets (names, PatientID); not allowed in the logs.
    # (control_api/dicom.py quiets pydicom the same way.)
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)


def run(app) -> None:
    """The `dicom-receiver` command: serve until SIGTERM/SIGINT."""
    import signal

    quiet_libraries()
    receiver = Receiver(app)
    receiver.start()
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    log.info("dicom receiver stopping")
    receiver.stop()
