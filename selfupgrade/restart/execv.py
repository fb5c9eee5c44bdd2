"""Restart in place with ``os.execv``: same PID, same interpreter, same arguments.

Useful where no supervisor runs the daemon. Give ``guard_state_dir`` so that the new process
starts through the guard (``python -m selfupgrade guard``): the start is then counted and a
version that cannot even start Python code is rolled back by the old, known-good code.

Give ``sockets`` (the daemon's listening sockets, from :func:`selfupgrade.sockets.listeners`)
and they are handed to the new version (:func:`selfupgrade.sockets.hand_over`): they stay open
across the exec, so connections that arrive meanwhile wait in their backlog and are answered
by the new version. ``before_exec`` runs first: stop accepting and finish the requests in
flight there (they would be cut by the exec).
"""

from __future__ import annotations

import logging
import socket
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from .._system import System
from ..errors import RestartFailed
from ..guard import guard_command
from ..sockets import hand_over

__all__ = ["ExecRestarter"]

log = logging.getLogger("selfupgrade.restart")


class ExecRestarter:
    """Replaces the process with a fresh run of the same command.

    Args:
        argv: the command to run, ``argv[0]`` being an executable path; default: this
            interpreter with the arguments it was started with (``sys.orig_argv``).
        guard_state_dir: run the command through the guard with this state directory.
        sockets: listening sockets to hand to the new version, by name.
        before_exec: called just before the exec (drain the requests in flight).
        system: the seam for ``execv``.
    """

    def __init__(
        self,
        argv: Sequence[str] | None = None,
        *,
        guard_state_dir: str | Path | None = None,
        sockets: Mapping[str, socket.socket] | None = None,
        before_exec: Callable[[], None] | None = None,
        system: System | None = None,
    ) -> None:
        self._argv = list(argv) if argv is not None else [sys.executable, *sys.orig_argv[1:]]
        self._guard = Path(guard_state_dir) if guard_state_dir is not None else None
        self._sys = system or System()
        self._sockets = dict(sockets or {})
        self._before_exec = before_exec

    def command(self) -> list[str]:
        """The argv that :meth:`restart` will exec."""
        if self._guard is None:
            return list(self._argv)
        return guard_command(self._guard, self._argv)

    def restart(self) -> None:
        """Exec the command; does not return.

        Raises:
            RestartFailed: ``execv`` failed (the executable is missing, for example).
        """
        argv = self.command()
        if self._before_exec is not None:
            self._before_exec()
        if self._sockets:
            hand_over(self._sockets)
            log.info("handing %s to the new version", ", ".join(self._sockets))
        log.info("exec %s", " ".join(argv))
        try:
            self._sys.execv(argv[0], argv)
        except OSError as exc:
            raise RestartFailed(f"execv {argv[0]} failed: {exc}") from exc
