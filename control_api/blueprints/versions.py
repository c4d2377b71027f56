"""The model versions TorchServe serves, read from its management API, with what a promotion
decision needs: each version's held-out card metrics and its shadow agreement with the default."""
from __future__ import annotations

import dataclasses
import logging

from .. import agreement, schemas, shadow
from ..auth import ADMIN, roles
from ..errors import ApiError
from ..torchserve import TorchServeUnavailable, UnknownModelVersion, get_client
from . import Blueprint

blp = Blueprint("models", __name__, url_prefix="/api/v1/models", description="Model versions")


@blp.route("", methods=["GET"])
@roles(*ADMIN)
@blp.response(200, schemas.Models)
def list_models():
    client = get_client()
    try:
        versions = client.models()
    except UnknownModelVersion:
        raise ApiError(503, "model_not_registered",
                       f"TorchServe has no model named {client.model_name!r}.") from None
    default = next((v.version for v in versions if v.default), None)
    rows = [{**dataclasses.asdict(v), "card": _card(client, v.version),
             "shadow": agreement.summary(v.version, default) if default and v.version != default else None}
            for v in versions]
    active = shadow.active_setting()
    return {"model": client.model_name, "default_version": default, "versions": rows,
            "shadow": {"version": active.model_version, "sample_rate": active.sample_rate} if active else None}


def _card(client, version: str) -> dict | None:
    try:
        meta = client.metadata(version)
    except (TorchServeUnavailable, UnknownModelVersion) as exc:
        logging.getLogger(__name__).warning("model card unreadable", extra={"model_version": version,
                                                                            "error_type": type(exc).__name__})
        return None
    shadow.set_card_gauges(version, meta)
    return shadow.card(meta)
