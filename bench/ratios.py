"""The benchmark's numbers derived from its cells: ratios, targets, and before/after pairs."""
from __future__ import annotations

RATIO_KEYS = ("torchserve_over_limit", "api_over_torchserve", "api_over_torchserve_postgres_s3",
              "api_added_p50_ms", "ours_over_naive", "ours_p99_over_naive_p99", "torchserve_over_naive",
              "ours_over_naive_default_threads", "draft_decode_over_full_decode",
              "preprocess_over_full_decode_resize")


# ---------------------------------------------------------------- lookups (also for the report)

def cells(report, section=None, **match):
    return [c for c in report.get("cells", []) if (section is None or c["section"] == section)
            and all(c.get(k) == v for k, v in match.items())]


def best(found):
    return max(found, key=lambda c: c["throughput_rps"], default=None)


def at(found, concurrency):
    return next((c for c in found if c["concurrency"] == concurrency), None)


def div(a, b):
    return round(a / b, 3) if a is not None and b else None


def _big_jpegs(rows):
    return [r for r in rows if r["format"] == "JPEG" and 9 <= r["megapixels"] <= 11.5]


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


# ---------------------------------------------------------------- ratios and targets

def ratios(report: dict) -> dict:
    """Every ratio the issue asks for (None where its cells were not measured), with what it compares."""
    out, why = {}, {}
    settings = report.get("settings", {})
    api_tag = (settings.get("api_torchserve_config") or {}).get("tag")
    limit_runs = (report.get("limit") or {}).get("runs", [])
    limit_best = max(limit_runs, key=lambda r: r["throughput_rps"], default=None)
    ts_best = best(cells(report, "torchserve"))
    out["torchserve_over_limit"] = div(ts_best and ts_best["throughput_rps"], limit_best and limit_best["throughput_rps"])
    if ts_best and limit_best:
        why["torchserve_over_limit"] = (f"best TorchServe cell ({ts_best['config']}, c={ts_best['concurrency']}) "
                                        f"÷ best limit run (batch {limit_best['batch']}, {limit_best['processes']} "
                                        f"process(es))")
    ts_api = cells(report, "torchserve", config=api_tag)
    for backend, key in (("embedded", "api_over_torchserve"), ("postgres-s3", "api_over_torchserve_postgres_s3")):
        api_best, ts_ref = best(cells(report, "api", backend=backend)), best(ts_api)
        out[key] = div(api_best and api_best["throughput_rps"], ts_ref and ts_ref["throughput_rps"])
        if api_best and ts_ref:
            why[key] = (f"best API {backend} cell (c={api_best['concurrency']}) ÷ best TorchServe {api_tag} cell "
                        f"(c={ts_ref['concurrency']})")
    api1, ts1 = at(cells(report, "api", backend="embedded"), 1), at(ts_api, 1)
    out["api_added_p50_ms"] = round(api1["p50_ms"] - ts1["p50_ms"], 2) if api1 and ts1 else None
    why["api_added_p50_ms"] = f"API embedded p50 − TorchServe {api_tag} p50, both at concurrency 1"
    c8 = _against_naive(report, ts_api, api_tag, out, why)
    _preprocessing(report, out, why)
    return {"values": out, "compares": why, "ours_vs_naive_concurrency": c8}


