"""A real TorchServe 0.12 with its own config, ports and TEMP, ready once a model has a READY worker."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import requests

from control_api.torchserve_keys import TorchServeKeys, refused
from scripts.serving.management import Management, any_ready
from scripts.serving.processes.base import REPO, VENV_BIN, Process, free_port


class TorchServe(Process):
    """A real TorchServe 0.12 frontend (Java) with its Python workers."""

    name = "torchserve"

    def __init__(self, workdir: Path, model_store: Path, *, models: str | None = None,
                 config: Path = REPO / "config.properties", overrides: dict | None = None,
                 ports: tuple[int, int, int] | None = None, env: dict | None = None):
        super().__init__(workdir, env)
        self.model_store = Path(model_store).resolve()
        self.models = models
        self.base_config = Path(config)
        self.overrides = dict(overrides or {})
        self.ports = ports or (free_port(), free_port(), free_port())
        self.grpc_ports = (free_port(), free_port())
        inf, mgmt, met = self.ports
        self.inference_url = f"http://127.0.0.1:{inf}"
        self.management_url = f"http://127.0.0.1:{mgmt}"
        self.metrics_url = f"http://127.0.0.1:{met}"
        self.ready_url = f"{self.inference_url}/ping"  # Healthy before any model loads: see wait_model_ready
        self.log_dir = self.workdir / "logs"
        self.config_path = self.workdir / "config.properties"
        # Token authorization is on (config.properties): TorchServe writes its keys into its
        # working directory, this process's workdir, at start.
        self.key_file = self.workdir / "key_file.json"
        self.token_auth = True  # unless the config turns it off (_write_config)

    def _write_config(self) -> None:
        props: dict[str, str] = {}
        if self.base_config.exists():
            for line in self.base_config.read_text().splitlines():
                if line.strip() and not line.lstrip().startswith("#") and "=" in line:
                    key, value = line.split("=", 1)
                    props[key.strip()] = value.strip()
        inf, mgmt, met = self.ports
        props.update({
            "inference_address": f"http://127.0.0.1:{inf}",
            "management_address": f"http://127.0.0.1:{mgmt}",
            "metrics_address": f"http://127.0.0.1:{met}",
            "model_store": str(self.model_store),
            # gRPC cannot be switched off in 0.12; fixed 7070/7071 would collide between instances.
            "grpc_inference_port": str(self.grpc_ports[0]),
            "grpc_management_port": str(self.grpc_ports[1]),
            # Registration may name archives in this store only (no remote URLs: the ShellTorch class).
            "allowed_urls": f"file://{self.model_store}/.*",
        })
        # Relative paths in the repo's config (torchserve-metrics.yaml) are relative to the repo root.
        if "metrics_config" in props and not os.path.isabs(props["metrics_config"]):
            props["metrics_config"] = str(self.base_config.parent / props["metrics_config"])
        props.update({k: str(v) for k, v in self.overrides.items()})
        self.token_auth = props.get("disable_token_authorization", "false").lower() != "true"
        self.config_path.write_text("".join(f"{k}={v}\n" for k, v in props.items()))

    def command(self) -> list[str]:
        cmd = [str(VENV_BIN / "torchserve"), "--start", "--foreground", "--ncs",
               "--model-store", str(self.model_store), "--ts-config", str(self.config_path)]
        if self.models:
            cmd += ["--models", self.models]
        return cmd

    def start(self, timeout: float = 120):
        self.log_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.workdir / "tmp"
        tmp.mkdir(exist_ok=True)
        # TEMP holds TorchServe's pid file; one per instance so parallel servers never clash.
        self.env.update({"TEMP": str(tmp), "LOG_LOCATION": str(self.log_dir),
                         "METRICS_LOCATION": str(self.log_dir), "PYTHONPATH": str(REPO)})
        self._write_config()
        self.key_file.unlink(missing_ok=True)  # a previous run's keys: never valid for this one
        return super().start(timeout)

    def wait_ready(self, timeout: float) -> None:
        self.wait_until(lambda: requests.get(self.ready_url, headers=self.auth(), timeout=2).status_code == 200,
                        timeout, f"{self.name} on {self.ready_url}")

    def settings_env(self) -> dict[str, str]:
        """The API's (and the tools') environment for this server."""
        return {"TORCHSERVE_INFERENCE_URL": self.inference_url, "TORCHSERVE_MANAGEMENT_URL": self.management_url,
                "TORCHSERVE_KEY_FILE": str(self.key_file)}

    def management(self, timeout: float = 5) -> Management:
        """The tools' management client for this server, with its key file."""
        return Management(self.management_url, timeout=timeout, key_file=str(self.key_file))

    def auth(self, kind: str = "inference") -> dict[str, str]:
        """The Authorization header with this server's current `kind` key (inference or management),
        for callers that speak to TorchServe with plain requests (tests, benchmarks); none when
        this server runs without token authorization."""
        if not self.token_auth:
            return {}
        keys = TorchServeKeys(self.key_file, self.management_url)
        key = keys.key(kind)
        probe = f"{self.inference_url}/ping" if kind == "inference" else f"{self.management_url}/models"
        if refused(requests.get(probe, headers=keys.headers(key), timeout=10)):  # expired: renew
            keys.renew(kind, key)
        return keys.headers(keys.key(kind))

    def model_status(self, name: str, version: str | None = None) -> list[dict]:
        return self.management().describe(name, version)

    def wait_model_ready(self, name: str, version: str | None = None, timeout: float = 120) -> None:
        """/ping says Healthy before the model loads: readiness is a READY worker."""
        try:
            self.wait_until(lambda: any_ready(self.model_status(name, version)), timeout,
                            f"model {name} READY on {self.management_url}", interval=0.5)
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}\n{self.model_log_tail()}") from None

    def model_log_tail(self, lines: int = 40) -> str:
        path = self.log_dir / "model_log.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def stop(self, timeout: float = 30) -> None:
        if self.proc is not None:
            # The launcher waits on Java; TERM lets Java stop its workers before the group is killed.
            subprocess.run([str(VENV_BIN / "torchserve"), "--stop"], env={**os.environ, **self.env},
                           cwd=self.workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
        super().stop(timeout)
