"""Request and response schemas (marshmallow), used both to validate and to write the OpenAPI doc."""
from __future__ import annotations

import re
from datetime import date, datetime, timedelta, timezone

import marshmallow as ma
from flask_smorest.fields import Upload
from marshmallow import fields, validate
from werkzeug.datastructures import FileStorage

from . import codes
from .models import EYES, FIELDS, SEXES, STATUSES

MODEL_VERSION = validate.Regexp(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,49}$",
                                error="A model version is letters, digits, '.', '_' or '-'.")


class UTCDateTime(fields.DateTime):
    """ISO-8601 in and out. Stored as naive UTC; input without an offset is taken as UTC."""

    def _serialize(self, value, attr, obj, **kwargs):
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc).isoformat().replace("+00:00", "Z")

    def _deserialize(self, value, attr, data, **kwargs):
        parsed = super()._deserialize(value, attr, data, **kwargs)
        if parsed.tzinfo is not None:
            parsed = parsed.astimezone(timezone.utc).replace(tzinfo=None)
        return parsed


class Schema(ma.Schema):
    class Meta:
        unknown = ma.RAISE


class ErrorBody(Schema):
    code = fields.String(required=True, metadata={"description": "stable code, e.g. patient_not_found"})
    message = fields.String(required=True)
    request_id = fields.String(required=True, metadata={"description": "also in the X-Request-ID header"})
    details = fields.Dict(metadata={"description": "validation errors by location (json, query, multipart) "
                                                   "and field"})


class Error(Schema):
    """Every error answer (errors.py); documented as the default response of each operation."""
    error = fields.Nested(ErrorBody, required=True)


class Health(Schema):
    status = fields.String(required=True)


class Check(Schema):
    ok = fields.Boolean(required=True)
    problem = fields.String()


class Readiness(Schema):
    status = fields.String(required=True)
    checks = fields.Dict(keys=fields.String(), values=fields.Nested(Check))


class NotReady(Error):
    checks = fields.Dict(keys=fields.String(), values=fields.Nested(Check))


# PostgreSQL text cannot hold NUL (the insert fails), and terminal escapes or line breaks have
# no place in a name, a record number or a camera model. Patient fields are stripped first, so
# they also need one character that is not a space.
#
# The patterns are written so that a regex engine with backtracking runs them in linear time
# (no two quantifiers can match the same character), and the length is checked before any of
# them: `^[^C]*[^\sC][^C]*$`, the earlier not-blank pattern, backtracked quadratically and
# still ran after the length check had failed (a 24,000-character name held a worker for
# seconds). `Text` is one validator, so a failed length check stops there.
_CONTROL = r"\x00-\x1f\x7f-\x9f"
NO_CONTROL_PATTERN = rf"^[^{_CONTROL}]*$"
NOT_BLANK_PATTERN = rf"^(?=[^{_CONTROL}]*$)\s*[^\s{_CONTROL}]"


class Text(validate.Length):
    """Length first, then a linear-time pattern (the OpenAPI document shows both: apispec
    reads `min`/`max` as a Length and `regex` as the pattern)."""

    def __init__(self, min: int, max: int, *, blank: bool = True):
        super().__init__(min=min, max=max)
        self.regex = re.compile(NO_CONTROL_PATTERN if blank else NOT_BLANK_PATTERN)
        self.pattern_error = ("Must not contain control characters." if blank else
                              "Must contain a character other than spaces, and no control characters.")

    def __call__(self, value: str) -> str:
        super().__call__(value)  # raises before the pattern runs on an over-long value
        if self.regex.match(value) is None:
            raise ma.ValidationError(self.pattern_error)
        return value


def text(min: int, max: int, *, blank: bool = True) -> list:
    return [Text(min, max, blank=blank)]


def _not_future_date(value: date) -> None:
    if value > date.today() or value < date(1900, 1, 1):
        raise ma.ValidationError("Must be a date between 1900-01-01 and today.")


def _not_future_time(value: datetime) -> None:
    if value > datetime.now(timezone.utc).replace(tzinfo=None) + timedelta(days=1):
        raise ma.ValidationError("Must not be in the future.")


class PatientFields(Schema):
    name = fields.String(validate=text(1, 200, blank=False))
    birth_date = fields.Date(allow_none=True, validate=_not_future_date)
    medical_record_number = fields.String(attribute="mrn", allow_none=True, validate=text(1, 64, blank=False))
    sex = fields.String(allow_none=True, validate=validate.OneOf(SEXES))

    @ma.pre_load
    def strip(self, data, **kwargs):
        if isinstance(data, dict):
            return {k: v.strip() if isinstance(v, str) else v for k, v in data.items()}
        return data


class PatientCreate(PatientFields):
    name = fields.String(required=True, validate=text(1, 200, blank=False))


