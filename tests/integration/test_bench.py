"""The benchmark's smoke variant end to end (`make bench-smoke`): real TorchServe, gunicorn,
SeaweedFS and PostgreSQL, every section of bench/run.py in one run.

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
    # Each TorchServe got its (smoke-sized) warm-up before its first cell, and the report says so.
    assert report["settings"]["torchserve_warm_up_requests"] == 16
    assert "Every TorchServe was sent 16 predictions" in (out / "README.md").read_text()


def test_every_cell_is_sane(smoke_report):
    _, report = smoke_report
    assert {c["section"] for c in report["cells"]} == {"torchserve", "connection"}
    for cell in report["cells"]:
        assert cell["errors"] == {}, cell
        assert cell["ok"] == cell["requests"] > 0
        assert cell["throughput_rps"] > 0
        assert 0 < cell["p50_ms"] <= cell["p95_ms"] <= cell["p99_ms"] <= cell["max_ms"]


def test_clinic_section_answers_every_cell(smoke_report):
    """The clinic's paired cells, every system answering (a cell where nothing answers stops the
    run, e.g. the 'before' app of bench/sequential_app.py), on both backends and connections."""
    _, report = smoke_report
    c = report["clinic"]
    assert c["plan"]["torchserve"]["tag"] == bench.DEFAULTS.tag
    cells = {(r["backend"], r["connection"], r["concurrency"]) for r in c["api_vs_torchserve"]}
    assert cells == {(b, conn, k) for b in ("embedded", "postgres-s3") for conn in ("keep-alive", "fresh connection")
                     for k in (1, 8)}
    assert {r["b"] for r in c["before_after"]} == {"api embedded", "api postgres-s3"}
    split = {(r["backend"], r["concurrency"]) for r in c["api_vs_torchserve_split_cores"]}
    assert split == {(b, k) for b in ("embedded", "postgres-s3") for k in (1, 8)}  # the CI machine has 2 CPUs
    for key in ("api_vs_torchserve", "api_vs_torchserve_split_cores", "before_after", "resend", "naive", "engines"):
        assert c[key], key
        for row in c[key]:
            assert row["throughput_ratio_b_over_a"] > 0, row["b"]
    assert {(r["engine"], r["batch"]) for r in c["limit"]} == {(e, b) for e in ("eager", "onnx") for b in (1, 8)}
    assert all(r["images_per_s"] > 0 for r in c["limit"])
    readme = (smoke_report[0] / "README.md").read_text()
    assert "# The clinic's case" in readme and "## Inference engines in-process" in readme


def test_engine_section(smoke_report):
    _, report = smoke_report
    e = report["engine"]
    assert {(r["engine"], r["batch"]) for r in ratios.real_size_rows(report, "eager")} == {("eager", 1), ("eager", 8)}
    assert all(r["images_per_s"] > 0 for r in e["speed"])
    assert e["agreement_demo"]["onnx"]["max_probability_difference"] < 0.5


def test_every_target_and_ratio_is_reported(smoke_report):
    _, report = smoke_report
    assert [t["item"] for t in report["targets"]] == ["1", "1", "1, real-size network", "1, real-size network",
                                                      "1, API tier on its own cores", "1, API tier on its own cores",
                                                      "2", "2", "2", "limit", "earlier"]
    for t in report["targets"]:  # judged from this run's cells, whichever way
        assert t["met"] in (True, False) and t["value"] is not None, t
    values = report["ratios"]["values"]
    for key in ("torchserve_direct_over_limit", "naive_over_torchserve_c8", "resend_over_new_bytes_c1",
                "api_after_over_before_postgres-s3_c8", "preprocess_over_full_decode_resize"):
        assert values[key] > 0, key
    assert set(values) == set(report["ratios"]["compares"])
    names = [o["name"] for o in report["optimisation_rows"]]
    assert any(n.startswith("API image check, in-process") for n in names), names


def test_preprocessing_split_and_memory(smoke_report):
    _, report = smoke_report
    for row in report["in_process"]["preprocess"]:
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
