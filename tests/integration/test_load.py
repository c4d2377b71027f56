"""The load command, short: `python -m bench.loadtest --screenings 100 --concurrency 8` starts its
own stack (PostgreSQL database, SeaweedFS S3, TorchServe with the tiny model, gunicorn) and
must report zero errors and zero lost images, with every stored image's SHA-256 checked and
the memory of every process sampled. Nothing here is timed: throughput and latency are
reported, not asserted. The full run (2000 at 16) is in docs/guarantees.md."""
import json
import subprocess
import sys

import pytest

from scripts.serving.processes import REPO
from tests.support.harness import phi_in

pytestmark = pytest.mark.integration


def test_short_load_run_loses_nothing(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    result = subprocess.run([sys.executable, "-m", "bench.loadtest", "--screenings", "100", "--concurrency", "8",
                             "--patients", "10", "--model", "tiny", "--quiet", "--out", str(out),
                             "--workdir", str(work)],
                            cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((out / "load_100x8.json").read_text())
    assert report["ok"] is True
    assert report["errors"] == 0 and report["lost"] == 0
    assert sum(n for status, n in report["statuses"].items() if status in ("201", "202")) == 100
    consistency = report["consistency"]
    assert consistency["rows"] == consistency["objects"] == 100
    assert not any(consistency[k] for k in ("rows_without_object", "objects_without_row", "ungraded",
                                            "graded_twice", "lost", "sha_mismatch"))
    assert report["check_storage"] == {"exit": 0, "summary": "100 checked, 0 problems"}
    rss = report["rss"]
    for role in ("api: gunicorn master", "api: gunicorn worker 1", "api: gunicorn worker 2",
                 "torchserve: frontend (java)", "torchserve: model worker 1", "s3: seaweedfs (weed mini)"):
        assert 0 < rss[role]["start_mb"] <= rss[role]["peak_mb"], (role, rss)
        assert rss[role]["end_mb"] <= rss[role]["peak_mb"]
    assert "| errors (not 201/202) | 0 |" in (out / "load_100x8.md").read_text()
    logs = list(work.rglob("*.log"))  # gunicorn (with the app's output), TorchServe, SeaweedFS
    assert any(p.name == "gunicorn.log" for p in logs)
    assert not phi_in(logs)