class PatientUpdate(PatientFields):
    @ma.validates_schema
    def not_empty(self, data, **kwargs):
        if not data:
            raise ma.ValidationError("Give at least one field to change.")
        if "name" in data and data["name"] is None:
            raise ma.ValidationError("name cannot be null.", "name")


class Patient(PatientFields):
    id = fields.UUID(dump_only=True)
    created_at = UTCDateTime(dump_only=True)
    updated_at = UTCDateTime(dump_only=True)


class PageArgs(Schema):
    cursor = fields.String(validate=validate.Length(max=200),
                           metadata={"description": "next_cursor from the previous page"})
    limit = fields.Integer(load_default=20, validate=validate.Range(min=1, max=100))


class PatientPage(Schema):
    items = fields.List(fields.Nested(Patient))
    next_cursor = fields.String(allow_none=True)


class ModelRef(Schema):
    name = fields.String()
    version = fields.String()
    synthetic_training_data = fields.Boolean()


class Grading(Schema):
    id = fields.UUID()
    model = fields.Function(lambda g: {"name": g.model_name, "version": g.model_version,
                                       "synthetic_training_data": g.synthetic_training_data},
                            metadata={"type": "object"})
    gradable = fields.Boolean()
    grade = fields.Integer(allow_none=True, metadata={"description": "ICDR grade 0-4"})
    label = fields.String(allow_none=True)
    probabilities = fields.List(fields.Float(), allow_none=True)
    referable = fields.Boolean(allow_none=True)
    referable_threshold = fields.Integer(allow_none=True)
    quality = fields.Dict()
    timings_ms = fields.Dict(attribute="timings", allow_none=True)
    disclaimer = fields.String(allow_none=True, metadata={
        "description": "Set when the model was trained on synthetic data: not for clinical use."})
    created_at = UTCDateTime()


class Screening(Schema):
    id = fields.UUID()
    patient_id = fields.UUID(attribute="patient_id")
    exam_id = fields.UUID(attribute="exam_id", metadata={"description": "the exam (visit) it was taken at"})
    eye = fields.String(validate=validate.OneOf(EYES))
    field = fields.String(validate=validate.OneOf(FIELDS), metadata={
        "description": "disc- or macula-centred, or other"})
    captured_at = UTCDateTime(allow_none=True)
    camera = fields.String(allow_none=True)
    status = fields.String(validate=validate.OneOf(STATUSES))
    image = fields.Function(lambda s: {
        "content_type": s.content_type, "size": s.image_size, "sha256": s.image_sha256,
        "url": f"/api/v1/patients/{s.patient_id}/screenings/{s.id}/image"}, metadata={"type": "object"})
    result = fields.Nested(Grading, allow_none=True, attribute="latest_grading",
                           metadata={"description": "the latest grading; null while pending"})
    created_at = UTCDateTime()
    updated_at = UTCDateTime()


class ScreeningDetail(Screening):
    gradings = fields.Function(lambda s: Grading(many=True).dump(s.history()), metadata={
        "type": "array", "description": "every grading of this photograph, newest first"})


class ScreeningPage(Schema):
    items = fields.List(fields.Nested(Screening))
    next_cursor = fields.String(allow_none=True)


class ImageFile(Upload):
    def _deserialize(self, value, attr, data, **kwargs):
        if not isinstance(value, FileStorage):
            raise ma.ValidationError("Send the photograph as a file part, not as a text field.")
        return value


class ExamImageUpload(Schema):
    image = ImageFile(required=True, metadata={"description": (
        "JPEG, PNG, TIFF or DICOM Part 10 (Ophthalmic Photography 8 Bit, VL Photographic or "
        "Secondary Capture colour; docs/api.md), stored unchanged")})
    eye = fields.String(validate=validate.OneOf(EYES), metadata={"description": (
        "required unless a DICOM header gives the laterality; must agree with it when both are given")})
    field = fields.String(load_default="other", validate=validate.OneOf(FIELDS),
                          metadata={"description": "disc (disc-centred), macula (macula-centred) or other"})
    captured_at = UTCDateTime(validate=_not_future_time,
                              metadata={"description": "ISO-8601; without an offset it is taken as UTC"})
    camera = fields.String(validate=text(1, 200))


class ScreeningUpload(ExamImageUpload):
    exam_id = fields.UUID(metadata={"description": "an exam of this patient to add the photograph to; "
                                                   "without it the photograph opens an exam of its own"})


class ImageArgs(Schema):
    redirect = fields.Boolean(load_default=True, metadata={"description": (
        "false: the API sends the bytes itself instead of redirecting to a presigned S3 URL "
        "(for a page whose Content-Security-Policy allows only the API's origin)")})


class GradeRequest(Schema):
    model_version = fields.String(validate=MODEL_VERSION, metadata={
        "description": "a registered version (admin only); the default version when left out"})


