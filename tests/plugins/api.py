"""Fixtures for the control API.

Unit tests: `app` and `client` on SQLite in tmp, local image storage in tmp and a fake
TorchServe client (FakeTorchServe). Integration tests use the real services through
`api_env` and `live_api` (gunicorn with real TorchServe, S3 and PostgreSQL when asked).
"""
from __future__ import annotations

import dataclasses
import io
import os
import subprocess
import sys
from pathlib import Path

import PIL.Image
import pytest

from control_api import create_app, migrations
from control_api.auth import create_key
from control_api.db import db
from control_api.settings import Settings
from control_api.torchserve import ImageRejected, ModelVersion, TorchServeUnavailable, UnknownModelVersion
from scripts.ml.card import SYNTHETIC_DISCLAIMER
from scripts.ml.tiny_model import GRADE_LABELS
from tests.support.images import encode

REPO = Path(__file__).resolve().parents[2]


class FakeTorchServe:
    """Answers like TorchServe's DR model (docs/contracts.md §4). Set `mode` to 'grade',
    'ungradable', 'down' or 'reject', and `grade` to the grade to return."""

    model_name = "dr"

    def __init__(self):
        self.mode = "grade"
        self.grade = 1
        self.versions = ("1.0", "2.0")
        self.default_version = "1.0"
        self.calls: list[dict] = []
        self.cards: dict[str, dict] = {}
        self.version_grades: dict[str, int] = {}  # a version that answers its own grade

    def predict(self, image: bytes, content_type: str, version: str | None = None) -> dict:
        self.calls.append({"bytes": len(image), "content_type": content_type, "version": version})
        if self.mode == "down":
            raise TorchServeUnavailable("TorchServe is unreachable")
        if self.mode == "reject":
            raise ImageRejected(code="truncated_image", status=422, message="The image data ends early.")
        # Like the real handler: bytes that do not decode are that request's 422.
        try:
            with PIL.Image.open(io.BytesIO(image)) as img:
                img.load()
        except Exception:
            raise ImageRejected(code="corrupt_image", status=422, message="The image data could not be decoded.") from None
        if version is not None and version not in self.versions:
            raise UnknownModelVersion(version)
        model = {"name": "dr", "version": version or self.default_version, "synthetic_training_data": True}
        answer = {"grade": None, "label": None, "probabilities": None, "referable": None,
                  "referable_threshold": 2, "gradable": False,
                  "quality": {"gradable": False, "score": 0.2,
                              "reasons": [{"code": "too_dark", "message": "The image is too dark."}]},
                  "model": model, "disclaimer": SYNTHETIC_DISCLAIMER,
                  "timings_ms": {"decode": 1.0, "preprocess": 1.0, "inference": None}}
        if self.mode == "grade":
            grade = self.version_grades.get(version or self.default_version, self.grade)
            probabilities = [0.02] * 5
            probabilities[grade] = 0.92
            answer.update(grade=grade, label=GRADE_LABELS[grade], probabilities=probabilities,
                          referable=grade >= 2, gradable=True,
                          quality={"gradable": True, "score": 0.9, "reasons": []},
                          timings_ms={"decode": 1.0, "preprocess": 1.0, "inference": 2.0})
        return answer

    def explain(self, image: bytes, content_type: str, version: str | None = None) -> dict:
        """predict() plus an explanation shaped like the handler's: a 4x4 map peaking top right
        and the crop's box in the photograph."""
        answer = self.predict(image, content_type, version)
        answer["explanation"] = None if not answer["gradable"] else {
            "method": "grad-cam", "target_grade": answer["grade"], "map_size": [4, 4],
            "map": [[0, 0, 0.5, 1], [0, 0, 0.3, 0.5], [0, 0, 0, 0], [0, 0, 0, 0]],
            "crop_box": [0.1, 0.0, 0.9, 1.0], "overlay_png_base64": ""}
        return answer

    def models(self) -> list[ModelVersion]:
        if self.mode == "down":
            raise TorchServeUnavailable("TorchServe management API is unreachable")
        return [ModelVersion(v, v == self.default_version, 1, 1, 1, 0) for v in self.versions]

    def default_model_version(self) -> str | None:
        return None if self.mode == "down" else self.default_version

    def describe(self, version: str | None = None, customized: bool = False) -> list[dict]:
        if self.mode == "down":
            raise TorchServeUnavailable("TorchServe management API is unreachable")
        version = version or self.default_version
        if version not in self.versions:
            raise UnknownModelVersion(version)
        return [{"modelName": "dr", "modelVersion": version, "workers": [{"status": "READY"}]}]

    def metadata(self, version: str) -> dict:
        """model_meta.json as the handler describes it; `cards` maps a version to its held_out."""
        self.describe(version)
        return {"name": "dr", "version": version, "synthetic": True, "held_out": self.cards.get(version)}

    def ready(self) -> bool:
        if self.mode == "down":
            raise TorchServeUnavailable("TorchServe management API is unreachable")
        return True


