"""API keys and roles.

A key is `cic_<prefix>_<secret>`: the prefix finds the row, the SHA-256 of the whole token is
what is stored (the secret has 256 bits of entropy, so a plain hash is enough; no slow KDF).
Every endpoint declares who may call it with @roles(...) or @public; an endpoint that declares
neither answers 403, so a route added without a rule is closed, not open.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import secrets

from flask import current_app, g, request
from flask_smorest import Blueprint

from .errors import ApiError
from .models import ROLES, ApiKey, utcnow

log = logging.getLogger(__name__)

CLINICAL = ("clinician", "admin")
ADMIN = ("admin",)
AUDIT = ("auditor", "admin")
PUBLIC = ()
# Endpoints of libraries, which cannot carry the decorators: the OpenAPI document and its page.
PUBLIC_BLUEPRINTS = ("api-docs",)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_key(role: str, label: str = "") -> tuple[ApiKey, str]:
    """A new key row and the token, which is shown once and never stored."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    prefix = secrets.token_hex(4)
    token = f"cic_{prefix}_{secrets.token_urlsafe(32)}"
    key = ApiKey.create(prefix=prefix, key_hash=hash_token(token), role=role, label=label)
    return key, token


def revoke_key(prefix: str) -> bool:
    return ApiKey.update(revoked_at=utcnow()).where(
        (ApiKey.prefix == prefix) & ApiKey.revoked_at.is_null()).execute() == 1


def roles(*allowed: str):
    """Only keys with one of these roles may call the endpoint."""

    def decorator(view):
        wrapper = Blueprint.doc(security=[{"bearerAuth": []}])(view)
        wrapper._roles = allowed
        return wrapper

    return decorator


def public(view):
    view._roles = PUBLIC
    return view


def _unauthorized(message: str):
    return ApiError(401, "unauthorized", message, headers={"WWW-Authenticate": 'Bearer realm="clarity"'})


def authenticate() -> ApiKey:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise _unauthorized("Send an API key as 'Authorization: Bearer <key>'.")
    token = token.strip()
    parts = token.split("_", 2)  # the secret itself may contain "_"
    if len(parts) != 3 or parts[0] != "cic":
        raise _unauthorized("The API key is not valid.")
    key = ApiKey.get_or_none(ApiKey.prefix == parts[1])
    if key is None or not hmac.compare_digest(key.key_hash, hash_token(token)):
        raise _unauthorized("The API key is not valid.")
    if key.revoked_at is not None:
        raise _unauthorized("The API key has been revoked.")
    return key


def enforce():
    """before_request: authenticate and check the role, before any body is read or parsed."""
    if request.method == "OPTIONS" or request.endpoint is None:
        return  # CORS preflight; unknown URL (the router answers 404/405)
    if request.blueprint in PUBLIC_BLUEPRINTS:
        return
    allowed = getattr(current_app.view_functions[request.endpoint], "_roles", None)
    if allowed == PUBLIC:
        return
    g.api_key = authenticate()
    if allowed is None:
        log.error("endpoint has no access rule", extra={"endpoint": request.endpoint})
        raise ApiError(403, "forbidden", "This endpoint has no access rule.")
    require_role(*allowed)


def require_role(*allowed: str) -> None:
    """For checks inside a view that depend on the request (e.g. naming a model version)."""
    if g.api_key.role not in allowed:
        raise ApiError(403, "forbidden", f"The {g.api_key.role} role may not do this.")
