"""Where one upload's time goes: a real 9.7 MP JPEG through gunicorn, timed from outside and inside.

    python -m bench.profile [--n 30] [--out var/bench/profile] [--storage local|s3] [--database sqlite|postgres]

Starts TorchServe (the demo model, archive defaults) and two gunicorns on one backend: the API as
deployed (control_api.wsgi) and the same API with a stopwatch on every step
(bench.profile_app, one worker, one thread, so steps never overlap). Then, side by side
in one run with the same bytes (samples/idrid_01.jpg, made unique per upload by a trailer after
the JPEG end marker, as bench.loadtest does):
- outside: TorchServe direct and API uploads, interleaved one by one at concurrency 1, on a
  kept-alive connection; p50 of each and the API's added milliseconds;
- inside: per-step exclusive milliseconds of the instrumented API (median over `--n` uploads),
  and a pyinstrument call tree of the last few uploads.
Writes OUT/profile.json and OUT/pyinstrument-*.txt.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import requests

from scripts.ml import archive
from scripts.serving.processes import REPO, Gunicorn, PostgresDatabase, SeaweedS3, TorchServe, flask_cli
from scripts.serving.stack import DEMO_CHECKPOINT

PHOTO = REPO / "samples" / "idrid_01.jpg"


def unique(photo: bytes, i: int) -> bytes:
    return photo + f"clarity-profile-{i:08d}-{time.time_ns()}".encode()


def p50(values) -> float:
    return round(statistics.median(values), 2)


def api_env(workdir: Path, torchserve: TorchServe, storage: str, database: str, extras: list) -> dict:
    env = {"LOG_LEVEL": "INFO", "UPLOAD_RATE_LIMIT": "100000/minute", **torchserve.settings_env()}
    if database == "postgres":
        db = PostgresDatabase(prefix="clarity_profile").create()
        extras.append(db)
        env["DATABASE_URL"] = db.url
    else:
        env["DATABASE_URL"] = f"sqlite:///{workdir / 'clarity.db'}"
    if storage == "s3":
        s3 = SeaweedS3(workdir / "seaweedfs")
        extras.append(s3)
        s3.start(timeout=60)
        env.update(s3.settings_env())
    else:
        env.update({"STORAGE_BACKEND": "local", "LOCAL_STORAGE_DIR": str(workdir / "images")})
    return env


def key_and_patient(env: dict, url: str) -> tuple[dict, str]:
    made = flask_cli(env, "keys", "create", "--role", "clinician", "--label", "profile")
    if made.returncode != 0:
        raise RuntimeError(made.stderr)
    headers = {"Authorization": f"Bearer {made.stdout.strip()}"}
    r = requests.post(f"{url}/api/v1/patients", headers=headers, timeout=30,
                      json={"name": "Profile Patient", "birth_date": "1960-01-01",
                            "medical_record_number": f"PROFILE-{time.time_ns()}"})
    r.raise_for_status()
    return headers, r.json()["id"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=30)
    p.add_argument("--out", type=Path, default=Path("var/bench/profile"))
    p.add_argument("--storage", choices=("local", "s3"), default="local")
    p.add_argument("--database", choices=("sqlite", "postgres"), default="sqlite")
    p.add_argument("--app", default="control_api.wsgi:app", help="the uninstrumented app to time from outside")
    args = p.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*"):
        old.unlink()
    photo = PHOTO.read_bytes()
    extras: list = []
    with tempfile.TemporaryDirectory(prefix="clarity-profile-") as tmp:
        tmp = Path(tmp)
        store = tmp / "model_store"
        archive.archive(DEMO_CHECKPOINT, "1.0", model_store=store)
        ts = TorchServe(tmp / "ts", store, models="dr=dr_1.0.mar", env={"DR_TORCH_THREADS": "1"})
        services = [ts]
        try:
            ts.start(timeout=120)
            ts.wait_model_ready("dr", "1.0", timeout=120)
            env = api_env(tmp, ts, args.storage, args.database, extras)
            if flask_cli(env, "migrate").returncode != 0:
                raise RuntimeError("flask migrate failed")
            plain = Gunicorn(tmp / "plain", env, app=args.app)
            services.append(plain)
            plain.start(timeout=60)
            timed = Gunicorn(tmp / "timed", {**env, "PROFILE_DIR": str(out), "GUNICORN_THREADS": "1"},
                             workers=1, app="bench.profile_app:app")
            services.append(timed)
            timed.start(timeout=60)
            result = measure(args, photo, ts, plain, timed, env, out)
        except BaseException:
            for service in services:  # what went wrong, before the folder goes
                if service.log_path.exists():
                    print(f"--- {service.log_path.name}\n" + service.log_path.read_text()[-3000:])
            raise
        finally:
            for service in reversed(services):
                service.stop()
            for extra in reversed(extras):
                extra.drop() if isinstance(extra, PostgresDatabase) else extra.stop()
    (out / "profile.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


def measure(args, photo: bytes, ts: TorchServe, plain: Gunicorn, timed: Gunicorn, env: dict, out: Path) -> dict:
    load = [os.getloadavg()]
    headers, patient = key_and_patient(env, plain.url)
    direct = requests.Session()
    api = requests.Session()
    predict_url = f"{ts.inference_url}/predictions/dr"
    ts_auth = ts.auth()
    upload_url = f"{plain.url}/api/v1/patients/{patient}/screenings"

    def upload(session, url, i, extra=None, data=None):  # photo i made unique, or these exact bytes
        start = time.perf_counter()
        body = unique(photo, i) if data is None else data
        r = session.post(url, headers={**headers, **(extra or {})}, timeout=60,
                         files={"image": ("eye.jpg", body, "image/jpeg")}, data={"eye": "left"})
        assert r.status_code == 201, (r.status_code, r.text[:300])
        return (time.perf_counter() - start) * 1000

    def predict(i):
        start = time.perf_counter()
        r = direct.post(predict_url, data=unique(photo, i), headers={"Content-Type": "image/jpeg", **ts_auth},
                        timeout=60)
        assert r.status_code == 200, r.text[:300]
        return (time.perf_counter() - start) * 1000

    for i in range(3):  # warm both paths
        predict(i), upload(api, upload_url, i)
    ts_ms, api_ms, fresh_ms = [], [], []
    for i in range(args.n):
        ts_ms.append(predict(1000 + i))
        api_ms.append(upload(api, upload_url, 1000 + i))
        fresh_ms.append(upload(requests, upload_url, 5000 + i))  # a new connection per upload
    load.append(os.getloadavg())
    # Re-sends: the same bytes again (the result cache) against new bytes, interleaved.
    same = unique(photo, 777)
    upload_same = lambda: upload(api, upload_url, None, data=same)
    upload_same()
    resend_ms, new_ms = [], []
    for i in range(args.n):
        resend_ms.append(upload_same())
        new_ms.append(upload(api, upload_url, 20000 + i))
    load.append(os.getloadavg())

    headers2, patient2 = key_and_patient(env, timed.url)
    headers.update(headers2)
    timed_url = f"{timed.url}/api/v1/patients/{patient2}/screenings"
    session = requests.Session()
    for i in range(3):
        upload(session, timed_url, 9000 + i)
    for path in out.glob("phases-*.jsonl"):
        path.unlink()  # warm-up requests (and the patient) are not counted
    for i in range(args.n):
        upload(session, timed_url, 10000 + i, {"X-Profile": "1"} if i >= args.n - 3 else None)
    load.append(os.getloadavg())
    lines = [json.loads(line) for path in out.glob("phases-*.jsonl") for line in path.read_text().splitlines()]
    uploads = [line for line in lines if line["method"] == "POST"]
    # the last 3 were profiled by pyinstrument, which slows them: keep them out of the medians
    plain_uploads = uploads[:-3] if len(uploads) > 3 else uploads
    steps = sorted({k for u in plain_uploads for k in u["phases_ms"]})
    phases = {k: p50([u["phases_ms"].get(k, 0.0) for u in plain_uploads]) for k in steps}
    return {
        "photo": {"file": PHOTO.name, "bytes": len(photo)},
        "backend": {"storage": args.storage, "database": args.database},
        "outside_concurrency_1": {
            "uploads": args.n,
            "torchserve_direct_p50_ms": p50(ts_ms),
            "api_keepalive_p50_ms": p50(api_ms),
            "api_fresh_connection_p50_ms": p50(fresh_ms),
            "api_added_p50_ms": p50([a - t for a, t in zip(api_ms, ts_ms)]),
            "throughput_ratio_api_over_torchserve": round(statistics.median(ts_ms) / statistics.median(api_ms), 3),
        },
        "resend_concurrency_1": {"resend_p50_ms": p50(resend_ms), "new_bytes_p50_ms": p50(new_ms),
                                 "speedup": round(statistics.median(new_ms) / statistics.median(resend_ms), 2)},
        "inside_worker_p50_ms": {"total": p50([u["total_ms"] for u in plain_uploads]),
                                 "steps": dict(sorted(phases.items(), key=lambda kv: -kv[1]))},
        "load_average_1_5_15": [[round(x, 2) for x in row] for row in load],
    }


if __name__ == "__main__":
    raise SystemExit(main())
