"""Container health check for both images (the slim images carry no curl).

    healthcheck.py http://127.0.0.1:8000/healthz        # 200 means healthy
    healthcheck.py --model dr http://127.0.0.1:8081     # TorchServe: the model's default
                                                        # version has a READY worker

TorchServe's /ping answers Healthy before a model has loaded, so the TorchServe image asks
the management API whether a worker is READY instead, through the tools' management client
(scripts/serving/management.py, on the serving image's PYTHONPATH, with the management key from
TORCHSERVE_KEY_FILE; the URL check needs only the standard library, as the API image carries no
scripts/). Exit status 0 = healthy, 1 = not.
"""
from __future__ import annotations

import argparse
import sys
import urllib.error
import urllib.request


def _get(url: str, timeout: float) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def check_url(url: str, timeout: float) -> str | None:
    """None when the URL answers 200, else why not."""
    status, _ = _get(url, timeout)
    return None if status == 200 else f"{url} answered {status}"


def check_model(management_url: str, model: str, timeout: float) -> str | None:
    """None when the model's default version has at least one READY worker, else why not.
    The management key comes from TorchServe's key file (TORCHSERVE_KEY_FILE), renewed there
    when it has expired."""
    from scripts.serving.management import Management, ManagementError, any_ready

    try:
        described = Management(management_url, timeout=timeout).describe(model)
    except ManagementError as exc:
        return str(exc)
    if not isinstance(described, list):
        return f"{management_url} described {model} in no JSON list"
    if not any_ready(described):
        return f"model {model} has no READY worker"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", help="URL that must answer 200, or TorchServe's management URL")
    parser.add_argument("--model", help="TorchServe model name; url is then the management API")
    parser.add_argument("--timeout", type=float, default=4.0)
    args = parser.parse_args(argv)
    url = args.url
    try:
        problem = (check_model(url, args.model, args.timeout) if args.model
                   else check_url(url, args.timeout))
    except (OSError, ValueError) as exc:  # refused, timed out, not JSON
        problem = f"{url}: {exc}"
    if problem:
        print(f"unhealthy: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
