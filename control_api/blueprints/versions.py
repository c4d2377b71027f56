"""The model versions TorchServe serves, read from its management API."""
from __future__ import annotations


from .. import schemas
from ..auth import ADMIN, roles
from ..errors import ApiError
from ..torchserve import UnknownModelVersion, get_client
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
    return {"model": client.model_name, "default_version": default, "versions": versions}
