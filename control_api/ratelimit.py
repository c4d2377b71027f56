"""Per-API-key rate limits (flask-limiter) on uploads, re-grades and patient deletion.

The count lives in RATE_LIMIT_STORAGE_URI. With memory:// each gunicorn worker counts on its
own, so the effective limit is up to WEB_CONCURRENCY times the setting: compose and ECS point
it at Redis for one shared count, under RATE_LIMIT_PREFIX (one prefix per deployment).

Redis down: the limiter falls back to counting in each worker's memory (the same limits, per
worker) and tries Redis again with a growing interval. That is fail-open within a bound: a
clinic keeps screening patients while a cache is down, and one key still gets at most
WEB_CONCURRENCY times its limit per task. The limits protect capacity, not data (every call
still needs a key and a role), so refusing uploads for a cache outage would be the worse harm.
Redis calls time out after half a second, so a black-holed Redis slows a request by that once
per retry interval, not per request.
"""
from __future__ import annotations

import time

from flask import current_app, g, request
from flask_limiter import Limiter


def _key() -> str:
    # Auth runs first (auth.enforce is registered before the limiter), so g.api_key is set.
    return f"key:{g.api_key.id}" if "api_key" in g else f"ip:{request.remote_addr}"


def _setting(name: str):
    return lambda: getattr(current_app.extensions["clarity"]["settings"], name)


upload_limit = _setting("upload_rate_limit")
regrade_limit = _setting("regrade_rate_limit")
delete_limit = _setting("delete_rate_limit")

# No X-RateLimit-*/Retry-After on every answer: Retry-After belongs to the 429 only (errors.py).
limiter = Limiter(key_func=_key, headers_enabled=False, strategy="moving-window")


def seconds_until_reset() -> int:
    current = limiter.current_limit
    return max(1, int(current.reset_at - time.time())) if current else 60


def init_app(app, settings) -> None:
    app.config["RATELIMIT_STORAGE_URI"] = settings.rate_limit_storage_uri
    app.config["RATELIMIT_KEY_PREFIX"] = settings.rate_limit_prefix
    app.config["RATELIMIT_IN_MEMORY_FALLBACK_ENABLED"] = True
    if settings.rate_limit_storage_uri.startswith(("redis://", "rediss://")):
        app.config["RATELIMIT_STORAGE_OPTIONS"] = {"socket_connect_timeout": 0.5, "socket_timeout": 0.5}
    limiter.init_app(app)
