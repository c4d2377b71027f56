"""Settings come from the environment, and .env.example documents exactly those."""
from pathlib import Path

import pytest

from control_api.settings import ENV_VARS, Settings, SettingsError
from tests.support.deploy_parsing import env_example_sections

REPO = Path(__file__).resolve().parents[2]


def test_env_example_defaults_parse_to_the_code_defaults():
    api, _ = env_example_sections(REPO / ".env.example")
    assert Settings.from_env(api) == Settings()


def test_defaults():
    s = Settings.from_env({})
    assert s.database_url == "sqlite:///var/clarity.db"
    assert s.storage_backend == "local" and s.local_storage_dir == "var/images"
    assert s.torchserve_inference_url == "http://127.0.0.1:8080"
    assert s.torchserve_management_url == "http://127.0.0.1:8081"
    assert s.torchserve_model_name == "dr"
    assert s.max_upload_bytes == 20 * 1024 * 1024
    assert s.cors_origins == ()
    assert 1 <= s.workers <= 8
    assert s.worker_timeout > s.torchserve_timeout_seconds


def test_values_are_parsed_by_type():
    s = Settings.from_env({"DEBUG": "true", "PORT": "9000", "TORCHSERVE_TIMEOUT_SECONDS": "2.5",
                           "CORS_ORIGINS": "https://a.example, https://b.example", "WEB_CONCURRENCY": "3",
                           "STORAGE_BACKEND": "s3", "S3_BUCKET_NAME": "bucket"})
    assert s.debug is True and s.port == 9000 and s.torchserve_timeout_seconds == 2.5
    assert s.cors_origins == ("https://a.example", "https://b.example")
    assert s.workers == 3 and s.storage_backend == "s3"


@pytest.mark.parametrize("env, name", [
    ({"PORT": "eighty"}, "PORT"),
    ({"DEBUG": "maybe"}, "DEBUG"),
    ({"STORAGE_BACKEND": "ftp"}, "STORAGE_BACKEND"),
    ({"MAX_UPLOAD_BYTES": "0"}, "MAX_UPLOAD_BYTES"),
    ({"STORAGE_BACKEND": "s3", "S3_BUCKET_NAME": " "}, None),
])
def test_bad_values_name_the_variable(env, name):
    if name is None:  # a blank value means "use the default", which is valid
        Settings.from_env(env)
        return
    with pytest.raises(SettingsError, match=name):
        Settings.from_env(env)


def test_settings_are_frozen():
    with pytest.raises(Exception):
        Settings().port = 1


def test_the_database_deadline_fits_in_torchserves_window():
    """Finding 13 of issue 15: a request may wait on the database twice (a pooled connection's
    check, then a statement); with a black-holed database its 503 must still come within the
    window TORCHSERVE_TIMEOUT_SECONDS gives a request waiting on TorchServe."""
    assert Settings.from_env({}).database_deadline_seconds == 10.0
    assert Settings.from_env({"TORCHSERVE_TIMEOUT_SECONDS": "12"}).database_deadline_seconds == 4.0
    assert Settings.from_env({"DATABASE_STATEMENT_TIMEOUT_SECONDS": "15"}).database_deadline_seconds == 15.0
    with pytest.raises(SettingsError, match="at most half of TORCHSERVE_TIMEOUT_SECONDS"):
        Settings.from_env({"DATABASE_STATEMENT_TIMEOUT_SECONDS": "16"})
    with pytest.raises(SettingsError, match="at most half"):
        Settings.from_env({"DATABASE_STATEMENT_TIMEOUT_SECONDS": "5", "TORCHSERVE_TIMEOUT_SECONDS": "8"})
