"""The Restarter role: bring the daemon back up on the newly installed files.

Contract: :meth:`Restarter.restart` is called once the new files are in place. It either does
not return (the process exits or is replaced), or returns after arranging for the restart to
happen very soon (a signal was sent, a supervisor was asked). It raises
:class:`~selfupgrade.errors.RestartFailed` when it cannot arrange it; the files stay installed
and the guard's start counter decides at the next start, so a failed restart never leaves a
half-state. A restarter never touches files.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

__all__ = ["Restarter"]


@runtime_checkable
class Restarter(Protocol):
    """Restarts the daemon so the new version runs."""

    def restart(self) -> None:
        """Restart now, or arrange for it to happen at once.

        Raises:
            RestartFailed: the restart could not be arranged.
        """
