"""The benchmark report's verdicts (bench/ratios.py) from hand-made cells: a target over cells is
judged on every cell, never on the best one, and an unmeasured cell is never reported as met."""
import copy

from bench import clinic, clinic_report, ratios
from bench.report_markdown import markdown


def _pair(a_rps, b_rps, a_p50, b_p50):
    cell = {"throughput_rps": a_rps, "p50_ms": a_p50, "load_average_1m": 0.5}
    return [cell, {**cell, "throughput_rps": b_rps, "p50_ms": b_p50}]


def _row(backend, connection, concurrency, ratio, added, ts_rps=20.0):
    pair = _pair(ts_rps, ts_rps * ratio, 50.0, 50.0 + added)
    return {"a": f"torchserve direct, {connection}", "b": f"api {backend}, {connection}", "backend": backend,
            "connection": connection, "concurrency": concurrency, "rounds": [pair],
            **clinic.compare([pair])}


def _report(worst_ratio=0.9, limit_rps=100.0):
    rows = [_row(b, conn, c, 0.95, 5.0) for b in ("embedded", "postgres-s3")
            for conn in ("keep-alive", "fresh connection") for c in (1, 8)]
    rows[-1] = _row("postgres-s3", "fresh connection", 8, worst_ratio, 12.0, ts_rps=40.0)
    speed = [{"network": "efficientnet_b0 (random weights)", "input_px": px, "batch": b, "engine": e,
              "ms_per_image": 10.0, "images_per_s": 100.0, "speedup_vs_eager": s, "speedup_range": [s, s]}
             for px, b, s in ((384, 1, 2.1), (384, 8, 1.9), (512, 1, 2.0), (512, 8, 2.4))
             for e in ("eager", "onnx")]
    agreement = {"samples": {"a.jpg": {"eager": 1, "onnx": 1, "onnx-int8": 1}}, "heldout_images": 400,
                 "onnx": {"sample_grades_identical": True, "max_probability_difference": 2e-6,
                          "grade_agreement": 1.0, "quadratic_kappa_vs_eager": 1.0, "referable_agreement": 1.0},
                 "onnx-int8": {"sample_grades_identical": True, "max_probability_difference": 0.2,
                               "grade_agreement": 0.9875, "quadratic_kappa_vs_eager": 0.997,
                               "referable_agreement": 0.9975}}
    return {"cells": [], "settings": {}, "meta": {}, "machine": {"logical_cores": 2}, "versions": {},
            "clinic": {"started_at": "t0", "finished_at": "t1",
                       "machine": {"cpus": 2, "load_average_at_start": [0.5], "load_average_at_end": [2.0]},
                       "inputs": [{"name": "idrid_01.jpg", "megapixels": 9.71, "bytes": 946000}],
                       "plan": {"backends": ["embedded", "postgres-s3"], "concurrency": [1, 8],
                                "requests_per_cell": 40, "rounds": 1, "torchserve": {"tag": "b8-d5-wcores-t1"},
                                "limit_seconds": 15},
                       "api_vs_torchserve": rows, "before_after": [], "resend": [], "naive": [], "engines": [],
                       "limit": [{"engine": "eager", "batch": 1, "processes": 2, "images_per_s": limit_rps},
                                 {"engine": "onnx", "batch": 8, "processes": 2, "images_per_s": limit_rps / 2}]},
            "engine": {"conditions": {}, "speed": speed, "agreement_demo": agreement}}


def _by_target(report):
    return {t["target"].split(" (")[0]: t for t in ratios.targets(report)}


def test_item_1_is_judged_on_its_worst_cell():
    t = _by_target(_report(worst_ratio=0.8))
    ratio = next(v for k, v in t.items() if k.startswith("API ÷ TorchServe"))
    added = next(v for k, v in t.items() if k.startswith("API adds"))
    assert ratio["value"] == 0.8 and ratio["met"] is False and "postgres-s3, fresh connection, c=8" in ratio["where"]
    assert added["value"] == 12.0 and added["met"] is False


