"""A real ``redis-server`` on 127.0.0.1 and a free port, for tests of the shared store.

The binary comes from the host (Debian: ``apt-get install redis-server``); it is looked up on
``PATH`` or in ``$SELFUPGRADE_REDIS_SERVER``. Nothing is persisted; everything is stopped by
PID on :meth:`RedisServer.stop`.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time

from ._base import Managed
from .harness import stop_pid

__all__ = ["RedisServer", "find_redis_server", "free_port"]


def find_redis_server() -> str | None:
    """The path of ``redis-server``, or ``None`` when it is not installed."""
    return os.environ.get("SELFUPGRADE_REDIS_SERVER") or shutil.which("redis-server")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer(Managed):
    """``redis-server`` on 127.0.0.1, a context manager.

    Attributes:
        url: ``redis://127.0.0.1:<port>/0``.
        pid: the server's PID once started.

    Raises:
        FileNotFoundError: ``redis-server`` is not installed.
    """

    def __init__(self, port: int | None = None) -> None:
        binary = find_redis_server()
        if binary is None:
            raise FileNotFoundError(
                "redis-server is not installed (Debian: apt-get install redis-server)"
            )
        self._binary = binary
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.pid: int | None = None
        self._tmp = tempfile.TemporaryDirectory(prefix="su-redis-")
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 20.0) -> RedisServer:
        """Start the server and wait until it accepts connections."""
        self._proc = subprocess.Popen(
            [
                self._binary,
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self._tmp.name,
                "--protected-mode",
                "yes",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
        )
        self.pid = self._proc.pid
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                pass
            if self._proc.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        """Stop the server by PID."""
        if self._proc is not None and self._proc.poll() is None:
            stop_pid(self._proc.pid)
        self._proc = None
        self._tmp.cleanup()
