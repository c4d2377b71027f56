"""gunicorn settings for the control API, all from the environment (control_api/settings.py).

Run: gunicorn -c gunicorn.conf.py control_api.wsgi:app
"""
import glob
import os

from control_api.settings import Settings

settings = Settings.from_env()

bind = f"{settings.host}:{settings.port}"
workers = settings.workers
# Threads: an upload spends most of its time waiting on TorchServe, not on the CPU.
worker_class = "gthread"
threads = settings.gunicorn_threads
# Above TorchServe's timeout, so a slow prediction ends as a 202, not as a killed worker.
timeout = settings.worker_timeout
graceful_timeout = 30
keepalive = 5
# Request line and headers only: bodies are capped by MAX_UPLOAD_BYTES inside the app.
limit_request_line = 4094
limit_request_fields = 64
limit_request_field_size = 8190
# Recycle workers now and then (with jitter so they do not all restart at once).
max_requests = 2000
max_requests_jitter = 200

# JSON lines on stdout/stderr; the access line carries the path without its query string.
logger_class = "control_api.logs.GunicornLogger"
accesslog = "-"
errorlog = "-"
loglevel = settings.log_level.lower()
# A TLS-terminating proxy on the same host may say the original scheme.
forwarded_allow_ips = "127.0.0.1"
# gunicorn 27's control socket sits at one fixed path under $HOME: instances would share it,
# it fails on a read-only root filesystem, and nothing here uses it.
control_socket_disable = True


def pre_request(worker, req):
    # gunicorn's default logs every raw path at DEBUG, before the app can tell whether it is a
    # route or client input that may hold a name or record number (see logs.GunicornLogger).
    # The app closes the connection after an answer that left the body unread (keepalive.py).
    from control_api import keepalive

    keepalive.serving(req)


def on_starting(server):
    # Counters of a previous run's workers would otherwise be summed into this run's.
    if settings.prometheus_multiproc_dir:
        os.makedirs(settings.prometheus_multiproc_dir, exist_ok=True)
        for path in glob.glob(os.path.join(settings.prometheus_multiproc_dir, "*.db")):
            os.remove(path)


def child_exit(server, worker):
    if settings.prometheus_multiproc_dir:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)


def _json_error(sock, status_int, reason, mesg):
    """gunicorn's own answers (414 for an over-long request line, 400 for a malformed one, 431
    for too many headers) in the API's JSON error shape instead of gunicorn's HTML page. The
    message is the reason only: gunicorn's `mesg` quotes the request line, which may carry a
    name or record number typed into a URL."""
    import json
    import uuid

    from gunicorn import util

    body = json.dumps({"error": {"code": reason.lower().replace(" ", "_"), "message": reason + ".",
                                 "request_id": uuid.uuid4().hex}}).encode()
    head = (f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nCache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n"
            f"Content-Security-Policy: default-src 'none'; frame-ancestors 'none'\r\n\r\n").encode("latin1")
    util.write_nonblock(sock, head + body)


def _answer_errors_as_json():
    # gunicorn has no setting for the format of the answers it writes itself; its workers call
    # util.write_error, so that function is replaced here, in the master, before the fork.
    from gunicorn import util

    util.write_error = _json_error


_answer_errors_as_json()
