"""The clinic's case as tables: item 1's targets, the CPU per process group, and the markdown
of every paired comparison bench/clinic.py measures (clinic.md alone, or sections of
bench/run.py's README.md). Nothing here measures; everything reads a report dict."""
from __future__ import annotations

import statistics

from bench import real_network, split_cores

CPU_GROUPS = (("TorchServe", ("torchserve",)), ("gunicorn", ("gunicorn",)), ("SeaweedFS", ("seaweedfs",)),
              ("PG backends", ("postgresql backends",)), ("PG server", ("postgresql server",)),
              ("load driver", ("load driver",)))


def cpu_columns(row: dict, idx: int) -> list:
    """The median over rounds of each CPU_GROUPS group's CPU ms per request in one side of a
    paired row, then everything else on the machine (other helpers, the kernel) and the total."""
    def one(cell):
        cpu = cell.get("cpu_ms_per_request") or {}
        cols = [sum(v for k, v in cpu.items() if any(k.startswith(m) or f" {m}" in k for m in marks))
                for _, marks in CPU_GROUPS]
        total = cpu.get("machine (all processes)", 0.0)
        return cols + [total - sum(cols), total]
    per_round = [one(pair[idx]) for pair in row["rounds"]]
    return [round(statistics.median(col), 1) for col in zip(*per_round)]


def cpu_table(rows: list, title: str = "CPU per request, by process group") -> list[str]:
    head = " | ".join(name for name, _ in CPU_GROUPS)
    lines = [f"## {title} (ms, median over rounds)", "",
             "From the end of each cell's warm-up to its last answer, CPU (user + system) over answered",
             "requests. `other` is the rest of the machine: the kernel and whatever else ran (other work",
             "shares this machine). Each core gives 1000 ms of CPU per second.", "",
             f"| backend | connection | concurrency | cell | {head} | other | machine |",
             "|---|---|---|---|" + "---|" * (len(CPU_GROUPS) + 2)]
    for row in rows:
        if not any(pair[0].get("cpu_ms_per_request") for pair in row["rounds"]):
            continue
        for idx, who in ((0, "TorchServe direct"), (1, "API")):
            lines.append(f"| {row['backend']} | {row['connection']} | {row['concurrency']} | {who} | "
                         + " | ".join(str(v) for v in cpu_columns(row, idx)) + " |")
    return lines + [""]


# Issue 14 item 1's targets for every backend x connection x concurrency cell.
TARGET_RATIO = 0.85          # API throughput / TorchServe direct, at least
TARGET_ADDED_P50_MS = 10.0   # API p50 - TorchServe p50, at most


def side_median(row: dict, side: str, key: str = "throughput_rps"):
    """The median over rounds of one side ("a" or "b") of a paired row."""
    vals = [pair[0 if side == "a" else 1].get(key) for pair in row["rounds"]]
    vals = [v for v in vals if v is not None]
    return round(statistics.median(vals), 1) if vals else None


def meets(row: dict) -> bool | None:
    """Whether an api_vs_torchserve row meets both of item 1's targets (None: not measured)."""
    ratio, added = row.get("throughput_ratio_b_over_a"), row.get("added_p50_ms")
    if ratio is None or added is None:
        return None
    return ratio >= TARGET_RATIO and added <= TARGET_ADDED_P50_MS


def _range(row: dict) -> str:
    lo, hi = row.get("ratio_range") or (None, None)
    return f"{row['throughput_ratio_b_over_a']} ({lo}-{hi})"


def conditions(r: dict) -> list[str]:
    return [f"Run {r['started_at']} to {r['finished_at']} on {r['machine']['cpus']} CPUs; load average "
            f"{r['machine']['load_average_at_start']} at start and {r['machine']['load_average_at_end']} at end.",
            f"Inputs: {', '.join(i['name'] for i in r['inputs'])} ({min(i['megapixels'] for i in r['inputs'])}-"
            f"{max(i['megapixels'] for i in r['inputs'])} MP), each upload's bytes made unique. "
            f"{r['plan']['requests_per_cell']} requests per cell, {r['plan']['rounds']} interleaved round(s), "
            f"ratios per round (median, range). TorchServe on the archive defaults ({r['plan']['torchserve']['tag']}).",
            ""]


