"""Restart under systemd: tell it we are stopping, then leave so ``Restart=always`` brings the
new version up. Also the ``READY=1`` and ``WATCHDOG=1`` helpers a ``Type=notify`` daemon needs.

The unit should say ``Type=notify`` and ``Restart=always`` (a plain exit or a SIGTERM counts as
a clean stop, which ``Restart=on-failure`` would not restart). ``NotifyAccess=all`` is needed
only when something else than the main process notifies.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Literal

import sdnotify

from .._system import System
from .overlap import tell_parent_ready

__all__ = [
    "SystemdRestarter",
    "notify_ready",
    "notify_status",
    "notify_watchdog",
    "ready_or_unsupervised",
    "watchdog_interval_s",
]

log = logging.getLogger("selfupgrade.restart")


def _notifier() -> sdnotify.SystemdNotifier:
    return sdnotify.SystemdNotifier()


_ready_at: list[float] = []  # when this process said READY=1 (monotonic)
_pets: list[float] = []  # when it last petted the watchdog


def notify_ready(status: str | None = None) -> None:
    """Tell systemd the daemon has started (``READY=1``); a no-op outside systemd. In a new
    version started by :class:`~selfupgrade.restart.overlap.OverlapRestarter`, first tell
    the old process, and wait for it to hand over."""
    tell_parent_ready()
    _notifier().notify("READY=1" + (f"\nSTATUS={status}" if status else ""))
    _ready_at[:] = [time.monotonic()]


def ready_or_unsupervised() -> bool:
    """Whether this process may count as started: it runs without a notify socket (nothing
    to tell), or it told systemd ``READY=1`` (:func:`notify_ready`) and, under
    ``WatchdogSec=``, has since petted the watchdog for a whole watchdog period.

    Under ``Type=notify`` a version that never says READY, or never pets the watchdog, is
    killed by systemd however healthy it looks otherwise; confirmed, it would be killed at
    every start for good. So the updater does not confirm it before: it stays on trial, and
    the guard rolls it back."""
    if not os.environ.get("NOTIFY_SOCKET"):
        return True
    if not _ready_at:
        return False
    half = watchdog_interval_s()
    if half is None:
        return True
    now = time.monotonic()
    return now - _ready_at[0] >= 2 * half and bool(_pets) and now - _pets[0] < 2 * half


def notify_status(status: str) -> None:
    """Set the status line ``systemctl status`` shows; a no-op outside systemd."""
    _notifier().notify(f"STATUS={status}")


def notify_watchdog() -> None:
    """Pet systemd's watchdog (``WATCHDOG=1``); a no-op outside systemd."""
    _notifier().notify("WATCHDOG=1")
    _pets[:] = [time.monotonic()]


def watchdog_interval_s() -> float | None:
    """Half the watchdog timeout systemd set for this process (pet at least this often), or
    ``None`` when no watchdog is configured for it."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or not usec.isdigit() or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2_000_000


class SystemdRestarter:
    """Sends ``STOPPING=1``, then ends the process so systemd restarts it.

    Args:
        how: ``"signal"`` sends SIGTERM to this process so the daemon's own shutdown runs,
            and exits hard after ``grace_s`` if it has not gone by then; ``"exit"`` leaves at
            once with ``exit_code``.
        grace_s: time the daemon has to shut down after SIGTERM.
        exit_code: the code for ``"exit"`` and for the hard exit after the grace time.
        system: the seam for signals and exits.
    """

    def __init__(
        self,
        *,
        how: Literal["signal", "exit"] = "signal",
        grace_s: float = 10.0,
        exit_code: int = 0,
        system: System | None = None,
    ) -> None:
        self._how = how
        self._grace_s = grace_s
        self._exit_code = exit_code
        self._sys = system or System()

    def restart(self) -> None:
        """Notify systemd and leave; see the class docstring."""
        _notifier().notify("STOPPING=1\nSTATUS=restarting into a new version")
        if self._how == "exit":
            log.info("exiting with %d so systemd restarts the new version", self._exit_code)
            self._sys.exit_now(self._exit_code)
        log.info("sending SIGTERM to self so systemd restarts the new version")
        timer = threading.Timer(self._grace_s, self._sys.exit_now, args=(self._exit_code,))
        timer.daemon = True
        timer.start()
        self._sys.signal_self(signal.SIGTERM)
