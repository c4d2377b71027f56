"""Shadow grading (admin): put a candidate version in shadow, stop it, and compare its answers
with the clinical ones. See control_api/shadow.py for how the grading itself runs."""
from __future__ import annotations

from flask import current_app, g

from .. import agreement
from .. import shadow_schemas as schemas
from ..audit import audited, target
from ..auth import ADMIN, roles
from ..db import db
from ..errors import ApiError
from ..grading import model_input
from ..models import ShadowGrading, ShadowSetting, utcnow
from ..shadow import active_setting
from ..torchserve import UnknownModelVersion, get_client
from . import Blueprint

blp = Blueprint("shadow", __name__, url_prefix="/api/v1/models/shadow",
                description="Shadow grading of a candidate model version (admin)")


def get_shadow():
    return current_app.extensions["clarity"]["shadow"]


def trial(screening, stored: bytes, version: str) -> dict:
    """A re-grade with a named version (POST .../screenings/{id}/grade, admin): the version grades
    the stored photograph and its answer is kept as a shadow grading; the screening's clinical
    result stays as it was. The 201's headers: Location of that shadow grading. TorchServe's
    exceptions pass through with nothing written."""
    row = get_shadow().trial(screening, model_input(screening, stored), version)
    return {"Location": f"/api/v1/models/shadow/gradings/{row.id}"}


def _status() -> dict:
    shadow = get_shadow()
    q = shadow._queue
    return {"active": active_setting(), "queue": {"size": q.qsize() if q else 0, "capacity": shadow.queue_size}}


@blp.route("", methods=["GET"])
@roles(*ADMIN)
@blp.response(200, schemas.ShadowStatus)
def read_shadow():
    return _status()


@blp.route("", methods=["PUT"])
@roles(*ADMIN)
@audited("shadow.start", "model_version")
@blp.arguments(schemas.ShadowStart)
@blp.response(200, schemas.ShadowStatus)
def start_shadow(args):
    """Put a registered version in shadow (replacing any other): from now on it grades new
    photographs after the default has answered. Its answers are never shown to clinicians."""
    client = get_client()
    version = args["version"]
    try:
        described = client.describe(version)
        default = client.describe()
    except UnknownModelVersion:
        raise ApiError(422, "unknown_model_version", "No model version of that name is registered.") from None
    if described and default and described[0].get("modelVersion") == default[0].get("modelVersion"):
        raise ApiError(422, "already_default", "This version is the default; shadow a candidate instead.")
    now = utcnow()
    with db.atomic():
        ShadowSetting.update(stopped_at=now).where(ShadowSetting.stopped_at.is_null()).execute()
        ShadowSetting.create(model_name=client.model_name, model_version=version, sample_rate=args["sample_rate"],
                             started_at=now, started_by=g.api_key.id)
    get_shadow().forget()
    return _status()


@blp.route("", methods=["DELETE"])
@roles(*ADMIN)
@audited("shadow.stop", "model_version")
@blp.response(204)
def stop_shadow():
    """Stop shadow grading (its answers stay for the report)."""
    if not ShadowSetting.update(stopped_at=utcnow()).where(ShadowSetting.stopped_at.is_null()).execute():
        raise ApiError(404, "no_shadow", "No version is in shadow.")
    get_shadow().forget()


@blp.route("/report", methods=["GET"])
@roles(*ADMIN)
@audited("shadow.report", "model_version")
@blp.arguments(schemas.ShadowReportArgs, location="query")
@blp.response(200, schemas.ShadowReport)
def shadow_report(args):
    """Agreement of a candidate's shadow answers with the clinical gradings on the same
    photographs: quadratic weighted kappa on grade, agreement on referable and on gradable,
    the confusion matrix, and the photographs where they disagree on referral (ids only)."""
    return agreement.compare(args["version"], args.get("baseline_version"), args.get("source"))


@blp.route("/gradings/<uuid:shadow_grading_id>", methods=["GET"])
@roles(*ADMIN)
@audited("shadow.grading.read", "shadow_grading")
@blp.response(200, schemas.ShadowGrading)
def read_shadow_grading(shadow_grading_id):
    """One shadow answer (the Location of a re-grade with a named version)."""
    row = ShadowGrading.get_or_none(ShadowGrading.id == shadow_grading_id)
    if row is None:
        raise ApiError(404, "shadow_grading_not_found", "No shadow grading with this id.")
    target(patient_id=row.screening.patient_id)
    return row
