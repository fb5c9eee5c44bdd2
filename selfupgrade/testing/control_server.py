"""A minimal control server for tests of the agent side: one published order for everyone.

It speaks the library's heartbeat protocol (``POST /selfupgrade/v1/heartbeat``) and records
every beat. It has no queue and no rollout logic (that is the hbs of ``selfupgrade.server``);
it is what a test needs to tell one daemon "upgrade to X" and watch what it reports.
"""

from __future__ import annotations

import http.server
import json
import threading
import time
from collections.abc import Callable

from ..models import Heartbeat, UpgradeOrder
from ._base import ThreadedHttpServer

__all__ = ["HEARTBEAT_PATH", "ControlServer"]

HEARTBEAT_PATH = "/selfupgrade/v1/heartbeat"


class ControlServer(ThreadedHttpServer):
    """Answers heartbeats with the published order on ``http://127.0.0.1:<free port>``.

    Attributes:
        beats: every valid heartbeat received, in order.
        rejected: bodies that were not valid heartbeats (answered 400).
    """

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.beats: list[Heartbeat] = []
        self.rejected: list[bytes] = []
        self._order: UpgradeOrder | None = None
        super().__init__(host, _handler_for(self))
        self._changed = threading.Condition(self._lock)

    @property
    def url(self) -> str:
        """The heartbeat URL."""
        return f"{self.base_url}{HEARTBEAT_PATH}"

    def publish(self, order: UpgradeOrder | None) -> None:
        """Answer every following heartbeat with ``order`` (``None`` withdraws it)."""
        with self._lock:
            self._order = order

    def latest(self, host: str) -> Heartbeat | None:
        """The last heartbeat of ``host``."""
        with self._lock:
            return next((b for b in reversed(self.beats) if b.host == host), None)

    def wait_for(
        self, predicate: Callable[[list[Heartbeat]], bool], *, timeout_s: float = 30.0
    ) -> list[Heartbeat]:
        """Block until ``predicate(beats)`` is true; return the beats.

        Raises:
            TimeoutError: naming the last beat seen.
        """
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while not predicate(self.beats):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    last = self.beats[-1] if self.beats else None
                    raise TimeoutError(f"condition not met in {timeout_s}s; last beat: {last}")
                self._changed.wait(remaining)
            return list(self.beats)

    def wait_for_version(self, host: str, version: str, *, timeout_s: float = 30.0) -> Heartbeat:
        """Block until ``host`` beats with ``version`` and a confirmed health."""

        def done(beats: list[Heartbeat]) -> bool:
            return any(b.host == host and str(b.version) == version and b.confirmed for b in beats)

        beats = self.wait_for(done, timeout_s=timeout_s)
        return next(b for b in reversed(beats) if b.host == host and str(b.version) == version)

    def _handle(self, body: bytes) -> tuple[int, dict[str, object]]:
        try:
            beat = Heartbeat.from_wire(json.loads(body))
        except ValueError as exc:
            with self._lock:
                self.rejected.append(body)
            return 400, {"error": str(exc)}
        with self._changed:
            self.beats.append(beat)
            order = self._order
            self._changed.notify_all()
        return 200, {"order": order.to_wire() if order is not None else None}


def _handler_for(owner: ControlServer) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True

        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_POST(self) -> None:
            try:
                reply: dict[str, object]
                if self.path != HEARTBEAT_PATH:
                    status, reply = 404, {"error": "not found"}
                else:
                    length = int(self.headers.get("Content-Length") or 0)
                    status, reply = owner._handle(self.rfile.read(min(length, 1 << 20)))
                data = json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the agent went away (stopped or killed mid-heartbeat): its problem
            except Exception as exc:
                owner._error(exc)
                raise

    return Handler
