"""Exams (visits): open one, list and read them with each eye's result and the outcome, add
photographs, and export one as a PDF report or a FHIR R4 Bundle.

A photograph is a Screening row with an exam; uploading goes through the same function as the
screenings route (upload.upload_photograph), so checks, idempotency and clean-up are one.
The accession number is PHI-like: it is stored and returned, never logged or put in a URL.
"""
from __future__ import annotations

import hashlib
import json
import logging
import uuid

import peewee
from flask import Response, g, json as flask_json

from .. import fhir, outcome, report, schemas
from ..audit import audited, target
from ..auth import CLINICAL, roles
from ..db import db
from ..errors import ApiError
from ..models import Exam, utcnow
from ..pagination import page
from ..upload import read_idempotency_key, upload_photograph
from . import Blueprint
from .patients import get_patient
from .screenings import IDEMPOTENCY_HEADER, answer, photograph_route

log = logging.getLogger(__name__)

blp = Blueprint("exams", __name__, url_prefix="/api/v1/patients/<uuid:patient_id>/exams",
                description="Exams (visits): both eyes' photographs, one outcome, report and FHIR export")


def get_exam(patient_id, exam_id) -> Exam:
    exam = Exam.get_or_none((Exam.id == exam_id) & (Exam.patient == patient_id))
    if exam is None:
        get_patient(patient_id)  # a missing patient is the better message
        raise ApiError(404, "exam_not_found", "This patient has no exam with this id.")
    return exam


def _location(exam: Exam) -> str:
    return f"/api/v1/patients/{exam.patient_id}/exams/{exam.id}"


def _fingerprint(patient_id, data: dict) -> str:
    performed = data.get("performed_at")
    parts = [str(patient_id), performed.isoformat() if performed else None, data.get("accession_number")]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def _previous(idempotency_key: str, fingerprint: str) -> Exam | None:
    earlier = Exam.get_or_none((Exam.created_by == g.api_key.id) & (Exam.idempotency_key == idempotency_key))
    if earlier is not None and earlier.request_fingerprint != fingerprint:
        raise ApiError(409, "idempotency_key_reused", "This Idempotency-Key was already used for a different exam.")
    return earlier


def _replay(exam: Exam):
    target(resource_id=exam.id)
    return outcome.as_json(outcome.evaluate(exam)), 201, {"Location": _location(exam),
                                                          "Idempotent-Replayed": "true"}


@blp.route("", methods=["POST"])
@roles(*CLINICAL)
@audited("exam.create", "exam")
@blp.arguments(schemas.ExamCreate)
@blp.response(201, schemas.Exam)
@blp.doc(parameters=[IDEMPOTENCY_HEADER])
def create_exam(data, patient_id):
    """Open an exam (a visit); then add its photographs with POST .../exams/{exam_id}/images."""
    patient = get_patient(patient_id)
    idempotency_key = read_idempotency_key()
    fingerprint = _fingerprint(patient.id, data)
    if idempotency_key and (earlier := _previous(idempotency_key, fingerprint)):
        return _replay(earlier)
    exam = Exam(id=uuid.uuid4(), patient=patient, performed_at=data.get("performed_at") or utcnow(),
                accession_number=data.get("accession_number"), created_by=g.api_key.id,
                idempotency_key=idempotency_key, request_fingerprint=fingerprint)
    try:
        with db.atomic():
            exam.save(force_insert=True)
    except peewee.IntegrityError:
        earlier = _previous(idempotency_key, fingerprint) if idempotency_key else None
        if earlier is None:
            raise
        return _replay(earlier)
    target(resource_id=exam.id)
    log.info("exam created", extra={"exam_id": str(exam.id), "patient_id": str(patient.id)})
    return outcome.as_json(outcome.evaluate(exam)), 201, {"Location": _location(exam)}


@blp.route("", methods=["GET"])
@roles(*CLINICAL)
@audited("exam.list", "patient")
@blp.arguments(schemas.PageArgs, location="query")
@blp.response(200, schemas.ExamPage)
def list_exams(args, patient_id):
    """The patient's exams, latest visit first."""
    patient = get_patient(patient_id)
    rows, next_cursor = page(Exam.select().where(Exam.patient == patient), (Exam.performed_at, Exam.id),
                             args.get("cursor"), args["limit"])
    return {"items": [outcome.as_json(r) for r in outcome.evaluate_many(rows)], "next_cursor": next_cursor}


@blp.route("/<uuid:exam_id>", methods=["GET"])
@roles(*CLINICAL)
@audited("exam.read", "exam")
@blp.response(200, schemas.Exam)
def read_exam(patient_id, exam_id):
    return outcome.as_json(outcome.evaluate(get_exam(patient_id, exam_id)))


@photograph_route(blp, "/<uuid:exam_id>/images", schemas.ExamImageUpload)
def add_image(form, patient_id, exam_id):
    """Add one photograph (one eye, one field) to the exam; the answer is the photograph."""
    exam = get_exam(patient_id, exam_id)
    return answer(*upload_photograph(exam.patient, form, exam))


@blp.route("/<uuid:exam_id>/report", methods=["GET"])
@roles(*CLINICAL)
@audited("exam.report.read", "exam")
@blp.response(200, content_type="application/pdf",
              description="The report for the chart: patient identity, each eye's photographs, grade, quality "
                          "and Grad-CAM overlay, the outcome, the model")
def read_report(patient_id, exam_id):
    exam = get_exam(patient_id, exam_id)
    pdf = report.render(exam.patient, outcome.evaluate(exam))
    return Response(pdf, mimetype="application/pdf",
                    headers={"Content-Disposition": f'inline; filename="exam-{exam.id}.pdf"'})


@blp.route("/<uuid:exam_id>/fhir", methods=["GET"])
@roles(*CLINICAL)
@audited("exam.fhir.read", "exam")
@blp.arguments(schemas.FhirArgs, location="query")
@blp.response(200, content_type=fhir.CONTENT_TYPE,
              description="A FHIR R4 Bundle (collection): DiagnosticReport, Patient, Device, one Observation per "
                          "eye (LOINC 71490-7 / 71491-5) and one for the exam (LOINC 105914-6)")
def read_fhir(args, patient_id, exam_id):
    exam = get_exam(patient_id, exam_id)
    result = outcome.evaluate(exam)
    pdf = report.render(exam.patient, result) if args["include_pdf"] else None
    body = fhir.bundle(exam.patient, result, pdf)
    return Response(flask_json.dumps(body), mimetype=fhir.CONTENT_TYPE)
