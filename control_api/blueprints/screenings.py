"""Screenings: upload a photograph of one eye, list, read, download the image, re-grade.

The upload itself (its order, and what is left when a step fails) is control_api/upload.py,
shared with the exams routes.
"""
from __future__ import annotations

from flask import Response, redirect

from .. import dicom, explanation, metrics, schemas
from ..audit import audited
from ..auth import ADMIN, CLINICAL, require_role, roles
from ..errors import RETRY_AFTER_SECONDS, ApiError
from ..grading import grade
from ..models import Exam, Patient, Screening
from ..outcome import attach_latest
from ..pagination import page
from ..ratelimit import limiter, regrade_limit, upload_limit
from ..storage import get_storage
from ..torchserve import ImageRejected, UnknownModelVersion, get_client
from ..upload import upload_photograph
from . import Blueprint, shadow, uploads
from .patients import get_patient

blp = Blueprint("screenings", __name__, url_prefix="/api/v1/patients/<uuid:patient_id>/screenings",
                description="Eye photographs and their gradings")

EXTENSIONS = {"image/jpeg": "jpg", "image/png": "png", "image/tiff": "tiff", dicom.CONTENT_TYPE: "dcm"}
IDEMPOTENCY_HEADER = {"in": "header", "name": "Idempotency-Key", "required": False,
                      "schema": {"type": "string", "pattern": "^[!-~]{1,255}$"},
                      "description": "a retry with the same key returns the first result"}


def get_screening(patient_id, screening_id) -> Screening:
    screening = Screening.get_or_none((Screening.id == screening_id) & (Screening.patient == patient_id))
    if screening is None:
        get_patient(patient_id)  # a missing patient is the better message
        raise ApiError(404, "screening_not_found", "This patient has no screening with this id.")
    return screening


def _location(s: Screening) -> str:
    return f"/api/v1/patients/{s.patient_id}/screenings/{s.id}"


def answer(screening: Screening, replayed: bool = False):
    headers = {"Location": _location(screening)}
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    if screening.status == "pending":
        headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
        return screening, 202, headers
    return screening, 201, headers


def photograph_route(blp: Blueprint, rule: str, form_schema):
    """The route of a view that takes one photograph through upload_photograph and answers
    answer(): POST `rule` on `blp` with the upload's roles, body limit, audit action, rate
    limit, multipart form and documented 201/202 answers (screenings and exams routes)."""
    stack = [
        blp.route(rule, methods=["POST"]),
        roles(*CLINICAL),
        uploads,
        audited("screening.create", "screening"),
        limiter.limit(upload_limit),
        blp.arguments(form_schema, location="multipart"),
        blp.response(201, schemas.Screening, description="Stored and graded (or found ungradable)"),
        blp.alt_response(202, schema=schemas.Screening, description="Stored; grading pending (Retry-After)"),
        blp.doc(parameters=[IDEMPOTENCY_HEADER]),
    ]

    def decorate(view):
        for decorator in reversed(stack):  # as if written one per line above the view, top first
            view = decorator(view)
        return view
    return decorate


def _exam_in_form(patient: Patient, exam_id) -> Exam | None:
    """The exam a photograph sent to the screenings route names, checked against the patient."""
    if exam_id is None:
        return None
    exam = Exam.get_or_none(Exam.id == exam_id)
    if exam is None:
        raise ApiError(422, "exam_not_found", "No exam has the exam_id given.")
    if exam.patient_id != patient.id:
        raise ApiError(422, "exam_of_another_patient", "The exam_id given is an exam of another patient.")
    return exam


@photograph_route(blp, "", schemas.ScreeningUpload)
def create_screening(form, patient_id):
    """Upload one photograph. Without `exam_id` it opens an exam of its own; the exams routes
    (POST .../exams, then .../exams/{exam_id}/images) group a visit's photographs."""
    patient = get_patient(patient_id)
    exam = _exam_in_form(patient, form.get("exam_id"))
    return answer(*upload_photograph(patient, form, exam))