class EyeSummary(Schema):
    screening_id = fields.UUID()
    status = fields.String()
    captured_at = UTCDateTime(allow_none=True)
    gradable = fields.Boolean(allow_none=True)
    grade = fields.Integer(allow_none=True)
    label = fields.String(allow_none=True)
    referable = fields.Boolean(allow_none=True)
    quality = fields.Dict(allow_none=True)
    model = fields.Dict(allow_none=True)
    disclaimer = fields.String(allow_none=True)


class Summary(Schema):
    patient_id = fields.UUID()
    exam_id = fields.UUID(allow_none=True, metadata={"description": "the latest exam, which the summary is of"})
    outcome = fields.String(validate=validate.OneOf(codes.OUTCOMES))
    message = fields.String()
    eyes = fields.Dict(keys=fields.String(), values=fields.Nested(EyeSummary, allow_none=True))
    disclaimer = fields.String(allow_none=True)


class ExamCreate(Schema):
    performed_at = UTCDateTime(validate=_not_future_time, metadata={
        "description": "when the visit took place (ISO-8601; default now)"})
    accession_number = fields.String(allow_none=True, validate=text(1, 64, blank=False), metadata={
        "description": "the clinic's visit/accession identifier; treated like a record number"})

    @ma.pre_load
    def strip(self, data, **kwargs):
        if isinstance(data, dict) and isinstance(data.get("accession_number"), str):
            return {**data, "accession_number": data["accession_number"].strip()}
        return data


class QualityReason(Schema):
    code = fields.String()
    message = fields.String(allow_none=True)


class EyeResult(Schema):
    status = fields.String(validate=validate.OneOf(("graded", "ungradable", "pending", "missing")))
    gradable = fields.Boolean()
    grade = fields.Integer(allow_none=True, metadata={"description": "highest ICDR grade (0-4) among its "
                                                                     "gradable photographs"})
    label = fields.String(allow_none=True, metadata={"description": "the grade in ICDR words"})
    referable = fields.Boolean(allow_none=True)
    deciding_image_id = fields.UUID(allow_none=True, metadata={"description": "the photograph that gave the grade"})
    quality_reasons = fields.List(fields.Nested(QualityReason), metadata={
        "description": "why its ungradable photographs failed the quality gate"})


class DicomReportState(Schema):
    status = fields.String(validate=validate.OneOf(("pending", "sent", "failed")))
    attempts = fields.Integer()
    sent_at = UTCDateTime(allow_none=True)
    last_error = fields.String(allow_none=True)


class Exam(Schema):
    id = fields.UUID()
    patient_id = fields.UUID()
    performed_at = UTCDateTime()
    accession_number = fields.String(allow_none=True)
    created_at = UTCDateTime()
    outcome = fields.String(validate=validate.OneOf(codes.OUTCOMES))
    message = fields.String(metadata={"description": "the outcome in the words the cleared products use"})
    eyes = fields.Dict(keys=fields.String(validate=validate.OneOf(EYES)), values=fields.Nested(EyeResult))
    images = fields.List(fields.Nested(Screening), metadata={"description": "its photographs, oldest first"})
    model = fields.Nested(ModelRef, allow_none=True)
    disclaimer = fields.String(allow_none=True)
    dicom_report = fields.Nested(DicomReportState, allow_none=True, metadata={
        "description": "the report sent to the PACS as DICOM Encapsulated PDF; null when none (README DICOM)"})


class ExamPage(Schema):
    items = fields.List(fields.Nested(Exam))
    next_cursor = fields.String(allow_none=True)


class FhirArgs(Schema):
    include_pdf = fields.Boolean(load_default=False, metadata={
        "description": "add the PDF report as DiagnosticReport.presentedForm"})


class ModelVersion(Schema):
    version = fields.String()
    default = fields.Boolean()
    ready_workers = fields.Integer()
    workers = fields.Integer()
    batch_size = fields.Integer(allow_none=True)
    max_batch_delay_ms = fields.Integer(allow_none=True)
    card = fields.Dict(allow_none=True, metadata={
        "description": "held-out metrics from the version's model card; null when the card has none"})
    shadow = fields.Dict(allow_none=True, metadata={
        "description": "agreement of its shadow answers with the default's clinical gradings; null without any"})


class Models(Schema):
    model = fields.String()
    default_version = fields.String(allow_none=True)
    versions = fields.List(fields.Nested(ModelVersion))
    shadow = fields.Dict(allow_none=True, metadata={"description": "the version in shadow now, if any"})


class AuditArgs(PageArgs):
    patient_id = fields.UUID()


class AuditEvent(Schema):
    id = fields.Integer()
    at = UTCDateTime()
    actor_key_id = fields.UUID(allow_none=True)
    actor_prefix = fields.String(allow_none=True)
    action = fields.String()
    resource_type = fields.String()
    resource_id = fields.UUID(allow_none=True)
    patient_id = fields.UUID(allow_none=True)
    request_id = fields.String()
    outcome = fields.String()


class AuditPage(Schema):
    items = fields.List(fields.Nested(AuditEvent))
    next_cursor = fields.String(allow_none=True)
