"""Load generation, latency statistics and process memory for the benchmarks.

Closed-loop load: `concurrency` threads, each with its own keep-alive `requests.Session`, send
the next request as soon as their previous one is answered, walking round-robin through the same
inputs, until the cell's request count is reached. Memory is the RSS of each process tree
(the process and all its descendants), sampled in a background thread with psutil.
"""
from __future__ import annotations

import itertools
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import psutil
import requests
from tqdm import tqdm
from urllib3 import encode_multipart_formdata

# A request: (session, input index) -> the response.
Send = Callable[[requests.Session, int], requests.Response]


def stats(latencies_s: list[float]) -> dict:
    """p50/p95/p99/mean/max in milliseconds; empty when there is nothing to summarise."""
    if not latencies_s:
        return {}
    ms = np.asarray(latencies_s) * 1000
    p50, p95, p99 = np.percentile(ms, [50, 95, 99])
    return {"p50_ms": round(float(p50), 2), "p95_ms": round(float(p95), 2), "p99_ms": round(float(p99), 2),
            "mean_ms": round(float(ms.mean()), 2), "max_ms": round(float(ms.max()), 2)}


@dataclass
class LoadResult:
    concurrency: int
    requests: int
    ok: int = 0
    errors: dict = field(default_factory=dict)      # status (or exception name) -> count
    wall_s: float = 0.0
    latencies_s: list = field(default_factory=list)

    @property
    def throughput(self) -> float:
        return self.ok / self.wall_s if self.wall_s > 0 else 0.0

    def to_dict(self) -> dict:
        return {"concurrency": self.concurrency, "requests": self.requests, "ok": self.ok,
                "errors": dict(self.errors), "wall_s": round(self.wall_s, 3),
                "throughput_rps": round(self.throughput, 3), **stats(self.latencies_s)}


def run_load(send: Send, n_inputs: int, concurrency: int, requests_total: int, *, ok_status=(200,),
             warmup: int | None = None, desc: str = "", check: Callable[[requests.Response], bool] | None = None,
             on_progress: Callable[[int], None] | None = None,
             after_warmup: Callable[[], None] | None = None, progress: bool = True) -> LoadResult:
    """Send `requests_total` requests at `concurrency`, after `warmup` unmeasured ones.

    Request i sends input i mod n_inputs, so concurrent requests differ. A response
    whose status is not in ok_status, or that fails `check`, counts as an error, not a latency.
    `on_progress(done)` is called after each request (the soak test samples memory with it).
    `send` may record what it needs of each response (the load test keeps every screening id).
    """
    warmup = max(concurrency, 2) if warmup is None else warmup
    result = LoadResult(concurrency, requests_total)
    counter = itertools.count()
    lock = threading.Lock()
    sessions = [requests.Session() for _ in range(concurrency)]

    def one(session, i):
        started = time.perf_counter()
        try:
            response = send(session, i % n_inputs)
            good = response.status_code in ok_status and (check is None or check(response))
            outcome = None if good else str(response.status_code)
        except requests.RequestException as exc:
            outcome = type(exc).__name__
        return started, time.perf_counter(), outcome

    # Warm-up: connections open, first-call costs paid (TorchServe's JIT is warmed once per server:
    # bench/systems.py, warm_up).
    if warmup:
        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(lambda k: one(sessions[k % concurrency], k), range(warmup)))

    if after_warmup:
        after_warmup()
    bar = tqdm(total=requests_total, desc=desc, leave=False, unit="req", dynamic_ncols=True, disable=not progress)
    spans = []

    def worker(t):
        session = sessions[t]
        while True:
            with lock:
                i = next(counter)
            if i >= requests_total:
                return
            started, ended, outcome = one(session, i)  # consecutive requests take consecutive inputs
            with lock:
                spans.append((started, ended))
                if outcome is None:
                    result.ok += 1
                    result.latencies_s.append(ended - started)
                else:
                    result.errors[outcome] = result.errors.get(outcome, 0) + 1
                done = len(spans)
            bar.update(1)
            if on_progress:
                on_progress(done)

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(worker, range(concurrency)))
    bar.close()
    for s in sessions:
        s.close()
    if spans:
        result.wall_s = max(e for _, e in spans) - min(s for s, _ in spans)
    return result