def _against_naive(report: dict, ts_api: list, api_tag, out: dict, why: dict):
    """The naive-server ratios into out/why; returns the concurrency they compare at."""
    naive = cells(report, "naive")
    common = sorted({c["concurrency"] for c in naive} & {c["concurrency"] for c in cells(report, "api", backend="embedded")})
    c8 = 8 if 8 in common else (common[-1] if common else None)
    # The stronger of the naive servers at that concurrency (default torch threads, or one thread).
    base = best([c for c in naive if c["concurrency"] == c8])
    default = at(cells(report, "naive", torch_threads="default"), c8)
    ours, ts_c = at(cells(report, "api", backend="embedded"), c8), at(ts_api, c8)
    out["ours_over_naive"] = div(ours and ours["throughput_rps"], base and base["throughput_rps"])
    out["ours_p99_over_naive_p99"] = div(ours and ours.get("p99_ms"), base and base.get("p99_ms"))
    out["torchserve_over_naive"] = div(ts_c and ts_c["throughput_rps"], base and base["throughput_rps"])
    out["ours_over_naive_default_threads"] = div(ours and ours["throughput_rps"], default and default["throughput_rps"])
    which = base["system"] if base else "naive"
    why["ours_over_naive"] = (f"API embedded (with TorchServe {api_tag}) ÷ the faster naive server ({which}), "
                              f"throughput at concurrency {c8}")
    why["ours_p99_over_naive_p99"] = "the same pair, p99 latency (below 1 = better tail)"
    why["torchserve_over_naive"] = f"TorchServe {api_tag} alone ÷ {which} at concurrency {c8}"
    why["ours_over_naive_default_threads"] = f"API embedded ÷ the naive server with torch's default threads, c={c8}"
    return c8


def _preprocessing(report: dict, out: dict, why: dict) -> None:
    big = _big_jpegs((report.get("limit") or {}).get("preprocess", []))
    out["draft_decode_over_full_decode"] = div(_mean([r["decode"] for r in big]),
                                                _mean([r["decode_no_draft"] for r in big]))
    why["draft_decode_over_full_decode"] = ("fundus.decode with JPEG draft mode ÷ the same with draft off, "
                                            f"mean over the {len(big)} JPEGs of 9–11 MP")
    out["preprocess_over_full_decode_resize"] = div(_mean([r["prepare"] for r in big]),
                                                     _mean([r["full_decode_resize"] for r in big]))
    why["preprocess_over_full_decode_resize"] = ("fundus.prepare (decode, disc, quality, crop, normalise) ÷ a full "
                                                 "decode plus a resize of the whole photograph, 9–11 MP JPEGs")


def targets(r: dict) -> list[dict]:
    v = r["values"]

    def judge(value, threshold, at_most):
        if value is None:
            return None, None
        met = value <= threshold if at_most else value >= threshold
        return met, round((threshold - value) if at_most else (value - threshold), 3)

    def row(name, key, threshold, at_most: bool, unit="×"):
        value = v.get(key)
        met, margin = judge(value, threshold, at_most)
        return {"target": name, "key": key, "value": value, "threshold": threshold,
                "rule": f"{'≤' if at_most else '≥'} {threshold}{unit}", "met": met, "margin": margin}

    return [
        row("preprocessing a 9–11 MP JPEG ≤ 0.25× a full decode plus resize", "preprocess_over_full_decode_resize",
            0.25, True),
        row("TorchServe ≥ 0.8× the in-process limit (best batch and concurrency)", "torchserve_over_limit", 0.8, False),
        row("API end to end ≥ 0.8× direct TorchServe (embedded defaults)", "api_over_torchserve", 0.8, False),
        row("API adds ≤ 15 ms at p50 (embedded defaults)", "api_added_p50_ms", 15, True, " ms"),
        row(f"ours ≥ 1.0× the naive server's throughput at concurrency {r['ours_vs_naive_concurrency']}",
            "ours_over_naive", 1.0, False),
        row("ours has a better tail: p99 ÷ naive p99 < 1", "ours_p99_over_naive_p99", 1.0, True),
    ]


def _load_pair(name: str, before: dict, after: dict, identical: str, status: str) -> dict:
    """An optimisation row from two load cells at the same concurrency: the gain is in throughput."""
    def said(c):
        return f"{c['throughput_rps']:.2f} req/s, p50 {c.get('p50_ms')} ms, p99 {c.get('p99_ms')} ms"

    return {"name": name, "before": said(before), "after": said(after),
            "gain": div(after["throughput_rps"], before["throughput_rps"]), "identical": identical, "status": status}


