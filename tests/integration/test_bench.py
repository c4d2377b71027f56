"""The benchmark's smoke variant end to end: real TorchServe, gunicorn, SeaweedFS and PostgreSQL.

Checks that the report files are written and hold sane numbers; never how fast anything is
(speed is what `make bench` measures, on a quiet machine).
"""
import json

import pytest

from bench import ratios, run as bench

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def smoke_report(tmp_path_factory, pg_database):  # pg_database: fail, never skip, without PostgreSQL
    out = tmp_path_factory.mktemp("bench")
    assert bench.main(["--smoke", "--out", str(out)]) == 0
    return out, json.loads((out / "report.json").read_text())


def test_files_are_written(smoke_report):
    out, report = smoke_report
    assert (out / "README.md").read_text().startswith("# Benchmarks")
    for name in ("throughput.png", "latency.png", "memory.png", "preprocess.png", "scaling_rows.png",
                 "soak_memory.png"):
        assert (out / name).stat().st_size > 1000, name
        assert name in report["plots"]
    assert "error" not in report


def test_every_cell_is_sane(smoke_report):
    _, report = smoke_report
    sections = {c["section"] for c in report["cells"]}
    assert {"torchserve", "api", "naive"} <= sections
    for cell in report["cells"]:
        assert cell["errors"] == {}, cell
        assert cell["ok"] == cell["requests"] > 0
        assert cell["throughput_rps"] > 0
        assert 0 < cell["p50_ms"] <= cell["p95_ms"] <= cell["p99_ms"] <= cell["max_ms"]
    for run in report["limit"]["runs"]:
        assert run["throughput_rps"] > 0 and run["p50_ms"] <= run["p95_ms"] <= run["p99_ms"]


def test_every_ratio_and_target_is_reported(smoke_report):
    _, report = smoke_report
    values = report["ratios"]["values"]
    assert set(ratios.RATIO_KEYS) <= set(values)
    for key in ratios.RATIO_KEYS:
        assert values[key] is not None, key
        if key != "api_added_p50_ms":  # a difference, may be negative in a noisy smoke run
            assert values[key] > 0, key
    assert all(t["met"] in (True, False) for t in report["targets"])
    names = [o["name"] for o in report["optimisation_rows"]]
    assert any(n.startswith("API image check, in-process") for n in names), names


def test_api_cells_run_on_the_archive_defaults(smoke_report):
    _, report = smoke_report
    tag = report["settings"]["api_torchserve_config"]["tag"]
    assert tag == bench.DEFAULTS.tag
    ts = [c for c in report["cells"] if c["section"] == "torchserve" and c["config"] == tag]
    assert ts and all(c["torchserve_workers"] >= 1 for c in ts)
    assert {c["backend"] for c in report["cells"] if c["section"] == "api"} == {"embedded", "postgres-s3"}


def test_preprocessing_split_and_memory(smoke_report):
    _, report = smoke_report
    for row in report["limit"]["preprocess"]:
        assert all(row[k] > 0 for k in ("decode", "disc", "prepare", "full_decode_resize")), row
    peaks = report["memory_lifetime_mb"]
    assert any(k.startswith("torchserve") for k in peaks) and "naive" in peaks
    assert all(v["total_mb"] > 0 for v in peaks.values())


def test_scaling_and_soak(smoke_report):
    _, report = smoke_report
    level = report["scaling"]["rows"]["levels"][0]
    assert level["screenings"] >= 1000
    assert 0 < level["list"]["p50_ms"] <= level["list"]["p95_ms"]
    assert level["explain"]["list"] and level["explain"]["summary"]
    soak = report["scaling"]["soak"]
    assert soak["ok"] == soak["requests"] and len(soak["samples"]) >= 3


def test_clinic_smoke_answers_every_cell(tmp_path, pg_database):
    """`make bench-smoke`: bench.clinic's smoke run, every system it compares answering (a cell
    where nothing answers stops the run, e.g. the 'before' app of bench/sequential_app.py)."""
    from bench import clinic
    assert clinic.main(["--smoke", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "clinic.json").read_text())
    rows = [row for key in ("api_vs_torchserve", "before_after", "resend", "naive", "engines") for row in report[key]]
    assert {row["b"] for row in report["before_after"]} == {"api embedded"}
    for row in rows:
        assert row["throughput_ratio_b_over_a"] > 0, row["b"]
    assert (tmp_path / "clinic.md").read_text().startswith("# The clinic's case")
