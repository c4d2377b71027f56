"""Results back to the PACS: the exam's PDF report as DICOM Encapsulated PDF in the same study.

When an exam that came in as DICOM (its photographs have a StudyInstanceUID) is graded, the
receiver wraps the exam's PDF report (control_api/report.py) in an Encapsulated PDF Storage
object (1.2.840.10008.5.1.4.1.1.104.1) of that study and C-STOREs it to DICOM_REPORT_DESTINATION
(`AE@host:port`; empty sends nothing).

"Graded" means: no photograph pending and both eyes have photographs (a study still arriving
eye by eye would otherwise get a report saying "retake"). A report is sent once per set of
gradings; a photograph added or re-graded later sends a new report (a new SOP instance in a new
series). Each attempt tries 3 times a few seconds apart; a failure is retried by the receiver's
sweep, up to MAX_ATTEMPTS, then stays `failed`. The exam JSON shows the state as `dicom_report`.
"""
from __future__ import annotations

import hashlib
import io
import logging
import time
from datetime import datetime

from pydicom import uid as uids
from pydicom.dataset import Dataset, FileMetaDataset
from pynetdicom import AE

from .models import DicomInstance, DicomReport, Exam, Screening, utcnow

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 10
TRIES_PER_ATTEMPT = 3
TITLE = "Diabetic retinopathy screening report"


class DestinationError(Exception):
    """The destination could not be reached or refused the object; `code` says how."""

    def __init__(self, code: str):
        super().__init__(code)
        self.code = code


def parse_destination(value: str) -> tuple[str, str, int] | None:
    """`AE@host:port` -> (ae, host, port); empty -> None."""
    if not value:
        return None
    ae, _, address = value.partition("@")
    host, _, port = address.rpartition(":")
    if not ae or not host or not port.isdigit() or len(ae) > 16:
        raise ValueError("DICOM_REPORT_DESTINATION must look like AE@host:port")
    return ae, host, int(port)


def study_of(exam: Exam) -> str | None:
    row = (DicomInstance.select(DicomInstance.study_instance_uid).join(Screening)
           .where(Screening.exam == exam.id).first())
    return row.study_instance_uid if row else None


def due(result) -> bool:
    return result.outcome != "pending" and all(e.status != "missing" for e in result.eyes.values())


def fingerprint(result) -> str:
    parts = sorted(f"{s.id}:{s.latest_grading.id if s.latest_grading else '-'}" for s in result.images)
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


def encapsulated_pdf(pdf: bytes, exam: Exam, study_uid: str, our_ae: str) -> bytes:
    """A Part 10 Encapsulated PDF object of the exam's study, for the PACS to file with the images."""
    patient = exam.patient
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = uids.EncapsulatedPDFStorage
    meta.MediaStorageSOPInstanceUID = uids.generate_uid()
    meta.TransferSyntaxUID = uids.ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = uids.EncapsulatedPDFStorage, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, uids.generate_uid()
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "DOC", 900, 1
    ds.PatientID = patient.mrn or ""
    ds.PatientName = _person_name(patient.name)
    ds.PatientBirthDate = patient.birth_date.strftime("%Y%m%d") if patient.birth_date else ""
    ds.PatientSex = {"female": "F", "male": "M", "other": "O"}.get(patient.sex or "", "")
    ds.AccessionNumber = exam.accession_number or ""
    ds.StudyDate = exam.performed_at.strftime("%Y%m%d")
    ds.StudyTime = exam.performed_at.strftime("%H%M%S")
    ds.StudyID, ds.ReferringPhysicianName = "", ""
    now = datetime.utcnow()
    ds.ContentDate, ds.ContentTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds.AcquisitionDateTime = now.strftime("%Y%m%d%H%M%S")
    ds.Manufacturer = "Clarity in Care"
    ds.ConversionType = "WSD"  # workstation
    ds.DocumentTitle = TITLE
    ds.BurnedInAnnotation = "YES"  # the PDF names the patient
    ds.ConceptNameCodeSequence = []
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocument = pdf + (b"\0" if len(pdf) % 2 else b"")
    ds.EncapsulatedDocumentLength = len(pdf)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _person_name(name: str | None) -> str:
    """"Given Family" as DICOM's Family^Given (the record keeps one free-text name)."""
    parts = (name or "").split()
    return f"{parts[-1]}^{' '.join(parts[:-1])}" if len(parts) > 1 else (name or "")


def send(data: bytes, destination: tuple[str, str, int], our_ae: str) -> None:
    """C-STORE one Part 10 object; DestinationError unless the destination answers Success."""
    from pydicom import dcmread

    ae_title, host, port = destination
    ae = AE(ae_title=our_ae)
    ae.add_requested_context(uids.EncapsulatedPDFStorage, uids.ExplicitVRLittleEndian)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    assoc = ae.associate(host, port, ae_title=ae_title)
    if not assoc.is_established:
        raise DestinationError("association_refused" if assoc.is_rejected else "unreachable")
    try:
        status = assoc.send_c_store(dcmread(io.BytesIO(data)))
    except (ValueError, RuntimeError):
        raise DestinationError("context_refused") from None
    finally:
        assoc.release()
    code = int(status.Status) if "Status" in status else None
    if code not in (0x0000, 0xB000, 0xB007, 0xB006):  # success, or success with warnings
        raise DestinationError(f"status_{code:04x}" if code is not None else "no_response")


def deliver(result, destination, our_ae: str, render, on_sent=None) -> DicomReport | None:
    """Send the exam's report if it is due and not sent for these gradings. `render(result)`
    makes the PDF. Returns the DicomReport row (None when nothing is due)."""
    exam = result.exam
    study = study_of(exam)
    if destination is None or study is None or not due(result):
        return None
    fp = fingerprint(result)
    row = DicomReport.get_or_none(DicomReport.exam == exam.id)
    if row is None:
        row = DicomReport.create(exam=exam, status="pending", attempts=0, images_fingerprint=fp)
    elif row.images_fingerprint != fp:
        row.status, row.attempts, row.images_fingerprint, row.last_error = "pending", 0, fp, None
    elif row.status == "sent" or row.attempts >= MAX_ATTEMPTS:
        return row
    data = encapsulated_pdf(render(result), exam, study, our_ae)
    error = None
    for attempt in range(TRIES_PER_ATTEMPT):
        try:
            send(data, destination, our_ae)
            error = None
            break
        except DestinationError as exc:
            error = exc.code
        except OSError as exc:
            error = type(exc).__name__
        time.sleep(1 + attempt)
    row.attempts += 1
    row.updated_at = utcnow()
    if error is None:
        row.status, row.sent_at, row.last_error = "sent", utcnow(), None
        if on_sent:
            on_sent(row)
    else:
        row.status, row.last_error = "failed", error[:64]
        log.warning("report not delivered to the PACS", extra={"exam_id": str(exam.id), "code": row.last_error,
                                                              "attempts": row.attempts})
    row.save()
    return row


def state(exam: Exam) -> dict | None:
    """`dicom_report` in the exam JSON: null unless a report was (or is being) sent to the PACS."""
    if "_dicom_report_row" in exam.__dict__:  # a listed page: attached in one query (outcome.py)
        row = exam.__dict__["_dicom_report_row"]
    else:
        row = DicomReport.get_or_none(DicomReport.exam == exam.id)
    if row is None:
        return None
    return {"status": row.status, "attempts": row.attempts, "sent_at": row.sent_at, "last_error": row.last_error}
