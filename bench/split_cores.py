"""Issue 14 item 1 again with the API tier off TorchServe's cores, as deployed (compose and ECS
run them as separate containers or tasks): TorchServe's process tree on the first half of the
CPUs; the API's gunicorn, SeaweedFS, the PostgreSQL server and the load client on the other half.

On the shared arrangement (bench/clinic.py's cells) every process competes for the same cores,
so the API's cost and SeaweedFS's (an S3 stand-in; AWS S3 costs no local CPU) come out of
TorchServe's throughput. Here each side has its own cores: TorchServe direct gets half the
machine, and so does TorchServe behind the API. Same photographs, same pairing, keep-alive.
Affinity is set on every thread of each process tree (threads made later inherit it) and put
back on all CPUs afterwards, the PostgreSQL server's included.
"""
from __future__ import annotations

import contextlib
import json
import os

import psutil

from bench.driver import process_tree

ARRANGEMENT = "API tier on its own cores"


def halves() -> tuple[set, set] | None:
    """(TorchServe's CPUs, everyone else's), or None on a single CPU."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None
    return set(cpus[:len(cpus) // 2]), set(cpus[len(cpus) // 2:])


def _pin_tree(pid: int, cpus: set) -> None:
    for p in process_tree(pid):
        with contextlib.suppress(psutil.Error, OSError):
            for thread in p.threads():
                with contextlib.suppress(OSError):  # a thread that just ended
                    os.sched_setaffinity(thread.id, cpus)


def _postgres_servers() -> list[int]:
    """The local PostgreSQL server's processes (the postmaster forks new backends from itself)."""
    return [p.pid for p in psutil.process_iter(["name"]) if (p.info["name"] or "").startswith("postgres")]


@contextlib.contextmanager
def split(ts, api):
    """TorchServe on one half of the CPUs, the API's side and this process on the other."""
    ts_cpus, api_cpus = halves()
    everyone = ts_cpus | api_cpus
    api_side = [*api.pids.values(), *_postgres_servers()]  # gunicorn (+ SeaweedFS), PostgreSQL
    try:
        _pin_tree(ts.proc.pid, ts_cpus)
        for pid in api_side:
            _pin_tree(pid, api_cpus)
        os.sched_setaffinity(0, api_cpus)  # the load client: its threads start after this
        yield {"torchserve_cpus": sorted(ts_cpus), "api_side_cpus": sorted(api_cpus)}
    finally:
        os.sched_setaffinity(0, everyone)
        _pin_tree(ts.proc.pid, everyone)
        for pid in [*api.pids.values(), *_postgres_servers()]:
            _pin_tree(pid, everyone)


def measure(ts, api, backend: str, datas, args) -> list[dict]:
    """Paired rows (TorchServe direct, API) at each concurrency, keep-alive, on split cores;
    none on a single CPU."""
    from bench.clinic import versus_torchserve

    if halves() is None:
        return []
    with split(ts, api) as cpus:
        rows = versus_torchserve(ts, api, backend, datas, args)
    for row in rows:
        row.update(arrangement=ARRANGEMENT, **cpus)
        print(json.dumps({k: v for k, v in row.items() if k != "rounds"}), flush=True)
    return rows


def section(rows: list[dict]) -> list[str]:
    from bench.clinic_report import TARGET_ADDED_P50_MS, TARGET_RATIO, api_table, cpu_table

    first = rows[0]
    return [f"## API end to end against TorchServe direct, {ARRANGEMENT}", "",
            f"Item 1's comparison again with TorchServe on CPUs {first['torchserve_cpus']} and the API's gunicorn, "
            f"SeaweedFS, PostgreSQL and the load client on CPUs {first['api_side_cpus']}, in both columns "
            "(bench/split_cores.py). TorchServe direct therefore has half the machine, as TorchServe behind the API "
            f"does. Same rule: API / TorchServe >= {TARGET_RATIO} and added p50 <= {TARGET_ADDED_P50_MS:g} ms.", "",
            *api_table(rows), "", *cpu_table(rows, f"CPU per request, {ARRANGEMENT}")]