def optimisations(report: dict) -> list[dict]:
    """Before/after pairs measured in this run, each with whether results stay identical."""
    out = []
    limit = report.get("limit") or {}
    big = _big_jpegs(limit.get("preprocess", []))
    if big:
        agreement = limit.get("draft_agreement", {})
        before, after = _mean([r["prepare_no_draft"] for r in big]), _mean([r["prepare"] for r in big])
        out.append({"name": "JPEG draft-mode decode (in fundus.decode)", "before": f"{before:.1f} ms prepare",
                    "after": f"{after:.1f} ms prepare", "gain": div(before, after),
                    "identical": (f"{agreement.get('same_grade')}/{agreement.get('graded_both')} same grade, "
                                  f"max |Δp| {agreement.get('max_abs_probability_difference')}"),
                    "status": "already in handlers/fundus.py"})
    for row in limit.get("forward", []):
        if row["threads"] == 1:
            out.append({"name": f"TorchScript (trace+freeze) forward, batch {row['batch']}, 1 thread",
                        "before": f"{row['eager_ms']} ms eager", "after": f"{row['torchscript_ms']} ms",
                        "gain": div(row["eager_ms"], row["torchscript_ms"]),
                        "identical": f"max |Δlogit| {row['torchscript_max_abs_logit_diff']:.2e}",
                        "status": ("candidate for handlers/dr_handler.py (torch.jit is deprecated)"
                                   if row["eager_ms"] > 1.1 * row["torchscript_ms"] else "no gain: keep eager")})
    threads = {(r["threads"], r["batch"]): r for r in limit.get("forward", [])}
    for batch in (1, 8):
        a, b = threads.get((1, batch)), threads.get((2, batch))
        if a and b:
            out.append({"name": f"torch threads 2 → 1, forward batch {batch} (in-process)",
                        "before": f"{b['eager_ms']} ms (2 threads)", "after": f"{a['eager_ms']} ms (1 thread)",
                        "gain": div(b["eager_ms"], a["eager_ms"]), "identical": "same model, same numbers",
                        "status": "measured"})
    by = {(c["config"], c["concurrency"]): c for c in cells(report, "torchserve")}
    settings = report.get("settings", {})
    after_tag = (settings.get("api_torchserve_config") or {}).get("tag")
    for variant in settings.get("torchserve_variants", []):
        before_tag, what = variant["tag"], variant.get("replaced_by_defaults", "variant")
        for c in sorted({k[1] for k in by}):
            a, b = by.get((before_tag, c)), by.get((after_tag, c))
            if a and b and before_tag != after_tag:
                out.append(_load_pair(f"TorchServe {what} ({before_tag} → {after_tag}), c={c}", a, b,
                                      "same handler and weights", "applied: scripts/ml/archive.py defaults (4395ee9)"))
    hops = (report.get("limit") or {}).get("api_hops", [])
    if hops:
        before, after = _mean([h["decode_check"] for h in hops]), _mean([h["inspect"] for h in hops])
        out.append({"name": "API image check, in-process, mean over the inputs",
                    "before": f"{before:.2f} ms (header + decode)", "after": f"{after:.2f} ms (header only)",
                    "gain": div(before, after), "identical": "same format/size answers",
                    "status": "applied: control_api/images.py (8c20c3e)"})
    reuse = (report.get("optimisations") or {}).get("connection_reuse")
    if reuse:
        a, b = reuse["new_connection"], reuse["keep_alive"]
        out.append({"name": f"keep-alive to TorchServe ({reuse['input']}, c=1)",
                    "before": f"p50 {a.get('p50_ms')} ms (new connection each)",
                    "after": f"p50 {b.get('p50_ms')} ms (pooled session)",
                    "gain": div(a.get("p50_ms"), b.get("p50_ms")), "identical": "same requests",
                    "status": "control_api/torchserve.py already pools (requests.Session + HTTPAdapter)"})
    return out
