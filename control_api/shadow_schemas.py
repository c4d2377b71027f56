"""Request and response schemas of shadow grading (admin only: blueprints/shadow.py); schemas.py
holds those of the clinical resources and of GET /api/v1/models."""
from __future__ import annotations

from marshmallow import fields, validate

from .schemas import MODEL_VERSION, Schema, UTCDateTime


class ShadowStart(Schema):
    version = fields.String(required=True, validate=MODEL_VERSION,
                            metadata={"description": "a registered version other than the default"})
    sample_rate = fields.Float(load_default=1.0, validate=validate.Range(min=0, min_inclusive=False, max=1),
                               metadata={"description": "share of new photographs it grades (0 < rate <= 1)"})


class ShadowState(Schema):
    model = fields.String(attribute="model_name")
    version = fields.String(attribute="model_version")
    sample_rate = fields.Float()
    started_at = UTCDateTime()
    stopped_at = UTCDateTime(allow_none=True)


class ShadowStatus(Schema):
    active = fields.Nested(ShadowState, allow_none=True)
    queue = fields.Dict(metadata={"description": "this API process's shadow queue: size and capacity"})


class ShadowReportArgs(Schema):
    version = fields.String(required=True, validate=MODEL_VERSION, metadata={"description": "the candidate"})
    baseline_version = fields.String(validate=MODEL_VERSION, metadata={
        "description": "compare only with clinical gradings of this version (default: all)"})
    source = fields.String(validate=validate.OneOf(("shadow", "regrade")))


class ShadowReport(Schema):
    version = fields.String()
    baseline_versions = fields.List(fields.String())
    photographs = fields.Integer()
    both_gradable = fields.Integer()
    grade_kappa = fields.Float(allow_none=True, metadata={"description": "quadratic weighted kappa on grade"})
    grade_agreement = fields.Float(allow_none=True)
    referable_agreement = fields.Float(allow_none=True)
    gradable_agreement = fields.Float(allow_none=True)
    confusion = fields.Dict(metadata={"description": "rows: clinical grade, columns: candidate grade"})
    referral_disagreements = fields.List(fields.Dict(), metadata={
        "description": "photographs where the two disagree on referral (ids and grades only)"})
    referral_disagreements_total = fields.Integer()


class ShadowGrading(Schema):
    id = fields.UUID()
    screening_id = fields.UUID(attribute="screening_id")
    baseline_grading_id = fields.UUID(attribute="baseline_id", allow_none=True)
    source = fields.String()
    model = fields.Function(lambda g: {"name": g.model_name, "version": g.model_version}, metadata={"type": "object"})
    gradable = fields.Boolean()
    grade = fields.Integer(allow_none=True)
    label = fields.String(allow_none=True)
    probabilities = fields.List(fields.Float(), allow_none=True)
    referable = fields.Boolean(allow_none=True)
    quality = fields.Dict()
    created_at = UTCDateTime()
