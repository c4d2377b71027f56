"""The README's ML loop, run as written against a real stack (gunicorn, TorchServe, PostgreSQL,
SeaweedFS): train -> evaluate -> compare -> archive -> register -> shadow -> report -> promote
-> roll back. Only sizes change (data set, network, epochs) and the addresses of this private
stack; each change is listed below and must apply exactly once, so the README cannot drift
from what is tested. Then: the clinical record never shows the candidate, and a promotion
survives a restart of TorchServe.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import requests

from scripts.ml import archive
from scripts.ml.tiny_model import make_checkpoint
from scripts.serving import model_state, registry
from scripts.serving.processes import TorchServe
from tests.support.harness import PrivateStack

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]

# (README text, what the test runs instead): small and quick on 2 shared cores.
SIZES = [
    ("--out data/synth --n 1500 --seed 0 --size 512", "--out data/synth --n 120 --seed 0 --size 256"),
    ("--out data/synth-test --n 300 --seed 1 --size 512", "--out data/synth-test --n 40 --seed 1 --size 256"),
    ("--arch efficientnet_b0 --input-size 224 --epochs 20",
     "--arch mobilenet_v3_small --input-size 128 --epochs 3 --batch-size 16 --quiet"),
]


def readme_loop() -> str:
    text = (REPO / "README.md").read_text()
    block = re.search(r"<!-- ml-loop:begin -->\s*```sh\n(.*?)```\s*<!-- ml-loop:end -->", text, re.S)
    assert block, "README.md lost its ml-loop block"
    return block.group(1)


@pytest.mark.timeout(3000)
def test_readme_loop_runs_as_written(tmp_path):
    workdir = tmp_path / "clone"
    workdir.mkdir()
    # The README runs from the repository root: the same names here, pointing at the repository.
    for name in (".venv", "samples"):
        (workdir / name).symlink_to(REPO / name)
    store = workdir / "model_store"
    archive.archive(make_checkpoint(tmp_path / "served.pt"), "1.0", model_store=store)

    script = readme_loop()
    for old, new in SIZES:
        assert script.count(old) == 1, f"README changed: {old!r}"
        script = script.replace(old, new)

    with PrivateStack(tmp_path / "stack", store, workers=2) as stack:
        assert script.count("http://127.0.0.1:8000") == 1
        script = script.replace("http://127.0.0.1:8000", stack.url)
        env = {**os.environ, **stack.env, "PYTHONPATH": str(REPO), "MODEL_PATH": "model_store",
               "TORCHSERVE_MANAGEMENT_URL": stack.torchserve.management_url,
               # A three-epoch network is not a good model: let the gate pass it here, its
               # refusals are unit-tested (tests/unit/test_archive_models.py).
               "PROMOTE_MIN_QWK": "-1", "PROMOTE_MIN_REFERABLE_SENSITIVITY": "0",
               "PROMOTE_MIN_SHADOW_KAPPA": "-1", "PROMOTE_MIN_SHADOW_REFERABLE_AGREEMENT": "0"}
        env.pop("VIRTUAL_ENV", None)
        run = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=workdir, env=env,
                             capture_output=True, text=True, timeout=2700)
        log = run.stdout + run.stderr
        (tmp_path / "loop.log").write_text(log)
        assert run.returncode == 0, log[-6000:]

        # evaluate stored the held-out metrics; the archive put them in its card and meta
        assert "held-out metrics stored in" in log
        assert "referable = predicted grade >= 2 (what serving answers)" in log
        assert "paired QWK difference B - A" in log and "exact McNemar" in log
        card = (store / "dr_1.1.md").read_text()
        assert "## Held-out metrics" in card and "test.quadratic_kappa.value" in card
        # register reported progress and started workers
        assert re.search(r"registering dr 1\.1 with \d+ workers", log)
        assert "registered dr 1.1 (READY)" in log
        # the shadow report covered the uploaded photographs
        photographs = len(list((REPO / "samples").glob("*.jpg")))
        match = re.search(r"candidate 1\.1 vs clinical 1\.0: (\d+) photographs", log)
        assert match and 0 < int(match.group(1)) <= photographs, log[-3000:]
        assert "quadratic weighted kappa" in log and "confusion (rows: clinical, columns: candidate)" in log
        # promoted, then rolled back; both recorded
        assert "dr: default is 1.1 (was 1.0)" in log and "dr: default is back to 1.0" in log
        events = [json.loads(line) for line in (store / model_state.PROMOTIONS_FILE).read_text().splitlines()]
        assert [(e["action"], e["to"]) for e in events] == [("promote", "1.1"), ("rollback", "1.0")]
        assert events[0]["gate"]["passed"] and events[0]["gate"]["card"]["images"] > 0

        # The clinical record: only 1.0 graded the photographs; the shadow rows sit apart.
        rows = stack.database.sql("SELECT DISTINCT model_version FROM grading")
        assert rows == [("1.0",)]
        shadow = stack.database.sql("SELECT count(*), min(model_version), max(model_version) FROM shadow_grading")
        assert shadow[0][0] >= int(match.group(1)) and shadow[0][1:] == ("1.1", "1.1")
        admin = stack.key("admin")
        patients = requests.get(f"{stack.url}/api/v1/patients", headers=admin, timeout=30).json()["items"]
        trial = next(p for p in patients if p["name"] == "Shadow Trial")
        summary = requests.get(f"{stack.url}/api/v1/patients/{trial['id']}/summary", headers=admin, timeout=30)
        assert summary.json()["eyes"]["left"]["model"]["version"] == "1.0"

        # A promotion survives a restart: TorchServe started from the saved state comes back on it.
        api = stack.torchserve.management()
        history = model_state.History(store / model_state.HISTORY_FILE)
        registry.promote(api, history, "dr", "1.1", force=True, reason="restart check")
        saved = history.serve_models("dr", store)
        assert saved.startswith("dr=dr_1.1.mar")
    restarted = TorchServe(tmp_path / "ts-again", store, models=saved)
    with restarted:
        restarted.wait_model_ready("dr", "1.1", timeout=180)
        default = requests.get(f"{restarted.management_url}/models/dr", timeout=30,
                               headers=restarted.auth("management")).json()[0]["modelVersion"]
        assert default == "1.1"
