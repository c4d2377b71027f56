"""What the models CLI (registry.py) remembers, in the model store beside the archives, so that it
survives restarts of TorchServe, `make run` and the serve container (whose store is a volume).

- <store>/.defaults.json: per model the current default, the defaults it replaced (for
  `rollback`) and the registered versions: {"dr": {"default": "1.1", "previous": ["1.0"],
  "registered": ["1.0", "1.1"]}}. TorchServe itself keeps none of this (it runs with --ncs).
  At start, `serve-models` turns it into TorchServe's --models (default first, so it is the
  default again); deploy/torchserve/entrypoint.sh and `make run` use it.
- <store>/promotions.jsonl: one line per promote and rollback: when, who, from, to, the gate's
  verdict, and for `--force` the reason.
"""
from __future__ import annotations

import datetime as dt
import getpass
import json
import os
from pathlib import Path

HISTORY_FILE = ".defaults.json"
PROMOTIONS_FILE = "promotions.jsonl"


class History:
    """Per model name in <model store>/.defaults.json: the current default, earlier defaults
    (newest last) and the registered versions. Reads the older format ({"dr": ["1.0"]}) too."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def load(self) -> dict[str, dict]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        return {name: ({"default": None, "previous": list(entry), "registered": []}
                       if isinstance(entry, list) else entry) for name, entry in data.items()}

    def save(self, data: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, self.path)  # never a half-written history

    def entry(self, data: dict, name: str) -> dict:
        return data.setdefault(name, {"default": None, "previous": [], "registered": []})

    def registered(self, name: str, version: str, present: bool) -> None:
        data = self.load()
        entry = self.entry(data, name)
        versions = [v for v in entry.setdefault("registered", []) if v != version]
        entry["registered"] = versions + ([version] if present else [])
        if not present:  # a rollback must never aim at a version that is gone
            entry["previous"] = [v for v in entry.get("previous", []) if v != version]
            if entry.get("default") == version:
                entry["default"] = None
        self.save(data)

    def serve_models(self, name: str, model_store: Path) -> str:
        """TorchServe's --models for the saved state: the default first (TorchServe makes the first
        version it loads the default), then the other registered versions; only archives that exist."""
        entry = self.load().get(name) or {}
        order = [entry.get("default")] + list(entry.get("registered", []))
        seen, words = set(), []
        for version in order:
            if version and version not in seen and (Path(model_store) / f"{name}_{version}.mar").is_file():
                seen.add(version)
                words.append(f"{name}={name}_{version}.mar")
        return ",".join(words)


def log_promotion(model_store: Path, event: dict) -> None:
    """Append one line to <model store>/promotions.jsonl."""
    try:
        user = getpass.getuser()
    except Exception:  # no user name in some containers
        user = str(os.getuid())
    line = {"at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "user": user, **event}
    path = Path(model_store) / PROMOTIONS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(line) + "\n")
