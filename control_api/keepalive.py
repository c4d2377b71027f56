"""Close the connection after an answer that left part of the request body unread.

The API answers some requests before reading their body: 401 and 403 (auth runs first), 413
(Content-Length over the limit), 415, 429, and 422 for a body of the wrong kind. gunicorn then
says `Connection: keep-alive`, drains at most 64 KiB of the rest, and closes the socket when
more is left, so a keep-alive client (a browser, `requests.Session`, nginx's upstream pool)
sends its next request into a closed connection ("Remote end closed connection without
response", or a 502 from nginx). Reading the rest instead would let one client hold a thread
for as long as it takes to send 20 MiB; answering `Connection: close` costs the client one new
connection after an error, and is what RFC 9112 §9.6 expects of a server that will not read on.

gunicorn drops a `Connection` header set by the application (hop-by-hop), so the decision is
passed to gunicorn's own request object, which gunicorn.conf.py's `pre_request` hands to this
module for the thread that serves it. Without gunicorn (tests, `flask run`) nothing happens.
"""
from __future__ import annotations

import threading

_current = threading.local()


def serving(req) -> None:
    """gunicorn's pre_request hook: remember the request this thread is about to serve."""
    _current.req = req


class _CountingInput:
    """wsgi.input that knows whether the body was read to its end."""

    def __init__(self, stream, length: int | None):
        self._stream, self.length, self.read_bytes, self.eof = stream, length, 0, False

    def _count(self, data: bytes) -> bytes:
        self.read_bytes += len(data)
        if not data:
            self.eof = True
        return data

    def read(self, *args):
        return self._count(self._stream.read(*args))

    def readline(self, *args):
        return self._count(self._stream.readline(*args))

    def readlines(self, *args):
        lines = self._stream.readlines(*args)
        self.read_bytes += sum(len(line) for line in lines)
        return lines

    def __iter__(self):
        for line in self._stream:
            yield self._count(line)

    @property
    def finished(self) -> bool:
        if self.length is not None:
            return self.read_bytes >= self.length
        return self.eof


def _length(environ) -> int | None:
    try:
        return int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        return None


class CloseUnreadBodies:
    """WSGI middleware: `Connection: close` (through gunicorn) when the body was not read to its end."""

    def __init__(self, app):
        self.app = app

    def __call__(self, environ, start_response):
        length = _length(environ)
        chunked = "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
        if not length and not chunked:
            return self.app(environ, start_response)
        counting = _CountingInput(environ["wsgi.input"], None if chunked else length)
        environ["wsgi.input"] = counting

        def start(status, headers, exc_info=None):
            if not counting.finished:
                req = getattr(_current, "req", None)
                if req is not None and hasattr(req, "force_close"):
                    req.force_close()
            return start_response(status, headers, exc_info)

        return self.app(environ, start)