def multipart(fields: dict) -> tuple[bytes, str]:
    """A multipart body built once, so the load generator does not re-encode images per request."""
    return encode_multipart_formdata(fields)


class MemorySampler(threading.Thread):
    """Peak RSS of named process trees, sampled every `interval` seconds.

    `track(label, pid)` adds a tree (the process and its descendants, found again at every sample
    so that restarted workers are included). `mark()` starts a new window and returns the peaks of
    the one before; `peaks()` covers the whole run, with each role's first and last sample too.
    RSS of processes in one tree are summed: shared pages (libtorch) count once per process, which
    overstates the total but is what each process costs if it ran alone.

    `cpu_seconds()` is the CPU (user + system) each group has used so far: every tracked tree
    by label and role, the PostgreSQL backends of each database given to `track_postgres`, the
    PostgreSQL server's own processes (shared with whatever else uses that server), this
    process (the load driver) and the whole machine. `cpu_delta` makes a cell's figures of two.
    """

    def __init__(self, interval: float = 0.5):
        super().__init__(daemon=True)
        self.interval = interval
        self.roots: dict[str, int] = {}
        self.lock = threading.Lock()
        self.window: dict[str, dict] = {}
        self.lifetime: dict[str, dict] = {}
        self.stopped = threading.Event()
        self.databases: dict[str, str] = {}  # PostgreSQL database -> label

    def track_postgres(self, label: str, database: str) -> None:
        with self.lock:
            self.databases[database] = label

    def untrack_postgres(self, database: str) -> None:
        with self.lock:
            self.databases.pop(database, None)

    def cpu_seconds(self) -> dict[str, float]:
        with self.lock:
            roots, databases = dict(self.roots), dict(self.databases)
        out: dict[str, float] = {}

        def add(group: str, p: psutil.Process) -> None:
            try:
                t = p.cpu_times()
            except psutil.Error:
                return
            out[group] = out.get(group, 0.0) + t.user + t.system

        for label, pid in roots.items():
            for p in process_tree(pid):
                r = role(p)
                add(label if label.endswith(r) else f"{label}: {r}", p)
        if databases:
            for p in psutil.process_iter(["name", "cmdline"]):
                if p.info["name"] != "postgres":
                    continue
                words = " ".join(p.info["cmdline"] or []).split()
                # "postgres: 15/main: USER DATABASE HOST(PORT) STATE" for a backend
                if len(words) >= 4 and words[3] in databases:
                    add(f"{databases[words[3]]} postgresql backends", p)
                elif not any(w.startswith("clarity") or "(" in w for w in words):
                    add("postgresql server (shared)", p)
        add("load driver (this process)", psutil.Process())
        machine = psutil.cpu_times()
        out["machine (all processes)"] = machine.user + machine.nice + machine.system + machine.irq + machine.softirq
        return out

    def track(self, label: str, pid: int) -> None:
        with self.lock:
            self.roots[label] = pid
        self.sample()

    def untrack(self, label: str) -> None:
        with self.lock:
            self.roots.pop(label, None)

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            self.sample()

    def stop(self) -> None:
        self.stopped.set()

    @staticmethod
    def tree(pid: int) -> dict[int, tuple[str, int]]:
        """pid -> (role, rss bytes) for the process and its descendants."""
        out = {}
        for p in process_tree(pid):
            try:
                out[p.pid] = (role(p), p.memory_info().rss)
            except psutil.Error:
                continue
        return out

    def sample(self) -> None:
        with self.lock:
            roots = dict(self.roots)
        for label, pid in roots.items():
            procs = self.tree(pid)
            if not procs:
                continue
            total = sum(rss for _, rss in procs.values())
            by_role: dict[str, int] = {}
            largest: dict[str, int] = {}
            for r, rss in procs.values():
                by_role[r] = by_role.get(r, 0) + rss
                largest[r] = max(largest.get(r, 0), rss)
            with self.lock:
                for store in (self.window, self.lifetime):
                    peak = store.setdefault(label, {"total_mb": 0.0, "roles_mb": {}, "largest_process_mb": {},
                                                    "processes": 0})
                    peak["total_mb"] = max(peak["total_mb"], total / 2**20)
                    peak["processes"] = max(peak["processes"], len(procs))
                    for r, v in by_role.items():
                        peak["roles_mb"][r] = max(peak["roles_mb"].get(r, 0.0), v / 2**20)
                    for r, v in largest.items():
                        peak["largest_process_mb"][r] = max(peak["largest_process_mb"].get(r, 0.0), v / 2**20)
                life = self.lifetime[label]
                for r, v in by_role.items():
                    life.setdefault("first_roles_mb", {}).setdefault(r, v / 2**20)
                    life.setdefault("last_roles_mb", {})[r] = v / 2**20

    def mark(self) -> dict:
        self.sample()
        with self.lock:
            window, self.window = self.window, {}
        return _rounded(window)

    def peaks(self) -> dict:
        with self.lock:
            return _rounded(self.lifetime)