def image_bytes(fmt: str = "JPEG", size: tuple[int, int] = (256, 256), color=(120, 40, 20)) -> bytes:
    return encode(PIL.Image.new("RGB", size, color), fmt)


@pytest.fixture
def api_settings(tmp_path) -> Settings:
    return Settings.from_env({}, database_url=f"sqlite:///{tmp_path / 'clarity.db'}",
                             local_storage_dir=str(tmp_path / "images"))


@pytest.fixture
def fake_torchserve() -> FakeTorchServe:
    return FakeTorchServe()


@pytest.fixture
def make_app(api_settings, fake_torchserve):
    """make_app(schema=LATEST, **setting changes) -> an app with the fake TorchServe, its database
    migrated to `schema`."""

    def make(schema: int = migrations.LATEST, **changes):
        app = create_app(dataclasses.replace(api_settings, **changes), torchserve=fake_torchserve)
        app.config["TESTING"] = True
        with app.app_context():
            migrations.migrate(db.obj, target=schema)
        return app

    yield make
    db.close_all()  # the pool's connections, not just this thread's


@pytest.fixture
def app(make_app):
    return make_app()


@pytest.fixture
def client(app):
    return app.test_client()


def bearer(app, role: str = "clinician") -> dict:
    """Headers with a fresh API key of this role, made in `app`'s database."""
    with app.app_context():
        _, token = create_key(role, f"test {role}")
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def make_key(app):
    """make_key(role) -> headers with a fresh API key of that role."""
    return lambda role="clinician": bearer(app, role)


@pytest.fixture
def clinician(make_key) -> dict:
    return make_key("clinician")


@pytest.fixture
def patient(client, clinician) -> dict:
    response = client.post("/api/v1/patients", headers=clinician, json={
        "name": "Ada Testpatient", "birth_date": "1961-03-04", "medical_record_number": "MRN-0042", "sex": "female"})
    assert response.status_code == 201, response.json
    return response.json


def upload(client, headers, patient_id, data: bytes, *, eye="left", filename="eye.jpg", extra_headers=None,
           **fields):
    form = {"image": (io.BytesIO(data), filename), "eye": eye, **fields}
    return client.post(f"/api/v1/patients/{patient_id}/screenings", headers={**headers, **(extra_headers or {})},
                       data=form, content_type="multipart/form-data")


# --- integration: the real API under gunicorn -------------------------------------------------

def flask_cli(env: dict, *args: str) -> subprocess.CompletedProcess:
    """Run `flask --app control_api ARGS` in a subprocess with this environment."""
    return subprocess.run([sys.executable, "-m", "flask", "--app", "control_api", *args], cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO), **env}, capture_output=True, text=True,
                          timeout=120)


@pytest.fixture
def api_env(tmp_path):
    """Settings for a live API on SQLite and local storage; tests add S3/PostgreSQL/TorchServe."""
    return {"DATABASE_URL": f"sqlite:///{tmp_path / 'clarity.db'}", "STORAGE_BACKEND": "local",
            "LOCAL_STORAGE_DIR": str(tmp_path / "images"), "LOG_LEVEL": "INFO",
            "TORCHSERVE_TIMEOUT_SECONDS": "20", "UPLOAD_RATE_LIMIT": "1000/minute"}


@pytest.fixture
def live_api(tmp_path):
    """live_api(env) -> a started scripts.serving.processes.Gunicorn after `flask migrate`; stopped at teardown."""
    from scripts.serving.processes import Gunicorn

    started = []

    def start(env: dict, workers: int = 2):
        result = flask_cli(env, "migrate")
        assert result.returncode == 0, result.stderr
        server = Gunicorn(tmp_path / f"gunicorn{len(started)}", env, workers=workers)
        started.append(server)
        return server.start(timeout=60)

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def fresh_pg_url(pg_database):
    """An empty PostgreSQL database for one test (fails, never skips, without PostgreSQL)."""
    from scripts.serving.processes import PostgresDatabase

    scratch = PostgresDatabase(pg_database.admin_url, prefix="clarity_api").create()
    yield scratch.url
    scratch.drop()  # DROP ... WITH (FORCE) ends connections left in pools
