"""The Installer role: puts verified files in place, keeps the previous generation, and decides
at each start of the daemon whether the new version has earned its place.

An installer owns the files of the daemon (program, config, service file) and a durable record
of which generation is current, which is the previous one, and whether the current one still
awaits its health confirmation. The updater downloads into :meth:`Installer.staging_path`,
verifies, then calls :meth:`Installer.install`; after the restart, :meth:`Installer.boot`
counts the start and :meth:`Installer.confirm` or :meth:`Installer.rollback` ends the trial.

Contract:

* ``install`` is all or nothing: when it returns or raises, and after a crash at any moment
  followed by the next ``boot``/``recover``, the files are the complete old set or the
  complete new set. It raises :class:`~selfupgrade.errors.LockBusy` if another updater holds
  the lock, :class:`~selfupgrade.errors.InstallFailed` if it undid itself.
* ``preflight`` raises :class:`~selfupgrade.errors.HostNotReady` before any download if the
  files cannot be written.
* ``rollback`` raises :class:`~selfupgrade.errors.OperatorNeeded` when there is no previous
  generation to go back to.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

from ..models import Role

__all__ = [
    "DEFAULT_MODES",
    "BootReport",
    "ConfirmPolicy",
    "Installer",
    "InstallerStatus",
    "LastResult",
    "Pending",
    "StagedFile",
]

DEFAULT_MODES: Mapping[Role, int] = {Role.BIN: 0o755, Role.CFG: 0o644, Role.SERVICE: 0o644}
"""Modes for a file that did not exist before and whose artifact names no mode."""


@dataclass(frozen=True)
class StagedFile:
    """A verified file waiting in ``staged`` to replace ``target``.

    Attributes:
        role: which file of the triple.
        target: the final path.
        staged: where the verified bytes are now, in ``target``'s directory.
        mode: the mode to install with; ``None`` keeps the replaced file's mode.
    """

    role: Role
    target: Path
    staged: Path
    mode: int | None = None


@dataclass(frozen=True)
class ConfirmPolicy:
    """How a new version must prove itself after the restart.

    Attributes:
        max_starts: starts allowed without confirming before the previous generation comes back
            (a crash loop is counted like a boot counter).
        timeout_s: how long each start has to confirm.
    """

    max_starts: int = 2
    timeout_s: float = 60.0


@dataclass(frozen=True)
class Pending:
    """A new generation on trial.

    Attributes:
        version: the version on trial.
        from_version: the version it replaced (what a rollback restores).
        starts: starts counted so far.
        max_starts: starts allowed.
        deadline: wall-clock time by which the current start must confirm (``None`` before the
            first start).
        roles: the files the new generation replaced (``"bin"``, ``"cfg"``, ``"service"``).
    """

    version: str
    from_version: str
    starts: int
    max_starts: int
    deadline: float | None
    roles: tuple[str, ...] = ()


@dataclass(frozen=True)
class LastResult:
    """How the last trial ended, kept so the next heartbeat can report it.

    Attributes:
        version: the version that was tried.
        outcome: ``confirmed`` or ``rolled_back``.
        reason: why it was rolled back (empty when confirmed).
        at: wall-clock time of the outcome.
    """

    version: str
    outcome: Literal["confirmed", "rolled_back"]
    reason: str
    at: float


@dataclass(frozen=True)
class InstallerStatus:
    """What the installer knows; cheap to read, safe while another process installs.

    Attributes:
        current_version: the installed generation's version, ``None`` before the first install.
        previous_version: the generation a rollback would restore.
        pending: the trial in progress, if any.
        last_result: how the last trial ended.
    """

    current_version: str | None = None
    previous_version: str | None = None
    pending: Pending | None = None
    last_result: LastResult | None = None


@dataclass(frozen=True)
class BootReport:
    """What :meth:`Installer.boot` found and did at this start.

    Attributes:
        status: the state after the boot was counted.
        recovered: an interrupted install was finished (``"forward"``) or undone (``"back"``).
        rolled_back: the trial failed at this start and the previous generation was restored.
        messages: one line per thing done, for the log.
    """

    status: InstallerStatus
    recovered: Literal["forward", "back"] | None = None
    rolled_back: bool = False
    messages: Sequence[str] = field(default_factory=tuple)


@runtime_checkable
class Installer(Protocol):
    """Installs verified files atomically and keeps a previous generation to roll back to."""

    def preflight(self, needs: Sequence[tuple[Path, int | None]]) -> None:
        """Check before any download that each target can be written and its filesystem has
        room for the announced size (``None`` when unknown).

        Raises:
            HostNotReady: naming the directory and what is missing (InsufficientSpace for room).
        """

    def staging_path(self, target: Path) -> Path:
        """A fresh path, in ``target``'s own directory, to download the new bytes into."""

    def install(
        self,
        version: str,
        files: Sequence[StagedFile],
        *,
        from_version: str,
        confirm: ConfirmPolicy,
    ) -> bool:
        """Swap ``files`` in as generation ``version``; the old files become the previous one.

        Returns ``False`` (and discards the staged files) when ``version`` with exactly these
        files is already installed, for example because another updater was faster.

        Raises:
            LockBusy: another updater holds the lock.
            InstallFailed: the swap failed and was undone.
        """

    def boot(self, *, now: float, claim: bool) -> BootReport:
        """Finish or undo an interrupted install, and count this start of a version on trial.

        Called by the guard before the daemon starts (``claim=False``) and by the updater when
        the daemon starts (``claim=True``); each start is counted once whichever runs.
        """

    def confirm(self) -> None:
        """End the trial of the current generation: it is healthy."""

    def rollback(self, reason: str) -> str:
        """Restore the previous generation; return its version.

        Raises:
            OperatorNeeded: there is no previous generation.
        """

    def status(self) -> InstallerStatus:
        """The current, previous and pending generations."""
