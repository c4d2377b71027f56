"""Per-API-key rate limit on uploads (flask-limiter).

With the default memory:// storage each gunicorn worker counts on its own, so the effective
limit is up to WEB_CONCURRENCY times the setting; point RATE_LIMIT_STORAGE_URI at Redis or
Memcached (any `limits` storage URI) for one shared count.
"""
from __future__ import annotations

import time

from flask import current_app, g, request
from flask_limiter import Limiter


def _key() -> str:
    # Auth runs first (auth.enforce is registered before the limiter), so g.api_key is set.
    return f"key:{g.api_key.id}" if "api_key" in g else f"ip:{request.remote_addr}"


def upload_limit() -> str:
    return current_app.extensions["clarity"]["settings"].upload_rate_limit


# No X-RateLimit-*/Retry-After on every answer: Retry-After belongs to the 429 only (errors.py).
limiter = Limiter(key_func=_key, headers_enabled=False, strategy="moving-window")


def seconds_until_reset() -> int:
    current = limiter.current_limit
    return max(1, int(current.reset_at - time.time())) if current else 60


def init_app(app, settings) -> None:
    app.config["RATELIMIT_STORAGE_URI"] = settings.rate_limit_storage_uri
    limiter.init_app(app)
