"""`make run` / `make stack` leave their settings in var/stack.env for the flask commands an
operator runs beside them (check-storage needs the local S3 server's endpoint and key)."""
import stat
import subprocess
import types

from scripts.serving import stack


def test_the_file_sources_back_to_the_same_settings_and_only_its_owner_reads_it(tmp_path):
    env = {"DATABASE_URL": "postgresql://postgres@127.0.0.1:5432/clarity", "S3_ENDPOINT_URL": "http://127.0.0.1:8333",
           "AWS_SECRET_ACCESS_KEY": "it's a $ecret `with` \"quotes\" and spaces"}
    path = stack.write_env_file(tmp_path / "stack.env", env)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    names = " ".join(env)
    out = subprocess.run(["bash", "-c", f'set -a; . "{path}"; for k in {names}; do printf "%s=%s\\0" "$k" "${{!k}}"; done'],
                         capture_output=True, text=True, check=True, env={}).stdout
    assert dict(item.split("=", 1) for item in out.split("\0") if item) == env


def test_an_older_file_with_wider_permissions_is_narrowed(tmp_path):
    path = tmp_path / "stack.env"
    path.write_text("OLD=1\n")
    path.chmod(0o644)
    stack.write_env_file(path, {"A": "1"})
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text() == "A=1\n"


def test_the_banner_says_how_to_use_it():
    dicom = types.SimpleNamespace(port=11112, health_port=11113, env={})
    banner = stack._banner("http://127.0.0.1:8000", {}, dicom)
    assert f"{stack.ENV_FILE}" in banner and "check-storage" in banner
