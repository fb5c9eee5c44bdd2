"""A real HTTP server on 127.0.0.1 that serves artifacts, with faults injected per artifact.

::

    with ArtifactServer() as server:
        url = server.add("bin_1.1", data, fault=Fault(drop_after=1000))
        ...
        server.check()   # re-raises an error that happened in the server's threads

Faults: an error status, wrong bytes, a file truncated on the server, a connection dropped
after N bytes (a given number of times), a slow trickle, no ``Range`` support, an endless
body, a redirect. ``Range: bytes=N-`` requests get 206 with ``Content-Range`` unless the
artifact's fault says ``no_range``.
"""

from __future__ import annotations

import hashlib
import http.server
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from ._base import ThreadedHttpServer

__all__ = ["ArtifactServer", "Fault", "ServedRequest"]


@dataclass(frozen=True)
class Fault:
    """What goes wrong when an artifact is fetched.

    Attributes:
        status: answer with this HTTP status instead of the bytes (404, 500, 503...).
        wrong_bytes: serve other bytes of the same length.
        truncate_to: the server holds only the first N bytes (and says so in Content-Length).
        drop_after: announce the full length, send N bytes, then close the connection.
        drop_times: how many responses are dropped that way (then it serves normally).
        trickle_bytes_per_s: send at most this many bytes a second.
        no_range: ignore ``Range`` and never send ``Accept-Ranges``.
        endless: send bytes forever, without Content-Length.
        redirect_to: answer 302 with this Location.
    """

    status: int | None = None
    wrong_bytes: bool = False
    truncate_to: int | None = None
    drop_after: int | None = None
    drop_times: int = 1
    trickle_bytes_per_s: int | None = None
    no_range: bool = False
    endless: bool = False
    redirect_to: str | None = None


@dataclass(frozen=True)
class ServedRequest:
    """One request the server received."""

    method: str
    path: str
    range: str | None
    status: int


@dataclass
class _Entry:
    data: bytes
    fault: Fault
    drops_left: int = field(default=0)


class ArtifactServer(ThreadedHttpServer):
    """Serves artifacts on ``http://127.0.0.1:<free port>``; a context manager.

    Attributes:
        requests: every request served, in order.
        active: requests being served now.
        peak_active: the most requests served at once so far (concurrent downloads).
    """

    def __init__(self, host: str = "127.0.0.1") -> None:
        self._entries: dict[str, _Entry] = {}
        self.requests: list[ServedRequest] = []
        self.active = 0
        self.peak_active = 0
        super().__init__(host, _handler_for(self))

    def url(self, name: str) -> str:
        """The URL of artifact ``name``."""
        return f"{self.base_url}/{name.lstrip('/')}"

    def add(self, name: str, data: bytes, *, fault: Fault | None = None) -> str:
        """Serve ``data`` at ``/name`` (replacing what was there); return its URL."""
        fault = fault or Fault()
        with self._lock:
            self._entries["/" + name.lstrip("/")] = _Entry(data, fault, fault.drop_times)
        return self.url(name)

    def publish(self, release: Any, **faults: Fault) -> str:
        """Serve each file of ``release`` (a :class:`ToyRelease`) at ``<role>_<version>``, with
        faults by role name (``bin=Fault(status=404)``); return the base URL for its order."""
        for role, data in release.files.items():
            self.add(release.artifact_name(role), data, fault=faults.get(role.value))
        return self.base_url

    def set_fault(self, name: str, fault: Fault | None) -> None:
        """Change the fault of an artifact already added."""
        with self._lock:
            entry = self._entries["/" + name.lstrip("/")]
            entry.fault = fault or Fault()
            entry.drops_left = entry.fault.drop_times

    def remove(self, name: str) -> None:
        """Stop serving ``name`` (it becomes a 404)."""
        with self._lock:
            self._entries.pop("/" + name.lstrip("/"), None)

    # called by the handler
    def _lookup(self, path: str) -> tuple[bytes, Fault, bool] | None:
        with self._lock:
            entry = self._entries.get(path)
            if entry is None:
                return None
            drop = entry.fault.drop_after is not None and entry.drops_left > 0
            if drop:
                entry.drops_left -= 1
            return entry.data, entry.fault, drop

    def _count(self, delta: int) -> None:
        with self._lock:
            self.active += delta
            self.peak_active = max(self.peak_active, self.active)

    def _record(self, request: ServedRequest) -> None:
        with self._lock:
            self.requests.append(request)


def _handler_for(owner: ArtifactServer) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True

        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_HEAD(self) -> None:
            self.do_GET()

        def do_GET(self) -> None:
            owner._count(+1)
            try:
                self._serve()
            except (TimeoutError, BrokenPipeError, ConnectionResetError):
                pass  # the client went away: that is the client's business
            except Exception as exc:
                owner._error(exc)
                raise
            finally:
                owner._count(-1)

        def _serve(self) -> None:
            path = self.path.split("?", 1)[0]
            found = owner._lookup(path)
            rng = self.headers.get("Range")
            if found is None:
                self._plain(404, b"not found\n", path, rng)
                return
            data, fault, drop = found
            if fault.redirect_to is not None:
                self.send_response(302)
                self.send_header("Location", fault.redirect_to)
                self.send_header("Content-Length", "0")
                self.end_headers()
                owner._record(ServedRequest(self.command, path, rng, 302))
                return
            if fault.status is not None:
                self._plain(fault.status, f"fault {fault.status}\n".encode(), path, rng)
                return
            if fault.endless:
                self._endless(path, rng, fault)
                return
            if fault.wrong_bytes:
                data = bytes((b + 1) % 256 for b in data)
            if fault.truncate_to is not None:
                data = data[: fault.truncate_to]
            start = 0
            status = 200
            if rng and not fault.no_range and rng.startswith("bytes=") and rng.endswith("-"):
                start_text = rng[len("bytes=") : -1]
                if start_text.isdigit() and int(start_text) < len(data):
                    start = int(start_text)
                    status = 206
            etag = '"' + hashlib.sha256(data).hexdigest()[:32] + '"'
            if status == 206 and self.headers.get("If-Range") not in (None, etag):
                start, status = 0, 200
            body = data[start:]
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("ETag", etag)
            if not fault.no_range:
                self.send_header("Accept-Ranges", "bytes")
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.end_headers()
            owner._record(ServedRequest(self.command, path, rng, status))
            if self.command == "HEAD":
                return
            limit = len(body)
            if drop and fault.drop_after is not None:
                limit = min(limit, fault.drop_after)
            self._send(body[:limit], fault.trickle_bytes_per_s)
            if limit < len(body):
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)

        def _send(self, body: bytes, rate: int | None) -> None:
            if rate is None:
                self.wfile.write(body)
                return
            step = max(1, rate // 10)
            for i in range(0, len(body), step):
                self.wfile.write(body[i : i + step])
                self.wfile.flush()
                if i + step < len(body):  # not after the last bytes: the response is over
                    time.sleep(0.1)

        def _endless(self, path: str, rng: str | None, fault: Fault) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Connection", "close")
            self.end_headers()
            owner._record(ServedRequest(self.command, path, rng, 200))
            self.close_connection = True
            block = b"\0" * 65536
            while True:
                self.wfile.write(block)
                if fault.trickle_bytes_per_s:
                    time.sleep(0.1)

        def _plain(self, status: int, body: bytes, path: str, rng: str | None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            owner._record(ServedRequest(self.command, path, rng, status))

    return Handler
