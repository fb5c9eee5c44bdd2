"""Restart with an overlap: the new version starts beside the old one and takes over only once
it says it is ready, in the manner of tableflip.

:meth:`OverlapRestarter.restart` starts the command (through the guard) as a child with the
daemon's listening sockets (:func:`selfupgrade.sockets.spawn_with`) and one end of a socket
pair. The child's :func:`~selfupgrade.notify_ready` writes ``ready`` on it. Then the old
process hands over and leaves: under systemd it first tells systemd that the child is the main
process now (``MAINPID=``), then it drains (``drain``: stop accepting, finish the requests in
flight) and exits 0. Both accept on the same sockets meanwhile, so nothing is refused and no
request waits for a start-up. If the child exits, or is not ready within ``ready_timeout_s``,
the child is killed and :class:`~selfupgrade.errors.RestartFailed` raised: the old process
keeps serving, and the updater puts the old files back.

Which process managers allow it: none (a daemon on its own) and systemd (``Type=notify``; the
main process's ``MAINPID=`` is accepted with the default ``NotifyAccess=main``). Not
supervisord, which takes the old process's exit for the program's and starts it again: there,
use :class:`~selfupgrade.ExecRestarter` with ``sockets=`` (same PID).
"""

from __future__ import annotations

import logging
import os
import select
import signal
import socket
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import sdnotify

from .._system import System
from ..errors import RestartFailed
from ..guard import guard_command
from ..sockets import FIRST_FD, spawn_with

__all__ = ["READY_FD_ENV", "OverlapRestarter", "tell_parent_ready"]

log = logging.getLogger("selfupgrade.restart")

READY_FD_ENV = "SELFUPGRADE_READY_FD"
"""The descriptor on which a child of :class:`OverlapRestarter` says it is ready."""
_READY = b"ready\n"


def tell_parent_ready(timeout_s: float = 10.0) -> bool:
    """In a child of :class:`OverlapRestarter`: say ``ready`` to the old process and wait
    (at most ``timeout_s``) until it has handed over (it closes its end), so that what this
    process tells systemd next comes from the main process. :func:`~selfupgrade.notify_ready`
    calls it; returns ``False`` (doing nothing) in any other process."""
    fd = os.environ.pop(READY_FD_ENV, "")
    if not fd.isdigit():
        return False
    with socket.socket(fileno=int(fd)) as channel:
        try:
            channel.sendall(_READY)
            channel.settimeout(timeout_s)
            channel.recv(1)  # b"" when the old process closed its end
        except OSError as exc:
            log.warning("the old process did not take the hand-over: %s", exc)
    return True


class OverlapRestarter:
    """Starts the new version beside this one; see the module docstring.

    Args:
        sockets: the daemon's listening sockets, by name (from
            :func:`selfupgrade.sockets.listeners`).
        argv: the command; default: this interpreter with the arguments it was started with.
        guard_state_dir: run the command through the guard with this state directory.
        ready_timeout_s: how long the new version has to say it is ready.
        drain: called once the new version is ready: stop accepting, finish the requests in
            flight.
        system: the seam for the exit.
    """

    def __init__(
        self,
        sockets: Mapping[str, socket.socket],
        *,
        argv: Sequence[str] | None = None,
        guard_state_dir: str | Path | None = None,
        ready_timeout_s: float = 30.0,
        drain: Callable[[], None] | None = None,
        system: System | None = None,
    ) -> None:
        self._sockets = dict(sockets)
        self._argv = list(argv) if argv is not None else [sys.executable, *sys.orig_argv[1:]]
        self._guard = Path(guard_state_dir) if guard_state_dir is not None else None
        self._ready_timeout_s = ready_timeout_s
        self._drain = drain
        self._sys = system or System()

    def command(self) -> list[str]:
        """The argv of the new version."""
        return guard_command(self._guard, self._argv) if self._guard else list(self._argv)

    def restart(self) -> None:
        """Start the new version, wait for it to be ready, hand over and exit 0.

        Raises:
            RestartFailed: the new version exited or was not ready in time (it was killed;
                this process keeps serving).
        """
        argv = self.command()
        ours, theirs = socket.socketpair()
        with ours:
            try:
                fd = FIRST_FD + len(self._sockets)
                pid = spawn_with(
                    argv, self._sockets, extra_fds=[theirs.fileno()], env={READY_FD_ENV: str(fd)}
                )
            except OSError as exc:
                raise RestartFailed(f"could not start {argv[0]}: {exc}") from exc
            finally:
                theirs.close()
            log.info("started the new version as pid %d; waiting for it to be ready", pid)
            problem = self._wait_ready(ours, pid)
            if problem:
                self._kill(pid)
                raise RestartFailed(
                    f"the new version (pid {pid}) {problem}; this one keeps serving"
                )
            if os.environ.get("NOTIFY_SOCKET"):
                sdnotify.SystemdNotifier().notify(f"MAINPID={pid}")
        log.info("the new version (pid %d) is ready: draining and leaving", pid)
        if self._drain is not None:
            self._drain()
        self._sys.exit_now(0)

    def _wait_ready(self, channel: socket.socket, pid: int) -> str:
        """``""`` once the child said ready, or what went wrong."""
        deadline = time.monotonic() + self._ready_timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return f"was not ready within {self._ready_timeout_s:g} s"
            readable, _, _ = select.select([channel], [], [], min(left, 0.2))
            if readable:
                said = channel.recv(len(_READY))
                if said == _READY:
                    return ""
                ended = None  # its end closed: it is exiting, most likely
                for _ in range(20):
                    ended = _reap(pid)
                    if ended is not None:
                        return f"exited with status {ended} before it was ready"
                    time.sleep(0.05)
                return "closed its end before it was ready"
            ended = _reap(pid)
            if ended is not None:
                return f"exited with status {ended} before it was ready"

    @staticmethod
    def _kill(pid: int) -> None:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


def _reap(pid: int) -> int | None:
    """The child's exit status if it has ended (and is now reaped), else ``None``."""
    try:
        done, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return -1
    return os.waitstatus_to_exitcode(status) if done else None
