"""Real local processes: S3 (SeaweedFS), TorchServe, gunicorn, the DICOM receiver, Orthanc and a
scratch PostgreSQL database.

One implementation serves the test fixtures, `make run` / `make stack` and the benchmarks, so
what the tests exercise is what developers run. Every class starts a real process in its own
process group (so stop() takes its children with it), waits until the service really answers,
and keeps its output in a log file under its work directory.
"""

from scripts.serving.processes.base import (REPO, VENV_BIN, Process, ServiceExited, api_key, flask_cli, free_port,
                                            wait_for)
from scripts.serving.processes.dicom import DicomReceiver, Orthanc
from scripts.serving.processes.gunicorn import Gunicorn
from scripts.serving.processes.postgres import PostgresDatabase
from scripts.serving.processes.s3 import SeaweedS3
from scripts.serving.processes.torchserve import TorchServe

__all__ = ["REPO", "VENV_BIN", "Process", "ServiceExited", "api_key", "flask_cli", "free_port", "wait_for",
           "DicomReceiver", "Gunicorn", "Orthanc", "PostgresDatabase", "SeaweedS3", "TorchServe"]
