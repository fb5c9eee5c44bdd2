"""Fakes for every role, for unit tests of code that embeds an :class:`~selfupgrade.Updater`.

They record what they were asked and answer what the test told them to, without sockets or
processes. Our own unit tests use these same classes; the end-to-end tests use the real ones.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from .._system import System
from ..errors import DownloadError, RestartFailed
from ..models import Heartbeat, UpgradeOrder
from ..transport.base import ByteSink

__all__ = [
    "CrashingSystem",
    "FakeFetcher",
    "FakeRestarter",
    "FakeTransport",
    "RecordingSystem",
]


class FakeTransport:
    """Answers every heartbeat with :attr:`order` (``None`` by default) and records the beats.

    Set :attr:`fail_with` to an exception to make the next beats raise it, and
    :attr:`next_beat_s` to play a server that paces check-ins
    (:class:`~selfupgrade.transport.PacedTransport`).
    """

    def __init__(self, order: UpgradeOrder | None = None) -> None:
        self.order = order
        self.next_beat_s: float | None = None
        self.beats: list[Heartbeat] = []
        self.fail_with: Exception | None = None
        self.closed = False
        self._lock = threading.Lock()

    def heartbeat(self, beat: Heartbeat) -> UpgradeOrder | None:
        """Record ``beat``; return :attr:`order` or raise :attr:`fail_with`."""
        with self._lock:
            self.beats.append(beat)
        if self.fail_with is not None:
            raise self.fail_with
        return self.order

    def close(self) -> None:
        """Mark the transport closed."""
        self.closed = True


@dataclass
class FakeFetcher:
    """Serves bytes from a dict of URL -> bytes; a missing URL is a 404.

    Attributes:
        files: what each URL returns.
        chunk_size: bytes per sink write.
        fetched: the URLs asked for, in order.
    """

    files: dict[str, bytes] = field(default_factory=dict)
    chunk_size: int = 64 * 1024
    fetched: list[str] = field(default_factory=list)

    def fetch(self, url: str, sink: ByteSink, *, deadline: float, max_bytes: int) -> None:
        """Write ``files[url]`` into ``sink`` in chunks.

        Raises:
            DownloadError: with status 404 when the URL is unknown.
        """
        self.fetched.append(url)
        if url not in self.files:
            raise DownloadError(f"GET {url} answered 404", url=url, status_code=404)
        data = self.files[url]
        sink.announce(len(data))  # as a server's Content-Length
        for i in range(0, len(data), self.chunk_size):
            sink.write(data[i : i + self.chunk_size])

    def close(self) -> None:
        """Nothing to release."""


class FakeRestarter:
    """Counts restarts instead of restarting; optionally fails.

    Attributes:
        restarts: how many times :meth:`restart` was called.
        fail: raise :class:`RestartFailed` when set.
    """

    def __init__(self, *, fail: bool = False) -> None:
        self.restarts = 0
        self.fail = fail
        self.called = threading.Event()

    def restart(self) -> None:
        """Record the call.

        Raises:
            RestartFailed: when :attr:`fail` is set.
        """
        self.restarts += 1
        self.called.set()
        if self.fail:
            raise RestartFailed("FakeRestarter was told to fail")


class RecordingSystem(System):
    """The real system, recording every checkpoint it passes (``steps``)."""

    def __init__(self) -> None:
        self.steps: list[str] = []

    def checkpoint(self, step: str) -> None:
        """Remember ``step``."""
        self.steps.append(step)


class CrashingSystem(System):
    """The real system, except that it SIGKILLs its own process at one checkpoint.

    Args:
        crash_at: the 0-based index of the checkpoint to die at, counting every checkpoint
            passed, or a step name (the first checkpoint of that name).
        on_crash: called instead of SIGKILL (for in-process tests): it must raise or exit.
    """

    def __init__(
        self, crash_at: int | str, *, on_crash: Callable[[str], None] | None = None
    ) -> None:
        self.crash_at = crash_at
        self.on_crash = on_crash
        self.passed: list[str] = []

    def checkpoint(self, step: str) -> None:
        """Die here if this is the chosen checkpoint."""
        index = len(self.passed)
        self.passed.append(step)
        if self.crash_at == index or self.crash_at == step:
            if self.on_crash is not None:
                self.on_crash(step)
            else:
                os.kill(os.getpid(), signal.SIGKILL)
