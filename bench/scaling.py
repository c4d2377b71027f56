"""Scaling: does the API stay flat as the database grows, and does memory stay flat over many uploads?

- rows: screenings (each with a grading) are bulk-inserted into the API's own PostgreSQL tables with
  generate_series, 10 per patient, up to 1 million. At each size the API's listing of one patient's
  screenings and the patient's summary are timed over HTTP (gunicorn), and the SELECTs the API runs
  for them (captured from peewee's query log in an in-process app) are run under
  EXPLAIN (ANALYZE, BUFFERS).
- soak: thousands of uploads through the API (SQLite + local storage) and TorchServe, sampling the
  RSS of every API and TorchServe process every N requests. gunicorn's worker recycling
  (max_requests in gunicorn.conf.py) is switched off for it, so growth is not hidden by restarts.
"""
from __future__ import annotations

import logging
import re
import time
from pathlib import Path

import requests
from tqdm import tqdm

from bench import systems as bench_systems
from bench.inputs import ServeConfig
from bench.driver import MemorySampler, rss_by_pid, run_load, stats

PER_PATIENT = 10
TARGET_SCREENINGS = 20       # the patient whose listing and summary are timed
PAGE = 20
BIG_TABLES = ("screening", "grading", "patient", "audit_event")

# Deterministic ids (md5 of a counter cast to uuid) let each step extend the previous one in SQL alone.
INSERT_SLICE = 100_000  # rows per INSERT ... SELECT (each well inside the database deadline)
INSERT_PATIENTS = """
INSERT INTO patient (id, name, birth_date, mrn, sex, created_at, updated_at)
SELECT md5('bench-patient-' || k)::uuid, 'Benchmark Patient', NULL, NULL, 'unknown',
       timestamp '2020-01-01' + k * interval '1 second', timestamp '2020-01-01' + k * interval '1 second'
FROM generate_series(%(first)s, %(last)s) AS k
"""
# Each screening gets an exam of its own with the same id, as schema v3's migration gave older rows.
INSERT_EXAMS = """
INSERT INTO exam (id, patient_id, performed_at, created_at)
SELECT md5('bench-screening-' || g)::uuid, md5('bench-patient-' || ((g - 1) / {per}))::uuid,
       timestamp '2021-01-01' + g * interval '1 second', timestamp '2021-01-01' + g * interval '1 second'
FROM generate_series(%(first)s, %(last)s) AS g
""".format(per=PER_PATIENT)
INSERT_SCREENINGS = """
INSERT INTO screening (id, exam_id, patient_id, eye, captured_at, camera, image_key, image_size, image_sha256,
                       content_type, status, created_at, updated_at)
SELECT md5('bench-screening-' || g)::uuid, md5('bench-screening-' || g)::uuid,
       md5('bench-patient-' || ((g - 1) / {per}))::uuid,
       CASE WHEN mod(g, 2) = 0 THEN 'left' ELSE 'right' END, NULL, NULL,
       'screenings/' || md5('bench-screening-' || g)::uuid, 1000000,
       md5('a' || g) || md5('b' || g), 'image/jpeg', 'graded',
       timestamp '2021-01-01' + g * interval '1 second', timestamp '2021-01-01' + g * interval '1 second'
FROM generate_series(%(first)s, %(last)s) AS g
""".format(per=PER_PATIENT)
INSERT_GRADINGS = """
INSERT INTO grading (id, screening_id, model_name, model_version, gradable, grade, label, probabilities,
                     referable, referable_threshold, quality, synthetic_training_data, disclaimer, created_at)
SELECT md5('bench-grading-' || g)::uuid, md5('bench-screening-' || g)::uuid, 'dr', '1.0', true, mod(g, 5),
       (ARRAY['No DR','Mild NPDR','Moderate NPDR','Severe NPDR','Proliferative DR'])[mod(g, 5) + 1],
       '[0.2, 0.2, 0.2, 0.2, 0.2]'::jsonb, mod(g, 5) >= 2, 2,
       '{"gradable": true, "score": 0.9, "reasons": []}'::jsonb, true,
       'Demo model trained on synthetic images. Not for clinical use.',
       timestamp '2021-01-01' + g * interval '1 second'
FROM generate_series(%(first)s, %(last)s) AS g
"""
TARGET = """
WITH e AS (
  INSERT INTO exam (id, patient_id, performed_at, created_at)
  SELECT md5('bench-target-' || i)::uuid, %(patient)s::uuid, now()::timestamp - i * interval '1 day',
         now()::timestamp - i * interval '1 day'
  FROM generate_series(1, %(n)s) AS i RETURNING id
), s AS (
  INSERT INTO screening (id, exam_id, patient_id, eye, image_key, image_size, image_sha256, content_type, status,
                         created_at, updated_at)
  SELECT md5('bench-target-' || i)::uuid, md5('bench-target-' || i)::uuid, %(patient)s::uuid,
         CASE WHEN mod(i, 2) = 0 THEN 'left' ELSE 'right' END,
         'screenings/' || md5('bench-target-' || i)::uuid, 1000000, md5('t' || i) || md5('u' || i),
         'image/jpeg', 'graded', now()::timestamp - i * interval '1 day', now()::timestamp - i * interval '1 day'
  FROM generate_series(1, %(n)s) AS i RETURNING id, created_at
)
INSERT INTO grading (id, screening_id, model_name, model_version, gradable, grade, label, probabilities,
                     referable, referable_threshold, quality, synthetic_training_data, disclaimer, created_at)
SELECT md5(s.id::text)::uuid, s.id, 'dr', '1.0', true, 1, 'Mild NPDR', '[0.1,0.6,0.1,0.1,0.1]'::jsonb, false, 2,
       '{"gradable": true, "score": 0.9, "reasons": []}'::jsonb, true,
       'Demo model trained on synthetic images. Not for clinical use.', s.created_at
FROM s
"""


