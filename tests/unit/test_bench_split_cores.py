"""bench/split_cores.py: each side's process tree (threads included) on its own CPUs while
measuring, everything back on all CPUs afterwards, even when the measurement fails."""
import os
import subprocess
import sys
import types

import pytest

from bench import split_cores

pytestmark = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to split")

# A parent with a child, each with a second thread: the tree and its threads must all be pinned.
TREE = ("import subprocess, sys, threading, time; threading.Thread(target=time.sleep, args=(60,), daemon=True).start(); "
        "subprocess.Popen([sys.executable, '-c', 'import threading, time; "
        "threading.Thread(target=time.sleep, args=(60,), daemon=True).start(); time.sleep(60)']); time.sleep(60)")


def _affinities(pid):
    import psutil
    root = psutil.Process(pid)
    return {frozenset(os.sched_getaffinity(t.id)) for p in [root, *root.children(recursive=True)] for t in p.threads()}


@pytest.fixture
def trees(monkeypatch):
    import time
    monkeypatch.setattr(split_cores, "_postgres_servers", lambda: [])  # leave the machine's server alone
    procs = [subprocess.Popen([sys.executable, "-c", TREE]) for _ in range(2)]
    time.sleep(1.0)  # the children and their threads
    yield procs
    import psutil
    for p in procs:
        for child in psutil.Process(p.pid).children(recursive=True):
            child.kill()
        p.kill()
        p.wait()


def test_each_side_runs_on_its_own_half_and_everything_comes_back(trees):
    ts_cpus, api_cpus = split_cores.halves()
    everyone = ts_cpus | api_cpus
    ts = types.SimpleNamespace(proc=trees[0])
    api = types.SimpleNamespace(pids={"api embedded": trees[1].pid})
    with pytest.raises(RuntimeError):
        with split_cores.split(ts, api) as cpus:
            assert _affinities(trees[0].pid) == {frozenset(ts_cpus)}
            assert _affinities(trees[1].pid) == {frozenset(api_cpus)}
            assert os.sched_getaffinity(0) == api_cpus and cpus["torchserve_cpus"] == sorted(ts_cpus)
            raise RuntimeError("a cell failed")
    assert _affinities(trees[0].pid) == _affinities(trees[1].pid) == {frozenset(everyone)}
    assert os.sched_getaffinity(0) == everyone