def api_table(rows: list[dict]) -> list[str]:
    """API against TorchServe direct, one line per cell, each judged against item 1's targets."""
    verdict = {True: "yes", False: "**no**", None: "–"}
    lines = ["| backend | connection | concurrency | TorchServe req/s | API req/s | API / TorchServe (range) | "
             "TorchServe p50 ms | API p50 ms | added p50 ms | targets met |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['backend']} | {row['connection']} | {row['concurrency']} | {side_median(row, 'a')} | "
                     f"{side_median(row, 'b')} | {_range(row)} | {side_median(row, 'a', 'p50_ms')} | "
                     f"{side_median(row, 'b', 'p50_ms')} | {row['added_p50_ms']} | {verdict[meets(row)]} |")
    return lines


def _paired_lines(rows: list[dict], lead, p50: bool = True) -> list[str]:
    """A table line per paired row: lead(row)'s columns, A's and B's req/s, B / A (range) and,
    with p50, A's and B's p50 ms."""
    out = []
    for row in rows:
        cells = [*lead(row), side_median(row, "a"), side_median(row, "b"), _range(row)]
        if p50:
            cells += [side_median(row, "a", "p50_ms"), side_median(row, "b", "p50_ms")]
        out.append("| " + " | ".join(str(c) for c in cells) + " |")
    return out


def sections(r: dict) -> list[str]:
    """The clinic's tables, each under a ## heading (clinic.md and bench/run.py's README.md)."""
    lines = ["## API end to end against TorchServe direct (issue 14 item 1)", "",
             f"Targets in every cell: API / TorchServe >= {TARGET_RATIO} and added p50 <= {TARGET_ADDED_P50_MS:g} ms. "
             "A cell's errors (e.g. 202 pending answers, not counted as throughput) are in the JSON.", "",
             *api_table(r["api_vs_torchserve"]), ""]
    lines += cpu_table(r["api_vs_torchserve"])
    lines += ["## Before/after the upload changes (keep-alive)", "",
              "The API as it is against bench/sequential_app.py (the upload path before issue 14), same backend.", "",
              "| backend | concurrency | before req/s | after req/s | after / before (range) | before p50 ms | after p50 ms |",
              "|---|---|---|---|---|---|---|"]
    lines += _paired_lines(r["before_after"], lambda row: [row["backend"], row["concurrency"]])
    lines += ["", "## Re-send (result cache, issue 14 item 3), embedded backend, keep-alive", "",
              "| concurrency | new bytes req/s | same bytes req/s | speed-up (range) | new p50 ms | same p50 ms |",
              "|---|---|---|---|---|---|"]
    lines += _paired_lines(r["resend"], lambda row: [row["concurrency"]])
    lines += ["", "## The naive server against TorchServe direct", "",
              "What a clinic's developer writes first (bench/naive_server.py, NAIVE_PREPROCESS=resize): Flask with "
              "the model in-process, the whole JPEG decoded and resized, one sync gunicorn worker per core, one torch "
              "thread each; same photographs, same concurrency, interleaved with TorchServe direct.", "",
              "| concurrency | TorchServe req/s | naive req/s | naive / TorchServe (range) | TorchServe p50 ms | naive p50 ms |",
              "|---|---|---|---|---|---|"]
    lines += _paired_lines(r["naive"], lambda row: [row["concurrency"]])
    lines += ["", "## Engines in TorchServe (direct, keep-alive)", "",
              "| network | concurrency | eager req/s | onnx req/s | onnx / eager (range) |", "|---|---|---|---|---|"]
    lines += _paired_lines(r["engines"], lambda row: [row["network"], row["concurrency"]], p50=False)
    if r.get("api_vs_torchserve_split_cores"):
        lines += [""] + split_cores.section(r["api_vs_torchserve_split_cores"])
    if r.get("api_vs_torchserve_real_network"):
        lines += [""] + real_network.section(r["api_vs_torchserve_real_network"])
    lines += ["", "## The limit: in-process, one single-threaded process per core, no HTTP", "",
              f"Decode, `fundus.prepare` and the forward pass of the same photographs, {r['plan'].get('limit_seconds')} s "
              "per row, every process started together; the best row is the limit.", "",
              "| engine | batch | processes | images/s | load 1m after |", "|---|---|---|---|---|"]
    for row in r["limit"]:
        lines.append(f"| {row['engine']} | {row.get('batch', 1)} | {row['processes']} | {row['images_per_s']} | "
                     f"{row.get('load_average_1m')} |")
    return lines + [""]


def markdown(r: dict) -> str:
    return "\n".join(["# The clinic's case: 9-12 MP fundus JPEGs, like with like in one run", "", *conditions(r),
                      *sections(r),
                      "The demo model is trained on synthetic images; these figures measure the machinery, not accuracy.",
                      ""])
