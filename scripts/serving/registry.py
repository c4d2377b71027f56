"""Manage model versions on TorchServe through its management API.

    python -m scripts.serving.registry [--management URL] [--key-file FILE] [--model-store DIR] COMMAND
        list                                   every model and version, the default marked *
        describe NAME                          TorchServe's description of every version (JSON)
        register MAR [--name N --version V] [--workers N] [--wait] [--timeout S]
        promote NAME VERSION                   make VERSION the default, remembering the old one
        rollback NAME                          return to the default before the last promote
        unregister NAME VERSION
        scale NAME [VERSION] --min N --max N

`promote` records the default it replaces in <model store>/.defaults.json
({"<name>": ["<older default>", ..., "<previous default>"]}); `rollback` pops the last entry.
TorchServe keeps no such history itself. The calls go through scripts/serving/management.py.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import zipfile
from pathlib import Path

from scripts.serving.management import DEFAULT_KEY_FILE, DEFAULT_MANAGEMENT, Management, ManagementError, ready_workers

HISTORY_FILE = ".defaults.json"
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


def register(api: Management, mar: str, *, model_store: Path, name: str | None = None,
             version: str | None = None, workers: int | None = None, wait: bool = True,
             timeout: float = 120) -> tuple[str, str]:
    """Register an archive from TorchServe's model store (a path is sent as its file name).

    A URL is passed on as it is: TorchServe's allowed_urls decides, and ours allows none remote.
    """
    if not (name and version):
        found = archive_identity(mar, model_store)
        name, version = name or found[0], version or found[1]
    params = {"url": mar if "://" in mar else Path(mar).name, "synchronous": "true"}
    if workers is not None:
        params["initial_workers"] = workers
    api.call("POST", "/models", **params)
    if wait:
        api.wait_ready(name, version, timeout)
    return name, version


class History:
    """Earlier defaults per model name, newest last, in <model store>/.defaults.json."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def load(self) -> dict[str, list[str]]:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}

    def save(self, data: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, self.path)  # never a half-written history


def promote(api: Management, history: History, name: str, version: str) -> str | None:
    """Make VERSION the default; returns the default it replaced (None when it was already)."""
    previous = default_version(api, name)
    if previous == version:
        return None
    api.call("PUT", f"/models/{name}/{version}/set-default")
    data = history.load()
    data.setdefault(name, []).append(previous)
    history.save(data)
    return previous


def rollback(api: Management, history: History, name: str) -> str:
    """Set the default back to the one the last promote replaced; returns that version."""
    data = history.load()
    stack = data.get(name) or []
    if not stack:
        raise ManagementError(f"no earlier default of {name} recorded in {history.path}")
    version = stack[-1]
    api.call("PUT", f"/models/{name}/{version}/set-default")
    stack.pop()
    history.save(data)
    return version


def unregister(api: Management, history: History, name: str, version: str) -> None:
    api.call("DELETE", f"/models/{name}/{version}")
    data = history.load()
    if version in data.get(name, []):  # a rollback must never aim at a version that is gone
        data[name] = [v for v in data[name] if v != version]
        history.save(data)


def scale(api: Management, name: str, version: str | None, min_workers: int, max_workers: int) -> None:
    path = f"/models/{name}" + (f"/{version}" if version else "")
    api.call("PUT", path, min_worker=min_workers, max_worker=max_workers, synchronous="true")


def _print_table(rows: list[dict]) -> None:
    print(f"{'':1} {'name':<12} {'version':<10} {'workers':>7} {'ready':>5} {'batch':>5} {'delay ms':>8}")
    for r in rows:
        print(f"{'*' if r['default'] else ' ':1} {r['name']:<12} {r['version']:<10} {r['workers']:>7} "
              f"{r['ready']:>5} {r['batch_size'] or '-':>5} {r['max_batch_delay_ms'] or '-':>8}")


def main(argv: list[str] | None = None) -> int:
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
    r.add_argument("mar", help="archive file name in the model store, e.g. dr_1.1.mar")
    r.add_argument("--name")
    r.add_argument("--version")
    r.add_argument("--workers", type=int)
    r.add_argument("--wait", action="store_true", help="wait until a worker is READY")
    r.add_argument("--timeout", type=float, default=120)
    pr = sub.add_parser("promote")
    pr.add_argument("name")
    pr.add_argument("version")
    sub.add_parser("rollback").add_argument("name")
    u = sub.add_parser("unregister")
    u.add_argument("name")
    u.add_argument("version")
    s = sub.add_parser("scale")
    s.add_argument("name")
    s.add_argument("version", nargs="?")
    s.add_argument("--min", type=int, required=True, dest="min_workers")
    s.add_argument("--max", type=int, required=True, dest="max_workers")
    args = p.parse_args(argv)

    api = Management(args.management, key_file=args.key_file)
    history = History(args.model_store / HISTORY_FILE)
    try:
        if args.command == "list":
            _print_table([row for name in model_names(api) for row in versions(api, name)])
        elif args.command == "describe":
            print(json.dumps(api.call("GET", f"/models/{args.name}/all"), indent=2))
        elif args.command == "register":
            name, version = register(api, args.mar, model_store=args.model_store, name=args.name,
                                     version=args.version, workers=args.workers, wait=args.wait,
                                     timeout=args.timeout)
            print(f"registered {name} {version}" + (" (READY)" if args.wait else ""))
        elif args.command == "promote":
            previous = promote(api, history, args.name, args.version)
            print(f"{args.name}: default is {args.version}" +
                  (f" (was {previous})" if previous else " (unchanged)"))
        elif args.command == "rollback":
            print(f"{args.name}: default is back to {rollback(api, history, args.name)}")
        elif args.command == "unregister":
            unregister(api, history, args.name, args.version)
            print(f"unregistered {args.name} {args.version}")
        elif args.command == "scale":
            scale(api, args.name, args.version, args.min_workers, args.max_workers)
            print(f"{args.name} {args.version or '(default)'}: workers {args.min_workers}..{args.max_workers}")
    except ManagementError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