@blp.route("", methods=["GET"])
@roles(*CLINICAL)
@audited("screening.list", "patient")
@blp.arguments(schemas.PageArgs, location="query")
@blp.response(200, schemas.ScreeningPage)
def list_screenings(args, patient_id):
    patient = get_patient(patient_id)
    rows, next_cursor = page(Screening.select().where(Screening.patient == patient),
                             (Screening.created_at, Screening.id), args.get("cursor"), args["limit"])
    attach_latest(rows)
    return {"items": rows, "next_cursor": next_cursor}


@blp.route("/<uuid:screening_id>", methods=["GET"])
@roles(*CLINICAL)
@audited("screening.read", "screening")
@blp.response(200, schemas.ScreeningDetail)
def read_screening(patient_id, screening_id):
    return get_screening(patient_id, screening_id)


@blp.route("/<uuid:screening_id>/image", methods=["GET"])
@roles(*CLINICAL)
@audited("screening.image.read", "screening")
@blp.response(200, content_type="image/*", description="The original bytes (local storage, or redirect=false)")
@blp.alt_response(302, description="Redirect to a short-lived presigned URL (S3 storage)")
@blp.arguments(schemas.ImageArgs, location="query")
def read_image(args, patient_id, screening_id):
    screening = get_screening(patient_id, screening_id)
    storage = get_storage()
    url = storage.download_url(screening.image_key, content_type=screening.content_type) if args["redirect"] else None
    if url:
        return redirect(url, 302)
    with metrics.STORAGE_SECONDS.labels(storage.name, "get").time():
        data = storage.get(screening.image_key, sha256=screening.image_sha256)
    extension = EXTENSIONS.get(screening.content_type, "bin")
    return Response(data, mimetype=screening.content_type, headers={
        "Content-Disposition": f'inline; filename="{screening.id}.{extension}"',
        "X-Content-SHA256": screening.image_sha256})


@blp.route("/<uuid:screening_id>/explanation", methods=["GET"])
@roles(*CLINICAL)
@audited("screening.explanation.read", "screening")
@blp.response(200, content_type="image/png", description="Grad-CAM overlay on the photograph, with a colour scale")
@blp.alt_response(409, schema=schemas.Error, description="Not graded yet, or its model version is gone")
@blp.alt_response(422, schema=schemas.Error, description="Ungradable: nothing to explain")
@blp.alt_response(503, schema=schemas.Error, description="The model server is unavailable (Retry-After)")
def read_explanation(patient_id, screening_id):
    """Where the model looked for the grade of this photograph: the whole photograph (longer
    side at most 1024 px, its own aspect) with the Grad-CAM map of the grading's model version
    over the retina, and a low-to-high colour scale under it."""
    png = explanation.for_screening(get_screening(patient_id, screening_id))
    return Response(png, mimetype="image/png",
                    headers={"Content-Disposition": f'inline; filename="{screening_id}-gradcam.png"'})


@blp.route("/<uuid:screening_id>/grade", methods=["POST"])
@roles(*CLINICAL)
@audited("screening.grade", "screening")
@limiter.limit(regrade_limit)
@blp.arguments(schemas.GradeRequest, required=False)
@blp.response(201, schemas.Screening)
def regrade(args, patient_id, screening_id):
    """Grade again (history kept); with model_version (admin), a trial kept as a shadow grading, never clinical."""
    version = args.get("model_version")
    if version:
        require_role(*ADMIN)
    screening = get_screening(patient_id, screening_id)
    data = get_storage().get(screening.image_key, sha256=screening.image_sha256)
    try:
        if version:  # a rejected image or unknown version changes nothing, as below
            return screening, 201, shadow.trial(screening, data, version)
        grade(get_client(), screening, data, offer_shadow=False)
    except UnknownModelVersion:
        raise ApiError(422, "unknown_model_version", "No model version of that name is registered.") from None
    except ImageRejected as exc:
        raise ApiError(422, exc.code, exc.message) from None
    return screening, 201
