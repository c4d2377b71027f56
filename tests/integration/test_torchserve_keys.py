"""Finding 8 of issue 15: TorchServe's token authorization on, through the real processes.

A TorchServe of its own whose keys expire after 6 s (token_expiration_min=0.1), the API under
gunicorn (2 workers) beside it with TORCHSERVE_KEY_FILE, the tools' management client: keys
that expire, are renewed behind the API's back, or change with a TorchServe restart never turn
into "TorchServe is down" for a clinician, the processes renew once per expiry instead of each
invalidating the others' key, and no key reaches a log.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from control_api.torchserve_keys import TorchServeKeys
from scripts.serving.processes import REPO, TorchServe
from tests.deploy.test_deploy import _healthcheck
from tests.support.harness import PrivateStack, jpeg, new_patient, upload

pytestmark = pytest.mark.integration

EXPIRY_SECONDS = 6


@pytest.fixture(scope="module")
def torchserve_short_keys(tmp_path_factory, model_store):
    server = TorchServe(tmp_path_factory.mktemp("ts-keys"), model_store, models="dr=dr_1.0.mar",
                        overrides={"token_expiration_min": EXPIRY_SECONDS / 60}, env={"DR_TORCH_THREADS": "1"})
    server.start(timeout=120)
    try:
        server.wait_model_ready("dr", "1.0", timeout=120)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory, model_store, torchserve_short_keys, s3_server):
    stack = PrivateStack(tmp_path_factory.mktemp("keys-stack"), model_store, torchserve=torchserve_short_keys,
                         s3=s3_server, api_env={"TORCHSERVE_MAX_IN_FLIGHT": "4"}, workers=2)
    stack.start()
    yield stack
    stack.stop()


@pytest.fixture(scope="module")
def clinic(stack):
    """(a clinician's headers, a patient of theirs)."""
    clinician = stack.key("clinician")
    return clinician, new_patient(stack, clinician, "keys")


def file_keys(ts: TorchServe) -> dict:
    data = json.loads(ts.key_file.read_text())
    return {"inference": data["inference"]["key"], "management": data["management"]["key"], "API": data["API"]["key"]}


def token_calls(ts: TorchServe, kind: str) -> int:
    log = ts.log_dir / "access_log.log"
    return log.read_text().count(f"/token?type={kind}") if log.exists() else 0


seen_keys: set[str] = set()


def graded(stack, clinic, seed: int) -> requests.Response:
    answer = upload(stack, *clinic, jpeg(seed=seed))
    assert answer.status_code == 201, (answer.status_code, answer.text)
    return answer


def test_every_call_but_metrics_needs_its_key(torchserve_short_keys):
    ts = torchserve_short_keys
    seen_keys.update(file_keys(ts).values())
    assert oct(ts.key_file.stat().st_mode & 0o777) == "0o600"
    for url in (f"{ts.inference_url}/ping", f"{ts.management_url}/models"):
        refused = requests.get(url, timeout=10)
        assert refused.status_code == 400 and refused.json()["type"] == "InvalidKeyException", url
    # Each key opens its own API only.
    wrong = requests.get(f"{ts.management_url}/models", headers=ts.auth("inference"), timeout=10)
    assert wrong.status_code == 400
    assert requests.get(f"{ts.management_url}/models", headers=ts.auth("management"), timeout=10).status_code == 200
    assert requests.get(f"{ts.metrics_url}/metrics", timeout=10).status_code == 200


def test_the_api_renews_expired_keys_once_for_all_its_processes(stack, clinic, torchserve_short_keys):
    ts = torchserve_short_keys
    graded(stack, clinic, 1)
    before = file_keys(ts)
    calls = token_calls(ts, "inference")
    time.sleep(EXPIRY_SECONDS + 1)  # every key the API holds has expired
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda i: upload(stack, *clinic, jpeg(seed=100 + i)), range(6)))
    assert [a.status_code for a in answers] == [201] * 6, [a.text for a in answers if a.status_code != 201]
    after = file_keys(ts)
    seen_keys.update(after.values())
    assert after["inference"] != before["inference"]
    # Two gunicorn workers, six threads: one renewal, the others took the renewed key from the file.
    assert token_calls(ts, "inference") - calls == 1
    # The management key (readiness, the version list) too.
    admin = stack.key("admin")
    models = requests.get(f"{stack.url}/api/v1/models", headers=admin, timeout=30)
    assert models.status_code == 200, models.text
    assert requests.get(f"{stack.url}/readyz", timeout=30).status_code == 200


def test_a_key_renewed_behind_the_apis_back_is_read_from_the_file(stack, clinic, torchserve_short_keys):
    ts = torchserve_short_keys
    graded(stack, clinic, 2)
    api_key = file_keys(ts)["API"]
    renewed = requests.get(f"{ts.management_url}/token", params={"type": "inference"},
                           headers={"Authorization": f"Bearer {api_key}"}, timeout=10)
    assert renewed.status_code == 200
    mine = file_keys(ts)["inference"]
    seen_keys.add(mine)
    calls = token_calls(ts, "inference")
    graded(stack, clinic, 3)
    # The API read the key now in the file instead of renewing it again (which would have
    # invalidated the key of whoever renewed it).
    assert token_calls(ts, "inference") == calls and file_keys(ts)["inference"] == mine


def test_a_restarted_torchserve_with_new_keys_is_used_at_once(stack, clinic, torchserve_short_keys):
    ts = torchserve_short_keys
    graded(stack, clinic, 4)
    old = file_keys(ts)
    ts.stop()
    ts.start(timeout=120)
    ts.wait_model_ready("dr", "1.0", timeout=120)
    new = file_keys(ts)
    seen_keys.update(new.values())
    assert new["API"] != old["API"]
    graded(stack, clinic, 5)


def test_the_tools_renew_the_management_key(torchserve_short_keys):
    ts = torchserve_short_keys
    time.sleep(EXPIRY_SECONDS + 1)
    env = {**os.environ, "PYTHONPATH": str(REPO), "TORCHSERVE_KEY_FILE": str(ts.key_file)}
    listing = subprocess.run([sys.executable, "-m", "scripts.serving.registry", "--management", ts.management_url,
                              "list"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert listing.returncode == 0 and "dr" in listing.stdout, listing.stderr
    time.sleep(EXPIRY_SECONDS + 1)
    assert _healthcheck("--model", "dr", ts.management_url, env=env) == 0
    seen_keys.update(file_keys(ts).values())
    # Without the key file, the tool says what is missing in one line.
    bare = subprocess.run([sys.executable, "-m", "scripts.serving.registry", "--management", ts.management_url,
                           "--key-file", "", "list"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert bare.returncode == 1 and "management key" in bare.stderr and "Traceback" not in bare.stderr, bare.stderr


def test_no_key_reaches_a_log(stack):
    assert seen_keys
    for path in stack.log_files():
        text = path.read_text(errors="replace")
        leaked = [k for k in seen_keys if k in text]
        assert not leaked, f"a TorchServe key in {path.name}"
