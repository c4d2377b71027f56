"""The audit trail, for auditors: who read or changed which patient's data, and when."""
from __future__ import annotations

from .. import schemas
from ..audit import audited, target
from ..auth import AUDIT, roles
from ..models import AuditEvent
from ..pagination import page
from . import Blueprint

blp = Blueprint("audit", __name__, url_prefix="/api/v1/audit-events", description="Audit trail")


@blp.route("", methods=["GET"])
@roles(*AUDIT)
@audited("audit.list", "audit_event")
@blp.arguments(schemas.AuditArgs, location="query")
@blp.response(200, schemas.AuditPage)
def list_events(args):
    """Newest first; `patient_id` narrows to one patient. Events hold ids, never PHI. Reading
    the trail is itself audited (action audit.list, with the patient asked about)."""
    if "patient_id" in args:
        target(patient_id=args["patient_id"])
    query = AuditEvent.select()
    if "patient_id" in args:
        query = query.where(AuditEvent.patient_id == args["patient_id"])
    rows, next_cursor = page(query, (AuditEvent.id,), args.get("cursor"), args["limit"])
    return {"items": rows, "next_cursor": next_cursor}