def test_item_1_met_only_when_every_cell_is_measured():
    report = _report(worst_ratio=0.9)
    report["clinic"]["api_vs_torchserve"][-1] = _row("postgres-s3", "fresh connection", 8, 0.9, 5.0)
    assert all(t["met"] for t in ratios.targets(report) if t["item"] == "1")
    report["clinic"]["api_vs_torchserve"].pop()
    assert all(t["met"] is None for t in ratios.targets(report) if t["item"] == "1")


def test_item_2_and_the_limit():
    t = _by_target(_report(limit_rps=100.0))
    speed = next(v for k, v in t.items() if k.startswith("ONNX Runtime"))
    assert speed["value"] == 1.9 and speed["met"] is True and "384 px, batch 8" in speed["where"]
    report = _report()
    report["engine"]["speed"][-1]["speedup_vs_eager"] = 1.7  # one row under 1.8x fails the target
    assert next(t for t in ratios.targets(report) if t["target"].startswith("ONNX Runtime"))["met"] is False
    limit = next(v for v in t.values() if v["item"] == "limit")
    assert limit["value"] == 0.4 and limit["met"] is True  # fastest TorchServe cell 40 req/s / 100 img/s
    assert ratios.limit_note(ratios.torchserve_over_limit(_report(limit_rps=30.0))).startswith("TorchServe direct beat")
    assert ratios.int8_adoptable(_report()["engine"]["agreement_demo"]) is False


def test_the_readme_shows_targets_from_the_cells():
    report = copy.deepcopy(_report(worst_ratio=0.8))
    report["targets"], report["ratios"] = ratios.targets(report), ratios.ratios(report)
    report["limit_note"], report["optimisation_rows"] = None, []
    text = markdown(report)
    assert "## Targets" in text and "**not met**" in text and "| postgres-s3 | fresh connection | 8 |" in text
    assert "api_over_torchserve " not in text  # the best-vs-best ratio is gone


def test_the_real_size_network_cells_are_judged_on_their_own_worst_cell():
    """bench/real_network.py's cells get rows of their own, beside (never instead of) the demo
    network's; absent from a run, they are not claimed."""
    report = _report()
    demo = [t for t in ratios.targets(report) if t["item"] == "1"]
    assert not any(t["item"] == "1, real-size network" for t in ratios.targets(report))
    real = [_row(b, "keep-alive", c, 0.97, 4.0) for b in ("embedded", "postgres-s3") for c in (1, 8)]
    real[1] = _row("embedded", "keep-alive", 8, 0.83, 9.0)
    report["clinic"]["api_vs_torchserve_real_network"] = real
    ratio, added = [t for t in ratios.targets(report) if t["item"] == "1, real-size network"]
    assert ratio["value"] == 0.83 and ratio["met"] is False and "embedded, keep-alive, c=8" in ratio["where"]
    assert added["value"] == 9.0 and added["met"] is True
    assert [t for t in ratios.targets(report) if t["item"] == "1"] == demo  # the demo network's, unchanged


def test_the_split_core_cells_get_rows_of_their_own_and_a_section():
    """bench/split_cores.py's cells (TorchServe on half the CPUs, the API's side on the other
    half) are judged on their own worst cell, beside the shared arrangement's rows."""
    report = _report()
    shared = [t for t in ratios.targets(report) if t["item"] == "1"]
    split = [{**_row(b, "keep-alive", c, 0.9, 12.5 if c == 1 else 3.0), "arrangement": "API tier on its own cores",
              "torchserve_cpus": [0], "api_side_cpus": [1]} for b in ("embedded", "postgres-s3") for c in (1, 8)]
    report["clinic"]["api_vs_torchserve_split_cores"] = split
    ratio, added = [t for t in ratios.targets(report) if t["item"] == "1, API tier on its own cores"]
    assert ratio["value"] == 0.9 and ratio["met"] is True
    assert added["value"] == 12.5 and added["met"] is False and "c=1" in added["where"]
    assert [t for t in ratios.targets(report) if t["item"] == "1"] == shared
    text = "\n".join(clinic_report.sections(report["clinic"]))
    assert "## API end to end against TorchServe direct, API tier on its own cores" in text
    assert "TorchServe on CPUs [0]" in text
