"""The benchmark report's PNG plots, one function each, from report.json's content."""
from __future__ import annotations

from pathlib import Path

from bench.ratios import at


def _stacked_barh(ax, names: list[str], parts: dict[str, list[float]]) -> None:
    """One horizontal bar per name, made of the parts laid end to end."""
    left = [0.0] * len(names)
    for label, values in parts.items():
        ax.barh(names, values, left=left, label=label)
        left = [a + b for a, b in zip(left, values)]


def _label_barh(ax, xlabel: str, title: str) -> None:
    """Axis label, title and legend of a horizontal bar chart, first bar at the top."""
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.legend(fontsize=7)
    ax.invert_yaxis()


def plots(report: dict, out: Path) -> list[str]:
    """Draw every plot the report has data for into `out`; returns the file names written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    for draw in (_throughput, _latency, _memory, _preprocess, _scaling_rows, _soak_memory):
        fig, name = draw(report, plt)
        if fig is not None:
            fig.tight_layout()
            fig.savefig(out / name, dpi=110)
            plt.close(fig)
            made.append(name)
    return made


def _series(report: dict) -> dict[str, list]:
    """The TorchServe batch matrix's cells by configuration (the clinic's paired cells are tables)."""
    series = {}
    for c in report.get("cells", []):
        if c["section"] == "torchserve":
            series.setdefault(f"TorchServe {c['config']}", []).append(c)
    return series


def _throughput(report: dict, plt):
    import matplotlib

    series, st = _series(report), report.get("settings", {})
    if not series:
        return None, None
    fig, ax = plt.subplots(figsize=(11, 5.5))
    for name, found in series.items():
        found = sorted(found, key=lambda c: c["concurrency"])
        ax.plot([c["concurrency"] for c in found], [c["throughput_rps"] for c in found], marker="o",
                label=name)
    ax.set_xscale("log", base=2)
    ax.set_xticks(st.get("concurrency") or [1])
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("requests per second")
    ax.set_title("TorchServe throughput vs concurrency (the mixed inputs)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    return fig, "throughput.png"


def _latency(report: dict, plt):
    series, st = _series(report), report.get("settings", {})
    if not series:
        return None, None
    main = series
    conc = st.get("concurrency") or []
    fig, axes = plt.subplots(1, max(1, len(conc)), figsize=(3.2 * max(1, len(conc)), 4.2), sharey=True, squeeze=False)
    for ax, k in zip(axes[0], conc):
        names = [n for n in main if at(main[n], k)]
        for j, pct in enumerate(("p50_ms", "p95_ms", "p99_ms")):
            ax.bar([i + j * 0.27 for i in range(len(names))], [at(main[n], k).get(pct, 0) for n in names],
                   width=0.27, label=pct[:3])
        ax.set_xticks([i + 0.27 for i in range(len(names))])
        ax.set_xticklabels([n.replace("TorchServe", "TS") for n in names], rotation=35, ha="right", fontsize=7)
        ax.set_title(f"concurrency {k}")
        ax.set_yscale("log")
        ax.grid(alpha=0.3, axis="y")
    axes[0][0].set_ylabel("latency ms (log)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("TorchServe latency percentiles (the mixed inputs)")
    return fig, "latency.png"


def _memory(report: dict, plt):
    mem = report.get("memory_lifetime_mb") or {}
    if not mem:
        return None, None
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(mem) + 1.5))
    roles = sorted({r for v in mem.values() for r in v.get("roles_mb", {})})
    names = list(mem)
    _stacked_barh(ax, names, {role: [mem[n].get("roles_mb", {}).get(role, 0.0) for n in names] for role in roles})
    _label_barh(ax, "peak RSS MB (sum over the process tree)", "Memory per system")
    return fig, "memory.png"


def _preprocess(report: dict, plt):
    pre = (report.get("in_process") or {}).get("preprocess", [])
    if not pre:
        return None, None
    steps = ("decode", "disc", "crop", "quality", "normalise")
    fig, ax = plt.subplots(figsize=(9, 0.4 * len(pre) + 1.5))
    names = [p["input"] for p in pre]
    _stacked_barh(ax, names, {step: [p.get(step) or 0.0 for p in pre] for step in steps})
    ax.scatter([p["full_decode_resize"] for p in pre], names, marker="|", s=200, color="black",
               label="full decode + resize", zorder=3)
    ax.set_xscale("log")
    _label_barh(ax, "median ms (log)", "Preprocessing steps per input")
    return fig, "preprocess.png"


def _scaling_rows(report: dict, plt):
    levels = ((report.get("scaling") or {}).get("rows") or {}).get("levels", [])
    if not levels:
        return None, None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    x = [lv["screenings"] for lv in levels]
    for name in ("list", "summary"):
        ax.plot(x, [lv[name].get("p50_ms") for lv in levels], marker="o", label=f"{name} p50")
        ax.plot(x, [lv[name].get("p95_ms") for lv in levels], marker="x", linestyle="--", label=f"{name} p95")
    ax.set_xscale("log")
    ax.set_ylim(bottom=0)
    ax.set_xlabel("screenings in PostgreSQL")
    ax.set_ylabel("API latency ms")
    ax.set_title("One patient's listing and summary as the database grows")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig, "scaling_rows.png"


def _soak_memory(report: dict, plt):
    soak = (report.get("scaling") or {}).get("soak")
    if not (soak and soak.get("samples")):
        return None, None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    lines: dict[str, list] = {}
    for s in soak["samples"]:
        for tree in ("api", "torchserve"):
            for pid, p in s[tree].items():
                lines.setdefault(f"{p['role']} {pid}", []).append((s["requests"], p["rss_mb"]))
    for name, pts in lines.items():
        if "launcher" in name or len(pts) < 2:
            continue
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name)
    ax.set_xlabel("uploads")
    ax.set_ylabel("RSS MB")
    ax.set_title(f"Process memory over {soak['requests']:,} uploads")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig, "soak_memory.png"
