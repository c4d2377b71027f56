"""Manage model versions on TorchServe through its management API.

    python -m scripts.serving.registry [--management URL] [--key-file FILE] [--model-store DIR] COMMAND
        list                                   every model and version, the default marked *
        describe NAME                          TorchServe's description of every version (JSON)
        register MAR [--name N --version V] [--workers N] [--wait] [--timeout S]
        promote NAME VERSION [--force --reason TEXT]   make VERSION the default, through the gate
        rollback NAME                          return to the default before the last promote
        unregister NAME VERSION
        scale NAME [VERSION] --min N --max N
        serve-models NAME                      the --models argument that restores the saved state

`register` takes an archive from anywhere: one outside the model store is copied in first (an
archive of the same name with other bytes is refused: versions are immutable). It starts the
workers the archive's model-config.yaml asks for (minWorkers), else one per CPU core of this
machine (what TorchServe gives the models it loads at start), else --workers.

What it remembers (the default, earlier defaults, registered versions, the promotion log) lives
in the model store: scripts/serving/model_state.py. `promote` goes through the gate in
scripts/serving/gate.py (held-out card metrics, thresholds, shadow agreement from the control
API when CLARITY_API_URL and CLARITY_API_KEY are set). The calls go through
scripts/serving/management.py.
"""
from __future__ import annotations

import argparse
import filecmp
import json
import os
import re
import shutil
import sys
import zipfile
from pathlib import Path

from scripts.serving.management import DEFAULT_KEY_FILE, DEFAULT_MANAGEMENT, Management, ManagementError, ready_workers
from scripts.serving.model_state import HISTORY_FILE, History, log_promotion

_MAR_NAME = re.compile(r"^(?P<name>.+?)_(?P<version>[^_/]+)\.mar$")


def default_version(api: Management, name: str) -> str:
    """GET /models/NAME describes the default version."""
    return api.call("GET", f"/models/{name}")[0]["modelVersion"]


def versions(api: Management, name: str) -> list[dict]:
    """Every registered version of NAME, parsed from GET /models/NAME/all."""
    default = default_version(api, name)
    out = []
    for d in api.call("GET", f"/models/{name}/all"):
        out.append({
            "name": d["modelName"], "version": d["modelVersion"], "default": d["modelVersion"] == default,
            "url": d.get("modelUrl"), "batch_size": d.get("batchSize"),
            "max_batch_delay_ms": d.get("maxBatchDelay"), "min_workers": d.get("minWorkers"),
            "max_workers": d.get("maxWorkers"), "workers": len(d.get("workers") or []),
            "ready": ready_workers(d),
        })
    return out


def model_names(api: Management) -> list[str]:
    names, token = [], None
    while True:
        page = api.call("GET", "/models", **({"next_page_token": token} if token else {}))
        names += [m["modelName"] for m in page.get("models", [])]
        token = page.get("nextPageToken")
        if not token:
            return names


def archive_identity(mar: str, model_store: Path) -> tuple[str, str]:
    """(name, version) from the archive's manifest when it is at hand, else from <name>_<version>.mar."""
    path = Path(mar) if Path(mar).is_file() else Path(model_store) / Path(mar).name
    if path.is_file():
        with zipfile.ZipFile(path) as z:
            model = json.loads(z.read("MAR-INF/MANIFEST.json"))["model"]
        return model["modelName"], model["modelVersion"]
    m = _MAR_NAME.match(Path(mar).name)
    if not m:
        raise ManagementError(f"cannot tell the name and version of {mar}: pass --name and --version")
    return m["name"], m["version"]


