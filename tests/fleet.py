"""Test helpers on top of examples/fleet.py: polling, and a sampler of peaks."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from examples.fleet import AGENT_CFG, NEW, OLD, Fleet, Hbs, serve_release

__all__ = ["AGENT_CFG", "NEW", "OLD", "Fleet", "Hbs", "Sampler", "serve_release", "wait_until"]


def wait_until(
    what: str,
    predicate: Callable[[], bool],
    timeout_s: float = 90.0,
    explain: Callable[[], str] = lambda: "",
) -> None:
    """Poll ``predicate`` every 0.1 s until true.

    Raises:
        AssertionError: naming ``what`` and what ``explain`` says.
    """
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}\n{explain()}")
        time.sleep(0.1)


class Sampler:
    """Calls ``probe`` in a thread as fast as it can and keeps the largest value (the peak)."""

    def __init__(self, probe: Callable[[], int]) -> None:
        self.probe = probe
        self.peak = 0
        self.samples = 0
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                value = self.probe()
            except Exception:
                self.errors += 1
                time.sleep(0.01)
                continue
            self.peak = max(self.peak, value)
            self.samples += 1

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