def process_tree(pid: int) -> list[psutil.Process]:
    """The process and its descendants now; empty when it is gone."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def cpu_delta(before: dict, after: dict, requests: int) -> dict:
    """CPU milliseconds per request each group used between two cpu_seconds() readings; a group
    whose processes all started in between counts from zero."""
    if not requests:
        return {}
    return {k: round((v - before.get(k, 0.0)) * 1000 / requests, 1) for k, v in sorted(after.items())}


def _rounded(d):
    if isinstance(d, dict):
        return {k: _rounded(v) for k, v in d.items()}
    return round(d, 1) if isinstance(d, float) else d


def role(p: psutil.Process) -> str:
    """A short name for what a process is, from its command line."""
    try:
        cmd = " ".join(p.cmdline())
    except psutil.Error:
        return "unknown"
    if "model_service_worker" in cmd:
        return "torchserve-worker"
    if "java" in p.name() or "org.pytorch.serve" in cmd:
        return "torchserve-frontend"
    if "torchserve" in cmd:
        return "torchserve-launcher"
    if "gunicorn" in cmd:
        parent = p.parent()
        is_worker = parent is not None and "gunicorn" in " ".join(parent.cmdline())
        return "gunicorn-worker" if is_worker else "gunicorn-master"
    if "weed" in cmd:
        return "seaweedfs"
    return p.name()


def rss_by_pid(pid: int) -> dict[int, tuple[str, float]]:
    """pid -> (role, RSS MB) for a process tree right now (the soak test's samples)."""
    return {k: (r, round(v / 2**20, 1)) for k, (r, v) in MemorySampler.tree(pid).items()}


def scrape(metrics_url: str) -> dict[str, float]:
    """TorchServe's Prometheus metrics, each name summed over its labels."""
    out: dict[str, float] = {}
    for line in requests.get(f"{metrics_url}/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            series, _, value = line.rpartition(" ")
            name = series.split("{", 1)[0]
            try:
                out[name] = out.get(name, 0.0) + float(value)
            except ValueError:
                continue
    return out


def server_side(before: dict, after: dict) -> dict:
    """What TorchServe saw during a cell: mean batch size, queue time, handler step times."""
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}

    def mean(total, count, scale=1.0):
        return round(d[total] / d[count] * scale, 2) if d.get(count) else None

    return {"requests": int(d.get("ts_inference_requests_total", 0)),
            "mean_batch_size": mean("DRBatchSize_sum", "DRBatchSize_count"),
            "queue_ms": mean("ts_queue_latency_microseconds", "ts_inference_requests_total", 1e-3),
            "frontend_ms": mean("ts_inference_latency_microseconds", "ts_inference_requests_total", 1e-3),
            "preprocess_ms": mean("DRPreprocessSeconds_sum", "DRPreprocessSeconds_count", 1e3),
            "batch_forward_ms": mean("DRInferenceSeconds_sum", "DRInferenceSeconds_count", 1e3)}