def into_store(mar: str, model_store: Path, say=print) -> Path:
    """The archive's path in the model store; an archive elsewhere is copied in first."""
    store = Path(model_store).resolve()
    given = Path(mar)
    if given.is_file():
        given = given.resolve()
        target = store / given.name
        if given.parent == store:
            return given
        if target.exists():
            if not filecmp.cmp(target, given, shallow=False):
                raise ManagementError(f"{target} already exists with other contents: archived versions are "
                                      "immutable; archive again under a new --version")
            return target
        store.mkdir(parents=True, exist_ok=True)
        tmp = store / f".{given.name}.copying"
        shutil.copyfile(given, tmp)
        os.replace(tmp, target)  # TorchServe never sees half an archive
        say(f"copied {given} into the model store {store}")
        return target
    target = store / given.name
    if target.is_file():
        return target
    raise ManagementError(f"archive {mar} not found: looked for {given.resolve()} and in the model store {store} "
                          "(--model-store or MODEL_PATH names the store TorchServe loads from)")


def archive_workers(path: Path) -> int | None:
    """minWorkers from the archive's model-config.yaml, if it sets one."""
    import yaml

    try:
        with zipfile.ZipFile(path) as z:
            manifest = json.loads(z.read("MAR-INF/MANIFEST.json"))
            config = manifest.get("model", {}).get("configFile")
            data = yaml.safe_load(z.read(config)) if config else None
    except (KeyError, zipfile.BadZipFile, FileNotFoundError):
        return None
    workers = (data or {}).get("minWorkers")
    return int(workers) if workers else None


