"""Patients: create, list, get, update, delete, and the summary of their latest exam."""
from __future__ import annotations

import logging

import peewee

from .. import schemas, summary
from ..audit import audited, target
from ..auth import CLINICAL, roles
from ..db import db
from ..errors import ApiError
from ..models import Exam, Grading, Patient, Screening, utcnow
from ..pagination import page
from ..ratelimit import delete_limit, limiter
from ..storage import get_storage
from . import Blueprint

log = logging.getLogger(__name__)

blp = Blueprint("patients", __name__, url_prefix="/api/v1/patients", description="Patients")


def get_patient(patient_id) -> Patient:
    patient = Patient.get_or_none(Patient.id == patient_id)
    if patient is None:
        raise ApiError(404, "patient_not_found", "No patient has this id.")
    return patient


def _duplicate_mrn() -> ApiError:
    # Names the field, never the value: the record number is PHI.
    return ApiError(409, "duplicate_medical_record_number",
                    "Another patient already has this medical record number.")


@blp.route("", methods=["POST"])
@roles(*CLINICAL)
@audited("patient.create", "patient")
@blp.arguments(schemas.PatientCreate)
@blp.response(201, schemas.Patient)
def create_patient(data):
    try:
        with db.atomic():
            patient = Patient.create(**data)
    except peewee.IntegrityError:
        raise _duplicate_mrn() from None
    target(resource_id=patient.id, patient_id=patient.id)
    log.info("patient created", extra={"patient_id": str(patient.id)})
    return patient, 201, {"Location": f"/api/v1/patients/{patient.id}"}


@blp.route("", methods=["GET"])
@roles(*CLINICAL)
@audited("patient.list", "patient")
@blp.arguments(schemas.PageArgs, location="query")
@blp.response(200, schemas.PatientPage)
def list_patients(args):
    rows, next_cursor = page(Patient.select(), (Patient.created_at, Patient.id), args.get("cursor"), args["limit"])
    target(patient_ids=[p.id for p in rows])
    return {"items": rows, "next_cursor": next_cursor}


@blp.route("/<uuid:patient_id>", methods=["GET"])
@roles(*CLINICAL)
@audited("patient.read", "patient")
@blp.response(200, schemas.Patient)
def read_patient(patient_id):
    return get_patient(patient_id)


@blp.route("/<uuid:patient_id>", methods=["PATCH"])
@roles(*CLINICAL)
@audited("patient.update", "patient")
@blp.arguments(schemas.PatientUpdate)
@blp.response(200, schemas.Patient)
def update_patient(data, patient_id):
    patient = get_patient(patient_id)
    for name, value in data.items():
        setattr(patient, name, value)
    patient.updated_at = utcnow()
    try:
        with db.atomic():
            patient.save()
    except peewee.IntegrityError:
        raise _duplicate_mrn() from None
    log.info("patient updated", extra={"patient_id": str(patient.id), "fields": sorted(data)})
    return patient


@blp.route("/<uuid:patient_id>", methods=["DELETE"])
@roles(*CLINICAL)
@audited("patient.delete", "patient")
@limiter.limit(delete_limit)
@blp.response(204)
def delete_patient(patient_id):
    """Delete the patient, their screenings, gradings and images. Audit events stay (they hold
    ids only). Images go first: if storage fails the answer is 503 and a retry finishes the job,
    rather than rows vanishing while their images linger."""
    patient = get_patient(patient_id)
    screenings = list(Screening.select(Screening.id, Screening.image_key).where(Screening.patient == patient))
    storage = get_storage()
    for screening in screenings:
        storage.delete(screening.image_key)
    with db.atomic():
        ids = [s.id for s in screenings]
        if ids:
            Grading.delete().where(Grading.screening.in_(ids)).execute()
            Screening.delete().where(Screening.id.in_(ids)).execute()
        Exam.delete().where(Exam.patient == patient).execute()
        patient.delete_instance()
    log.info("patient deleted", extra={"patient_id": str(patient_id), "screenings": len(ids)})
    return None


@blp.route("/<uuid:patient_id>/summary", methods=["GET"])
@roles(*CLINICAL)
@audited("patient.summary.read", "patient")
@blp.response(200, schemas.Summary)
def patient_summary(patient_id):
    """Outcome of the latest exam: refer, retake, rescreen_12_months or pending."""
    return summary.for_patient(get_patient(patient_id))