class QueryLog(logging.Handler):
    """Collects the (sql, params) pairs peewee logs at DEBUG."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.queries: list[tuple[str, list]] = []

    def emit(self, record):
        if isinstance(record.msg, tuple) and len(record.msg) == 2:
            self.queries.append(record.msg)


def api_queries(database_url: str, token: str, paths: dict[str, str]) -> dict[str, list]:
    """The SELECTs the API runs for each path, from an in-process app on the same database."""
    from control_api import create_app
    from control_api.settings import Settings

    app = create_app(Settings.from_env({}, database_url=database_url, log_level="WARNING"))
    client = app.test_client()
    logger = logging.getLogger("peewee")
    out = {}
    for name, path in paths.items():
        handler = QueryLog()
        logger.addHandler(handler)
        old = logger.level, logger.propagate
        logger.setLevel(logging.DEBUG)
        logger.propagate = False  # the app's JSON log handler would print every query
        try:
            response = client.get(path, headers={"Authorization": f"Bearer {token}"})
            assert response.status_code == 200, response.data
        finally:
            logger.removeHandler(handler)
            logger.setLevel(old[0])
            logger.propagate = old[1]
        out[name] = [(sql, list(params or [])) for sql, params in handler.queries
                     if sql.lstrip().upper().startswith("SELECT")]
    from control_api.db import db

    if hasattr(db.obj, "close_all"):
        db.obj.close_all()
    return out


def explain(conn, sql: str, params: list) -> dict:
    with conn.cursor() as cur:
        cur.execute("EXPLAIN (ANALYZE, BUFFERS) " + sql, params)
        plan = "\n".join(row[0] for row in cur.fetchall())
    seq = sorted(set(re.findall(r"Seq Scan on (\w+)", plan)))
    indexes = sorted(set(re.findall(r"Index(?: Only)? Scan(?: Backward)? using (\w+)", plan)
                         + re.findall(r"Bitmap Index Scan on (\w+)", plan)))
    ms = re.search(r"Execution Time: ([\d.]+) ms", plan)
    tables = sorted(set(re.findall(r'FROM "(\w+)"', sql)))
    return {"sql": sql, "tables": tables, "indexes_used": indexes, "seq_scans": seq,
            "seq_scan_on_big_table": any(t in BIG_TABLES for t in seq),
            "execution_ms": float(ms.group(1)) if ms else None, "plan": plan}


def _time_calls(session, url: str, headers: dict, n: int) -> dict:
    for _ in range(3):
        session.get(url, headers=headers, timeout=30).raise_for_status()
    lat = []
    for _ in range(n):
        t = time.perf_counter()
        r = session.get(url, headers=headers, timeout=30)
        lat.append(time.perf_counter() - t)
        r.raise_for_status()
    return {"calls": n, **stats(lat)}


def rows_scaling(workdir: Path, sizes: tuple, calls: int, sampler: MemorySampler) -> dict:
    import psycopg2
    import psycopg2.extras

    psycopg2.extras.register_uuid()
    tqdm.write(f"scaling: API latency at {', '.join(f'{n:,}' for n in sizes)} screenings in PostgreSQL")
    results = {"per_patient": PER_PATIENT, "target_screenings": TARGET_SCREENINGS, "page": PAGE, "levels": []}
    with bench_systems.api(workdir, None, "postgres", [], sampler, label="api postgres (scaling)") as handle:
        env = handle.info["env"]
        token, patient = handle.info["token"], handle.info["patient_id"]
        conn = psycopg2.connect(env["DATABASE_URL"])
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SHOW server_version")
            results["postgres_version"] = cur.fetchone()[0]
            cur.execute(TARGET, {"patient": patient, "n": TARGET_SCREENINGS})
        headers = {"Authorization": f"Bearer {token}"}
        paths = {"list": f"/api/v1/patients/{patient}/screenings?limit={PAGE}",
                 "summary": f"/api/v1/patients/{patient}/summary"}
        session = requests.Session()
        done = 0
        for size in tqdm(sizes, desc="rows", leave=False):
            background = size - TARGET_SCREENINGS
            started = time.perf_counter()
            if background > done:
                with conn.cursor() as cur:
                    # In slices: this process imports control_api, whose psycopg2 wait callback gives
                    # every database wait at most 10 s (finding 13), and 900,000 rows at once took longer.
                    for first in range(done + 1, background + 1, INSERT_SLICE):
                        last = min(first + INSERT_SLICE - 1, background)
                        # patient k holds screenings 10k+1 .. 10k+10: continue after the last patient inserted
                        first_p, last_p = (first - 1) // PER_PATIENT, (last - 1) // PER_PATIENT
                        if first > 1 and (first - 1) % PER_PATIENT:
                            first_p += 1  # that patient was inserted with the slice before
                        if last_p >= first_p:
                            cur.execute(INSERT_PATIENTS, {"first": first_p, "last": last_p})
                        cur.execute(INSERT_EXAMS, {"first": first, "last": last})
                        cur.execute(INSERT_SCREENINGS, {"first": first, "last": last})
                        cur.execute(INSERT_GRADINGS, {"first": first, "last": last})
                    cur.execute("ANALYZE patient; ANALYZE exam; ANALYZE screening; ANALYZE grading")
                done = background
            insert_s = time.perf_counter() - started
            with conn.cursor() as cur:
                cur.execute("SELECT (SELECT count(*) FROM screening), (SELECT count(*) FROM grading), "
                            "(SELECT count(*) FROM patient), pg_database_size(current_database())")
                n_screenings, n_gradings, n_patients, db_bytes = cur.fetchone()
            level = {"screenings": n_screenings, "gradings": n_gradings, "patients": n_patients,
                     "database_mb": round(db_bytes / 2**20, 1), "insert_s": round(insert_s, 1)}
            for name, path in paths.items():
                level[name] = _time_calls(session, handle.url + path, headers, calls)
            queries = api_queries(env["DATABASE_URL"], token, paths)
            level["explain"] = {name: [explain(conn, sql, params) for sql, params in qs]
                                for name, qs in queries.items()}
            results["levels"].append(level)
            tqdm.write(f"  {n_screenings:>9,} screenings (+{insert_s:5.1f} s insert): "
                       f"list p50 {level['list'].get('p50_ms')} ms, summary p50 {level['summary'].get('p50_ms')} ms")
        conn.close()
    return results


def soak(workdir: Path, mar: Path, cfg: ServeConfig, inputs, n: int, every: int, sampler: MemorySampler) -> dict:
    """`n` uploads through the API (embedded defaults) at concurrency 4, RSS sampled every `every`."""
    tqdm.write(f"soak: {n:,} uploads through the API, RSS every {every}")
    samples = []
    with bench_systems.torchserve(workdir / "ts", mar, cfg, sampler) as ts, \
            bench_systems.api(workdir / "api", ts, "embedded", inputs, sampler,
                              extra_args=("--max-requests", "0"), label="api embedded (soak)") as handle:
        trees = {"api": handle.pids[handle.label], "torchserve": ts.proc.pid}

        def sample(done: int) -> None:
            if done % every == 0 or done == n:
                row = {"requests": done, "time": time.time()}
                for name, pid in trees.items():
                    row[name] = {str(p): {"role": role, "rss_mb": mb} for p, (role, mb) in rss_by_pid(pid).items()}
                samples.append(row)

        sample(0)
        result = run_load(handle.send, len(inputs), 4, n, ok_status=handle.ok_status, desc="soak", on_progress=sample)
    return {"requests": n, "sample_every": every, "concurrency": 4, "inputs": [i.name for i in inputs],
            "gunicorn_max_requests": 0, **result.to_dict(), "samples": samples, "growth": _growth(samples)}


def _growth(samples: list[dict]) -> dict:
    """RSS growth of each long-lived process between the first sample after warm-up and the last."""
    if len(samples) < 3:
        return {}
    first, last = samples[1], samples[-1]
    out = {}
    for tree in ("api", "torchserve"):
        for pid, now in last[tree].items():
            before = first[tree].get(pid)
            if before and now["role"] not in ("unknown",):
                out[f"{tree} {now['role']} {pid}"] = {
                    "from_requests": first["requests"], "to_requests": last["requests"],
                    "rss_mb_start": before["rss_mb"], "rss_mb_end": now["rss_mb"],
                    "growth_mb": round(now["rss_mb"] - before["rss_mb"], 1)}
    return out