def default_workers() -> int:
    """One per CPU core this process may use: what TorchServe starts for models it loads at start
    (default_workers_per_model unset). The management API itself starts none unless told."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def register(api: Management, mar: str, *, model_store: Path, name: str | None = None,
             version: str | None = None, workers: int | None = None, wait: bool = True,
             timeout: float = 120, say=None) -> tuple[str, str]:
    """Register an archive (copied into TorchServe's model store first when it is elsewhere).

    A URL is passed on as it is: TorchServe's allowed_urls decides, and ours allows none remote.
    Workers: `workers`, else the archive's minWorkers, else one per CPU core.
    """
    say = say or (lambda message: None)
    path = None
    if "://" not in mar:
        path = into_store(mar, model_store, say)
    if not (name and version):
        found = archive_identity(str(path or mar), model_store)
        name, version = name or found[0], version or found[1]
    if workers is None and path is not None:
        workers = archive_workers(path) or default_workers()
    # Not synchronous: TorchServe would hold the answer until every worker has started, which
    # can take longer than any sensible HTTP timeout on a busy machine. Registration errors
    # (a bad archive, a version already there) still come back at once; workers are polled below.
    params = {"url": mar if path is None else path.name, "synchronous": "false"}
    if workers is not None:
        params["initial_workers"] = workers
    say(f"registering {name} {version}" + (f" with {workers} workers" if workers else ""))
    api.call("POST", "/models", **params)
    if path is not None and model_store:
        History(Path(model_store) / HISTORY_FILE).registered(name, version, True)
    if wait:
        api.wait_ready(name, version, timeout, say=say)
    return name, version


def gate_verdict(api: Management, name: str, version: str, model_store: Path, thresholds=None,
                 api_url: str | None = None, api_key: str | None = None):
    """The promotion gate's verdict on VERSION (scripts/serving/gate.py)."""
    from scripts.serving import gate

    meta = gate.archive_meta(Path(model_store) / f"{name}_{version}.mar")
    if meta is None:  # not in this store: ask the server for the card it loaded
        described = api.call("GET", f"/models/{name}/{version}", customized="true")
        meta = (described[0] or {}).get("customizedMetadata") if described else None
        meta = json.loads(meta) if isinstance(meta, str) else meta
    shadow, checked = None, False
    if api_url and api_key:
        try:
            shadow, checked = gate.shadow_agreement(version, api_url, api_key), True
        except gate.GateError as exc:
            raise ManagementError(f"shadow agreement unavailable from {api_url}: {exc}") from None
    return gate.check(version, meta, thresholds or gate.Thresholds.from_env(), shadow, checked)


def promote(api: Management, history: History, name: str, version: str, *, verdict=None,
            force: bool = False, reason: str | None = None) -> str | None:
    """Make VERSION the default; returns the default it replaced (None when it was already).
    With a verdict that failed, only `force` with a `reason` promotes."""
    if verdict is not None and not verdict.passed and not force:
        raise ManagementError(f"{name} {version} does not pass the promotion gate:\n  - "
                              + "\n  - ".join(verdict.failures)
                              + "\nfix it, or promote anyway with --force --reason TEXT (recorded)")
    if force and not (reason or "").strip():
        raise ManagementError("--force needs --reason TEXT: the reason is recorded with the promotion")
    previous = default_version(api, name)
    if previous == version:
        return None
    api.call("PUT", f"/models/{name}/{version}/set-default")
    data = history.load()
    entry = history.entry(data, name)
    entry.setdefault("previous", []).append(previous)
    entry["default"] = version
    entry["registered"] = list(dict.fromkeys(entry.get("registered", []) + [previous, version]))
    history.save(data)
    log_promotion(history.path.parent, {"action": "promote", "model": name, "from": previous, "to": version,
                                        "forced": bool(force), "reason": reason,
                                        "gate": verdict.as_dict() if verdict is not None else None})
    return previous


def rollback(api: Management, history: History, name: str) -> str:
    """Set the default back to the one the last promote replaced; returns that version."""
    data = history.load()
    entry = data.get(name) or {}
    stack = entry.get("previous") or []
    if not stack:
        raise ManagementError(f"no earlier default of {name} recorded in {history.path}")
    version = stack[-1]
    current = entry.get("default")
    api.call("PUT", f"/models/{name}/{version}/set-default")
    stack.pop()
    entry["default"] = version
    history.save(data)
    log_promotion(history.path.parent, {"action": "rollback", "model": name, "from": current, "to": version})
    return version


def unregister(api: Management, history: History, name: str, version: str) -> None:
    api.call("DELETE", f"/models/{name}/{version}")
    history.registered(name, version, False)


def scale(api: Management, name: str, version: str | None, min_workers: int, max_workers: int) -> None:
    path = f"/models/{name}" + (f"/{version}" if version else "")
    api.call("PUT", path, min_worker=min_workers, max_worker=max_workers, synchronous="true")


def _print_table(rows: list[dict]) -> None:
    print(f"{'':1} {'name':<12} {'version':<10} {'workers':>7} {'ready':>5} {'batch':>5} {'delay ms':>8}")
    for r in rows:
        print(f"{'*' if r['default'] else ' ':1} {r['name']:<12} {r['version']:<10} {r['workers']:>7} "
              f"{r['ready']:>5} {r['batch_size'] or '-':>5} {r['max_batch_delay_ms'] or '-':>8}")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m scripts.serving.registry",
                                description="Manage model versions on TorchServe.")
    p.add_argument("--management", default=DEFAULT_MANAGEMENT,
                   help="management API URL (env TORCHSERVE_MANAGEMENT_URL)")
    p.add_argument("--key-file", default=DEFAULT_KEY_FILE,
                   help="TorchServe's key_file.json, for the management key (env TORCHSERVE_KEY_FILE)")
    p.add_argument("--model-store", type=Path, default=Path(os.environ.get("MODEL_PATH", "model_store")),
                   help="where archives and .defaults.json live (env MODEL_PATH)")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list")
    sub.add_parser("describe").add_argument("name")
    r = sub.add_parser("register")
    r.add_argument("mar", help="archive: a path anywhere (copied into the model store) or a file name in the store")
    r.add_argument("--name")
    r.add_argument("--version")
    r.add_argument("--workers", type=int,
                   help="workers to start (default: the archive's minWorkers, else one per CPU core)")
    r.add_argument("--wait", action="store_true", help="wait until a worker is READY, reporting progress")
    r.add_argument("--timeout", type=float, default=300)
    pr = sub.add_parser("promote", help="make VERSION the default, if it passes the gate (scripts/serving/gate.py)")
    pr.add_argument("name")
    pr.add_argument("version")
    pr.add_argument("--force", action="store_true", help="promote although the gate refuses (needs --reason)")
    pr.add_argument("--reason", help="why; recorded in the model store's promotions.jsonl")
    pr.add_argument("--api-url", default=os.environ.get("CLARITY_API_URL"),
                    help="control API, for shadow agreement (env CLARITY_API_URL; admin key in CLARITY_API_KEY)")
    for flag, (env, default) in (("--min-qwk", ("PROMOTE_MIN_QWK", 0.60)),
                                 ("--min-referable-sensitivity", ("PROMOTE_MIN_REFERABLE_SENSITIVITY", 0.80)),
                                 ("--min-shadow-kappa", ("PROMOTE_MIN_SHADOW_KAPPA", 0.60)),
                                 ("--min-shadow-referable-agreement", ("PROMOTE_MIN_SHADOW_REFERABLE_AGREEMENT", 0.90))):
        pr.add_argument(flag, type=float, help=f"gate threshold (env {env}, default {default})")
    sub.add_parser("serve-models", help="print TorchServe's --models for the saved default and versions"
                   ).add_argument("name")
    sub.add_parser("rollback").add_argument("name")
    u = sub.add_parser("unregister")
    u.add_argument("name")
    u.add_argument("version")
    s = sub.add_parser("scale")
    s.add_argument("name")
    s.add_argument("version", nargs="?")
    s.add_argument("--min", type=int, required=True, dest="min_workers")
    s.add_argument("--max", type=int, required=True, dest="max_workers")
    return p


