"""The benchmark report: adds targets, ratios and before/after pairs (bench/ratios.py) to a run's
results and writes report.json, README.md (bench/report_markdown.py) and the PNG plots
(bench/report_plots.py)."""
from __future__ import annotations

import json
from pathlib import Path

from bench.inputs import write_json
from bench.ratios import limit_note, optimisations, ratios, targets, torchserve_over_limit
from bench.report_markdown import markdown
from bench.report_plots import plots

PLOTS = ("throughput.png", "latency.png", "memory.png", "preprocess.png", "scaling_rows.png", "soak_memory.png")

GPU_NOTE = ("Not run: no GPU machine was lent to this task, so every number here is CPU-only. The handler moves "
            "the model to `cuda:<gpu_id>` when TorchServe assigns a GPU (docs/model-serving.md); on a GPU the "
            "forward pass shrinks and preprocessing (Pillow/numpy on the CPU) dominates even more.")


def write(report: dict, out: Path) -> list[Path]:
    """Add targets, ratios and plots to `report` and write report.json, README.md and the PNGs to `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name in PLOTS:  # plots of sections not run this time would be stale
        (out / name).unlink(missing_ok=True)
    report["targets"] = targets(report)
    report["limit_note"] = limit_note(torchserve_over_limit(report))
    report["ratios"] = ratios(report)
    report["optimisation_rows"] = optimisations(report)
    report.setdefault("gpu", {"run": report.get("machine", {}).get("gpu") is not None, "note": GPU_NOTE})
    report["findings"] = "findings.md" if (out / "findings.md").exists() else None
    report["plots"] = plots(report, out)
    write_json(out / "report.json", report)
    (out / "README.md").write_text(markdown(report))
    return [out / "report.json", out / "README.md", *[out / p for p in report["plots"]]]


if __name__ == "__main__":  # re-render README and plots from an existing report.json
    import sys

    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/benchmarks")
    for path in write(json.loads((folder / "report.json").read_text()), folder):
        print(path)
