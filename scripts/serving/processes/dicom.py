"""The DICOM side: our C-STORE receiver, and Orthanc as a clinic's PACS for the DICOM tests."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from scripts.serving.processes.base import REPO, Process, free_port


class DicomReceiver(Process):
    """The DICOM C-STORE receiver (`flask --app control_api dicom-receiver`) with the API's
    environment; DICOM and health ports from free_port() unless the env names them."""

    name = "dicom-receiver"
    cwd = REPO

    def __init__(self, workdir: Path, env: dict, *, port: int | None = None, health_port: int | None = None):
        super().__init__(workdir, env)
        self.port = port or int(self.env.get("DICOM_PORT") or free_port())
        self.health_port = health_port or int(self.env.get("DICOM_HEALTH_PORT") or free_port())
        self.ready_url = f"http://127.0.0.1:{self.health_port}/healthz"
        self.metrics_url = f"http://127.0.0.1:{self.health_port}/metrics"
        self.readyz_url = f"http://127.0.0.1:{self.health_port}/readyz"
        self.env.update({"DICOM_HOST": "127.0.0.1", "DICOM_PORT": str(self.port),
                         "DICOM_HEALTH_PORT": str(self.health_port), "PYTHONPATH": str(REPO)})
        self.env.setdefault("DICOM_SPOOL_DIR", str(self.workdir / "spool"))

    def command(self) -> list[str]:
        return [sys.executable, "-m", "flask", "--app", "control_api", "dicom-receiver"]


class Orthanc(Process):
    """Orthanc (Debian `orthanc`) as a clinic's PACS: REST and DICOM on loopback, no remote access.
    `modalities` maps a name to (AE title, host, port) for `POST /modalities/{name}/store`."""

    name = "orthanc"

    def __init__(self, workdir: Path, *, ae_title: str = "ORTHANC", modalities: dict | None = None):
        super().__init__(workdir)
        self.http_port, self.dicom_port, self.ae_title = free_port(), free_port(), ae_title
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.ready_url = f"{self.url}/system"
        self.config = {
            "Name": "clarity-test-pacs", "HttpPort": self.http_port, "DicomPort": self.dicom_port,
            "DicomAet": ae_title, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "StorageDirectory": str(self.workdir / "storage"), "IndexDirectory": str(self.workdir / "index"),
            "DicomModalities": {k: list(v) for k, v in (modalities or {}).items()},
            "DicomAlwaysAllowStore": True, "DicomCheckCalledAet": False, "Plugins": [],
        }

    def command(self) -> list[str]:
        path = self.workdir / "orthanc.json"
        path.write_text(json.dumps(self.config))
        return [shutil.which("Orthanc") or "/usr/sbin/Orthanc", str(path)]
