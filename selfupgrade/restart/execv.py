"""Restart in place with ``os.execv``: same PID, same interpreter, same arguments.

Useful where no supervisor runs the daemon. Give ``guard_state_dir`` so that the new process
starts through the guard (``python -m selfupgrade guard``): the start is then counted and a
version that cannot even start Python code is rolled back by the old, known-good code.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from .._system import System
from ..errors import RestartFailed
from ..guard import guard_command

__all__ = ["ExecRestarter"]

log = logging.getLogger("selfupgrade.restart")


class ExecRestarter:
    """Replaces the process with a fresh run of the same command.

    Args:
        argv: the command to run, ``argv[0]`` being an executable path; default: this
            interpreter with the arguments it was started with (``sys.orig_argv``).
        guard_state_dir: run the command through the guard with this state directory.
        system: the seam for ``execv``.
    """

    def __init__(
        self,
        argv: Sequence[str] | None = None,
        *,
        guard_state_dir: str | Path | None = None,
        system: System | None = None,
    ) -> None:
        self._argv = list(argv) if argv is not None else [sys.executable, *sys.orig_argv[1:]]
        self._guard = Path(guard_state_dir) if guard_state_dir is not None else None
        self._sys = system or System()

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
        log.info("exec %s", " ".join(argv))
        try:
            self._sys.execv(argv[0], argv)
        except OSError as exc:
            raise RestartFailed(f"execv {argv[0]} failed: {exc}") from exc
