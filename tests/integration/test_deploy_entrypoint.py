"""The TorchServe image's start-up, run for real without Docker (the static checks of the same files
are in tests/deploy/test_deploy.py)."""
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from control_api.torchserve_keys import TorchServeKeys
from scripts.serving.processes import free_port, wait_for
from tests.deploy.test_deploy import DEPLOY, REPO, _healthcheck

pytestmark = pytest.mark.integration


def test_entrypoint_serves_the_model_and_stops_cleanly_on_sigterm(tmp_path, model_store):
    """entrypoint.sh + the container config + torchserve-log4j2.xml with a real TorchServe: the empty store
    is seeded with the baked archive, the model gets a READY worker, SIGTERM stops everything.

    Only the image's absolute paths and the bind addresses differ (loopback ports through
    TS_<PROPERTY> variables, which the container config's enable_envvars_config allows).
    """
    store, baked = tmp_path / "model-store", tmp_path / "baked"
    store.mkdir()
    baked.mkdir()
    shutil.copy(model_store / "dr_1.0.mar", baked / "dr_1.0.mar")
    config = tmp_path / "config.properties"
    config.write_text((REPO / "config.properties").read_text() + "\n"
                      + (REPO / "torchserve-container.properties").read_text())
    ports = {kind: free_port() for kind in ("INFERENCE", "MANAGEMENT", "METRICS")}
    (tmp_path / "tmp").mkdir()
    keys = tmp_path / "keys"  # the image's TS_KEY_DIR, a volume shared with the API
    env = {**os.environ, "TS_CONFIG_FILE": str(config), "TS_KEY_DIR": str(keys),
           "TORCHSERVE_KEY_FILE": str(keys / "key_file.json"), "MODEL_PATH": str(store), "BAKED_MODELS": str(baked),
           "MODEL_VERSION": "1.0",
           "SERVE_LOG_CONFIG": str(REPO / "torchserve-log4j2.xml"), "TEMP": str(tmp_path / "tmp"),
           "TS_METRICS_CONFIG": str(REPO / "torchserve-metrics.yaml"), "DR_TORCH_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           **{f"TS_{k}_ADDRESS": f"http://127.0.0.1:{p}" for k, p in ports.items()},
           # gRPC (always on in 0.12, loopback in the config): free ports, so parallel servers never clash.
           "TS_GRPC_INFERENCE_PORT": str(free_port()), "TS_GRPC_MANAGEMENT_PORT": str(free_port())}
    env.pop("TMPDIR", None)
    log = open(tmp_path / "stdout.log", "wb")
    proc = subprocess.Popen(["sh", str(DEPLOY / "torchserve" / "entrypoint.sh")], env=env, cwd=tmp_path,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    management = f"http://127.0.0.1:{ports['MANAGEMENT']}"
    try:
        wait_for(lambda: proc.poll() is not None or _healthcheck("--model", "dr", management, env=env) == 0,
                 timeout=180, what="model dr READY", interval=1)
        output = (tmp_path / "stdout.log").read_text()
        assert proc.poll() is None, output[-3000:]
        assert " MODEL_LOG - " in output, "worker output must reach stdout, where the awslogs driver collects it"
        assert not (tmp_path / "logs").exists(), "no log files: the root filesystem is read-only"
        assert (store / "dr_1.0.mar").read_bytes() == (baked / "dr_1.0.mar").read_bytes(), "the store is seeded"
        _token_authorization_on_and_model_api_off(management, keys / "key_file.json", store)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 0
        assert not _group_alive(proc.pid), "Java or a worker outlived the entrypoint"
    finally:
        if proc.poll() is None or _group_alive(proc.pid):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=10)
        log.close()


def _token_authorization_on_and_model_api_off(management: str, key_file: Path, store: Path) -> None:
    """Finding 8 of issue 15: no call without the key, no registration at all (models come at start)."""
    assert oct(key_file.stat().st_mode & 0o777) == "0o600"
    refused = requests.get(f"{management}/models", timeout=10)
    assert refused.status_code == 400 and refused.json()["type"] == "InvalidKeyException"
    auth = TorchServeKeys(key_file, management)
    headers = auth.headers(auth.key("management"))
    assert requests.get(f"{management}/models", headers=headers, timeout=10).status_code == 200
    shutil.copy(store / "dr_1.0.mar", store / "dr_9.mar")
    register = requests.post(f"{management}/models", params={"url": "dr_9.mar"}, headers=headers, timeout=30)
    assert register.status_code == 405, register.text
    unregister = requests.delete(f"{management}/models/dr/1.0", headers=headers, timeout=30)
    assert unregister.status_code == 405, unregister.text


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True
