"""Every setting the API and its gunicorn config read, in one place, from the environment.

`ENV_VARS` is the list `.env.example` must match; a test compares them, so a setting added
here without documenting it there fails the suite.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Mapping


class SettingsError(ValueError):
    """A setting is present but unusable; the message names the variable."""


def _cpu_workers() -> int:
    # gunicorn's rule of thumb (2 x cores + 1) overshoots on big hosts: each worker holds
    # database connections and up to threads x MAX_UPLOAD_BYTES of request bodies.
    return min(2 * (os.cpu_count() or 1) + 1, 8)


MAX_PRESIGN_TTL_SECONDS = 900


def setting(env: str, default, doc: str):
    return field(default=default, metadata={"env": env, "doc": doc})


@dataclass(frozen=True)
class Settings:
    debug: bool = setting("DEBUG", False, "Flask debug mode; never in production")
    host: str = setting("HOST", "127.0.0.1", "address gunicorn binds")
    port: int = setting("PORT", 8000, "port gunicorn binds")
    log_level: str = setting("LOG_LEVEL", "INFO", "level for the JSON log lines")
    database_url: str = setting("DATABASE_URL", "sqlite:///var/clarity.db", "peewee db_url")
    storage_backend: str = setting("STORAGE_BACKEND", "local", "where images go: local or s3")
    local_storage_dir: str = setting("LOCAL_STORAGE_DIR", "var/images", "image directory (local backend)")
    aws_region: str = setting("AWS_REGION", "us-east-1", "S3 region")
    s3_bucket_name: str = setting("S3_BUCKET_NAME", "clarity-images", "S3 bucket for images")
    s3_endpoint_url: str = setting("S3_ENDPOINT_URL", "", "S3 endpoint; empty means AWS")
    s3_presign_ttl_seconds: int = setting("S3_PRESIGN_TTL_SECONDS", 300, "lifetime of image download URLs")
    torchserve_inference_url: str = setting("TORCHSERVE_INFERENCE_URL", "http://127.0.0.1:8080", "")
    torchserve_management_url: str = setting("TORCHSERVE_MANAGEMENT_URL", "http://127.0.0.1:8081", "")
    torchserve_key_file: str = setting("TORCHSERVE_KEY_FILE", "",
                                       "TorchServe's key_file.json (token authorization); empty sends no key")
    torchserve_model_name: str = setting("TORCHSERVE_MODEL_NAME", "dr", "registered model name")
    torchserve_timeout_seconds: float = setting("TORCHSERVE_TIMEOUT_SECONDS", 30.0, "per prediction")
    torchserve_max_in_flight: int = setting("TORCHSERVE_MAX_IN_FLIGHT", 0,
                                            "predictions one worker awaits at once; 0 means threads - 1")
    database_statement_timeout_seconds: float = setting(
        "DATABASE_STATEMENT_TIMEOUT_SECONDS", 0.0,
        "longest wait on one database call; 0 means TORCHSERVE_TIMEOUT_SECONDS / 3, at most half of it")
    max_upload_bytes: int = setting("MAX_UPLOAD_BYTES", 20 * 1024 * 1024, "largest accepted image")
    cors_origins: tuple = setting("CORS_ORIGINS", (), "comma-separated origins allowed by CORS")
    upload_rate_limit: str = setting("UPLOAD_RATE_LIMIT", "60/minute", "uploads per API key")
    regrade_rate_limit: str = setting("REGRADE_RATE_LIMIT", "30/minute", "re-grades per API key")
    delete_rate_limit: str = setting("DELETE_RATE_LIMIT", "30/minute", "patient deletions per API key")
    rate_limit_storage_uri: str = setting("RATE_LIMIT_STORAGE_URI", "memory://", "flask-limiter storage")
    rate_limit_prefix: str = setting("RATE_LIMIT_PREFIX", "clarity", "prefix of the limiter's keys")
    web_concurrency: int = setting("WEB_CONCURRENCY", 0, "gunicorn workers; 0 means min(2 x cores + 1, 8)")
    gunicorn_threads: int = setting("GUNICORN_THREADS", 4, "threads per gunicorn worker")
    gunicorn_timeout: int = setting("GUNICORN_TIMEOUT", 0, "worker timeout; 0 means TorchServe's + 30 s")
    prometheus_multiproc_dir: str = setting("PROMETHEUS_MULTIPROC_DIR", "", "metrics files of gunicorn workers")
    # The DICOM C-STORE receiver (control_api/dicom_receiver.py), a process of its own.
    dicom_host: str = setting("DICOM_HOST", "127.0.0.1", "address the DICOM receiver binds")
    dicom_port: int = setting("DICOM_PORT", 11112, "DICOM port of the receiver")
    dicom_ae_title: str = setting("DICOM_AE_TITLE", "CLARITY", "the receiver's AE title (called AE)")
    dicom_allowed_ae_titles: tuple = setting("DICOM_ALLOWED_AE_TITLES", (),
                                             "comma-separated calling AE titles; empty refuses all")
    dicom_spool_dir: str = setting("DICOM_SPOOL_DIR", "var/dicom-spool", "received files not yet ingested")
    dicom_health_port: int = setting("DICOM_HEALTH_PORT", 11113, "receiver's /healthz, /readyz, /metrics")
    dicom_report_destination: str = setting("DICOM_REPORT_DESTINATION", "",
                                            "AE@host:port that gets exam reports as Encapsulated PDF; empty: none")
    shadow_queue_size: int = setting("SHADOW_QUEUE_SIZE", 16,
                                     "shadow gradings waiting per API process; more are dropped and counted")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides) -> "Settings":
        environ = os.environ if environ is None else environ
        values = {}
        for f in fields(cls):
            raw = environ.get(f.metadata["env"])
            if raw is not None and raw.strip() != "":
                values[f.name] = _parse(f.metadata["env"], f.type, raw.strip())
        values.update(overrides)
        return cls(**values)

    def __post_init__(self):
        if self.storage_backend not in ("local", "s3"):
            raise SettingsError(f"STORAGE_BACKEND must be 'local' or 's3', not {self.storage_backend!r}")
        if self.storage_backend == "s3" and not self.s3_bucket_name:
            raise SettingsError("S3_BUCKET_NAME is required when STORAGE_BACKEND=s3")
        for name in ("port", "max_upload_bytes", "s3_presign_ttl_seconds", "gunicorn_threads",
                     "torchserve_timeout_seconds", "dicom_port", "dicom_health_port", "shadow_queue_size"):
            if getattr(self, name) <= 0:
                raise SettingsError(f"{_env(name)} must be positive")
        if self.database_statement_timeout_seconds < 0:
            raise SettingsError("DATABASE_STATEMENT_TIMEOUT_SECONDS must not be negative")
        if 2 * self.database_deadline_seconds > self.torchserve_timeout_seconds:
            # A request may wait twice (a pooled connection's check, then its statement): with a
            # black-holed database it must still get its 503 within TorchServe's window.
            raise SettingsError("DATABASE_STATEMENT_TIMEOUT_SECONDS must be at most half of "
                                "TORCHSERVE_TIMEOUT_SECONDS")
        if self.s3_presign_ttl_seconds > MAX_PRESIGN_TTL_SECONDS:
            # A presigned link is a bearer credential for one photograph: keep it short-lived.
            raise SettingsError(f"S3_PRESIGN_TTL_SECONDS must be at most {MAX_PRESIGN_TTL_SECONDS}")
        if isinstance(self.cors_origins, str):
            object.__setattr__(self, "cors_origins", _origins(self.cors_origins))
        if isinstance(self.dicom_allowed_ae_titles, str):
            object.__setattr__(self, "dicom_allowed_ae_titles", _origins(self.dicom_allowed_ae_titles))
        if self.dicom_report_destination:
            from .dicom_report import parse_destination  # noqa: PLC0415 - avoids pydicom for every import

            try:
                parse_destination(self.dicom_report_destination)
            except ValueError as exc:
                raise SettingsError(str(exc)) from None
        if not 1 <= len(self.dicom_ae_title.strip()) <= 16:
            raise SettingsError("DICOM_AE_TITLE must be 1-16 characters")

    @property
    def database_deadline_seconds(self) -> float:
        """The longest wait on the database (statement_timeout and the client-side deadline)."""
        return self.database_statement_timeout_seconds or self.torchserve_timeout_seconds / 3

    @property
    def torchserve_max_in_flight_effective(self) -> int:
        return self.torchserve_max_in_flight or max(1, self.gunicorn_threads - 1)

    @property
    def workers(self) -> int:
        return self.web_concurrency or _cpu_workers()

    @property
    def worker_timeout(self) -> int:
        # A worker blocked on a slow TorchServe call must not be killed before the call times out.
        return self.gunicorn_timeout or int(self.torchserve_timeout_seconds) + 30


def _env(name: str) -> str:
    return next(f.metadata["env"] for f in fields(Settings) if f.name == name)


def _origins(raw: str) -> tuple:
    return tuple(o.strip() for o in raw.split(",") if o.strip())


def _parse(env: str, kind, raw: str):
    kind = kind if isinstance(kind, str) else kind.__name__
    try:
        if kind == "bool":
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind == "tuple":
            return _origins(raw)
        return raw
    except ValueError:
        raise SettingsError(f"{env}={raw!r} is not a valid {kind}") from None


ENV_VARS: tuple[str, ...] = tuple(f.metadata["env"] for f in fields(Settings))