def _promote_command(api: Management, history: History, args) -> None:
    from scripts.serving import gate

    thresholds = gate.Thresholds.from_env(
        min_qwk=args.min_qwk, min_referable_sensitivity=args.min_referable_sensitivity,
        min_shadow_kappa=args.min_shadow_kappa, min_shadow_referable_agreement=args.min_shadow_referable_agreement)
    verdict = gate_verdict(api, args.name, args.version, args.model_store, thresholds, args.api_url,
                           os.environ.get("CLARITY_API_KEY"))
    for note in verdict.notes:
        print(f"note: {note}", file=sys.stderr)
    if not verdict.passed and args.force:
        print("gate refused; promoting anyway (--force):\n  - " + "\n  - ".join(verdict.failures), file=sys.stderr)
    previous = promote(api, history, args.name, args.version, verdict=verdict, force=args.force, reason=args.reason)
    print(f"{args.name}: default is {args.version}" + (f" (was {previous})" if previous else " (unchanged)"))


def _run(api: Management, history: History, args) -> None:
    if args.command == "list":
        _print_table([row for name in model_names(api) for row in versions(api, name)])
    elif args.command == "describe":
        print(json.dumps(api.call("GET", f"/models/{args.name}/all"), indent=2))
    elif args.command == "register":
        name, version = register(api, args.mar, model_store=args.model_store, name=args.name,
                                 version=args.version, workers=args.workers, wait=args.wait,
                                 timeout=args.timeout, say=lambda m: print(m, file=sys.stderr, flush=True))
        print(f"registered {name} {version}" + (" (READY)" if args.wait else ""))
    elif args.command == "promote":
        _promote_command(api, history, args)
    elif args.command == "serve-models":
        print(history.serve_models(args.name, args.model_store))
    elif args.command == "rollback":
        print(f"{args.name}: default is back to {rollback(api, history, args.name)}")
    elif args.command == "unregister":
        unregister(api, history, args.name, args.version)
        print(f"unregistered {args.name} {args.version}")
    elif args.command == "scale":
        scale(api, args.name, args.version, args.min_workers, args.max_workers)
        print(f"{args.name} {args.version or '(default)'}: workers {args.min_workers}..{args.max_workers}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        _run(Management(args.management, key_file=args.key_file), History(args.model_store / HISTORY_FILE), args)
    except ManagementError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
