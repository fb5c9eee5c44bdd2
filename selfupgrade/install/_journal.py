"""What every journaled installer shares: the state file, the lock, the trial, the preflight.

An installer keeps all its state in one JSON file, ``<state_dir>/state.json``, rewritten
atomically at each step, and serialises threads and processes with a
:class:`filelock.FileLock` on ``<state_dir>/lock``. The *trial* of a new generation is the same
whatever puts the files in place: each start is counted once (by the guard, or else by the
updater), a start beyond ``max_starts`` restores the previous generation, a confirmation ends
it. This module holds that part once; :class:`~selfupgrade.TripleInstaller` (files swapped in
place) and :class:`~selfupgrade.ReleaseInstaller` (release directories and a ``current`` link)
add how files are swapped, restored and recovered.

The journal names the installer that wrote it (``"layout"``), so that the guard, which is given
only the state directory, opens the right one (:func:`open_installer`), and an updater
configured with another installer is refused instead of misreading it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import filelock

from .._system import System, temp_name
from ..errors import (
    HostNotReady,
    InstallFailed,
    InsufficientSpace,
    LockBusy,
    OperatorNeeded,
    RecoveryFailed,
    SelfUpgradeError,
    disk_error,
)
from .base import BootReport, ConfirmPolicy, InstallerStatus, LastResult, Pending, StagedFile

__all__ = [
    "RESERVE_BYTES",
    "JournaledInstaller",
    "check_room",
    "check_writable",
    "ended",
    "open_installer",
    "read_journal",
    "sha256_file",
]

log = logging.getLogger("selfupgrade.install")

_FORMAT = 1
RESERVE_BYTES = 1 << 20
"""Room left free on a file system after an upgrade's files are placed."""


def sha256_file(path: Path) -> str | None:
    """The sha256 of ``path``'s bytes, or ``None`` if it does not exist."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except FileNotFoundError:
        return None
    return h.hexdigest()


def check_writable(directory: Path, target: Path) -> None:
    """Check that files can be created in ``directory`` (to install ``target``).

    Raises:
        HostNotReady: it does not exist or is not writable.
    """
    if not directory.is_dir():
        raise HostNotReady(
            f"cannot install {target}: directory {directory} does not exist", path=directory
        )
    probe = temp_name(directory / target.name)  # what a kill leaves here, the clean-up removes
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.unlink(probe)
    except OSError as exc:
        raise HostNotReady(
            f"cannot install {target}: directory {directory} is not writable "
            f"({exc.strerror}); give the agent's user write access to it",
            path=directory,
        ) from exc


def check_room(directory: Path, needed: int) -> None:
    """Check that ``directory``'s file system has ``needed`` bytes free, plus the reserve.

    Raises:
        InsufficientSpace: naming the directory, the bytes needed and the bytes free.
    """
    free = shutil.disk_usage(directory).free
    if needed + RESERVE_BYTES > free:
        raise InsufficientSpace(
            f"not enough space in {directory}: the upgrade needs {needed} bytes "
            f"(+1 MiB reserve) and {free} are free",
            path=directory,
            needed=needed,
            free=free,
        )


class JournaledInstaller:
    """The state file, the lock and the trial of an installer; subclasses move the files.

    Args:
        state_dir: where ``state.json`` and the lock live (created if missing). Keep it on the
            host's disk, outside anything an upgrade replaces.
        system: the seam for file effects (tests pass a crashing one).
        lock_timeout_s: how long to wait for another updater before :class:`LockBusy`.
    """

    LAYOUT: ClassVar[str] = ""
    """The name this installer writes into the journal's ``"layout"``."""

    _BY_LAYOUT: ClassVar[dict[str, type[JournaledInstaller]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.LAYOUT:
            JournaledInstaller._BY_LAYOUT[cls.LAYOUT] = cls

    def __init__(
        self,
        state_dir: str | os.PathLike[str],
        *,
        system: System | None = None,
        lock_timeout_s: float = 30.0,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._state_path = self.state_dir / "state.json"
        self._sys = system or System()
        self._lock = filelock.FileLock(self.state_dir / "lock", timeout=lock_timeout_s)

    # ---- what subclasses provide ---------------------------------------------------------

    def _roll_forward(self, state: dict[str, Any]) -> bool:
        """Finish the interrupted install ``state["txn"]`` describes, if its journal says it
        may be finished and its files allow it; ``False`` (nothing done) otherwise."""
        raise NotImplementedError

    def _undo_install(self, state: dict[str, Any], *, force_back: bool) -> Sequence[Path]:
        """Put the old generation back and discard the new one's files (``force_back``: the
        install failed in this process, wherever it was); return paths whose leftovers the
        clean-up must also look for."""
        raise NotImplementedError

    def _rollback_locked(self, state: dict[str, Any], reason: str, *, now: float) -> str:
        """Restore the previous generation recorded in ``state``; return its version."""
        raise NotImplementedError

    def _finish_rollback(self, state: dict[str, Any]) -> None:
        """Carry out (again, after a crash) the rollback ``state["txn"]`` describes."""
        raise NotImplementedError

    def _collect_garbage(self, state: Mapping[str, Any], also: Sequence[Path] = ()) -> None:
        """Delete what kills and finished transactions left that ``state`` no longer names
        (also beside the paths in ``also``)."""
        raise NotImplementedError

    def _plan(
        self, state: dict[str, Any], version: str, files: Sequence[StagedFile], from_version: str
    ) -> tuple[dict[str, Any], list[int]] | None:
        """What the install's journal entry records beyond the common fields (its ``id`` among
        them), and the final mode of each staged file; ``None`` when ``version`` with these
        files is installed already. May add to ``state``, which is saved with the entry."""
        raise NotImplementedError

    def _apply(self, state: dict[str, Any]) -> None:
        """Carry out the install that ``state["txn"]`` (saved as ``prepared``) describes."""
        raise NotImplementedError

    def _layout_fields(self) -> dict[str, Any]:
        """What the journal records about where the files live (for :func:`open_installer`)."""
        return {}

    @classmethod
    def _from_journal(cls, state_dir: Path, fields: Mapping[str, Any]) -> JournaledInstaller:
        """The installer that wrote a journal with these layout ``fields``."""
        return cls(state_dir)

    def version_on_disk(self) -> str | None:
        """The version whose every file the journal records is on disk byte for byte, as the
        daemon's start would find it (``None``: none is whole, or there is no journal). Reads
        only; for a guard that cannot write and must still start a complete version.

        Raises:
            RecoveryFailed: the journal is unreadable.
        """
        raise NotImplementedError

    # ---- reading -------------------------------------------------------------------------

    def status(self) -> InstallerStatus:
        """The current, previous and pending generations, read from ``state.json``."""
        return _status(self._load())

    # ---- install -------------------------------------------------------------------------

    def install(
        self,
        version: str,
        files: Sequence[StagedFile],
        *,
        from_version: str,
        confirm: ConfirmPolicy,
    ) -> bool:
        """Install ``files`` as ``version``, on trial; the old generation becomes the previous
        one. The steps are the installer's own (its module docstring lists them).

        Returns ``False`` (and discards the staged files) when ``version`` with exactly these
        files is installed already, or on trial.

        Raises:
            LockBusy: another updater holds the lock for longer than ``lock_timeout_s``.
            InstallFailed: a step failed and was undone: the old generation is in place.
            RecoveryFailed: undoing failed too (both causes are named).
        """
        if not files:
            raise ValueError("install needs at least one staged file")
        with self._locked():
            self._recover_locked()
            state = self._load()
            txn = state.get("txn")
            if txn is not None and txn["kind"] == "trial":
                if txn["to_version"] == version:
                    self._discard(files)
                    return False
                raise InstallFailed(
                    f"cannot install {version}: {txn['to_version']} is still on trial; "
                    "confirm or roll it back first"
                )
            planned = self._plan(state, version, files, from_version)
            if planned is None:
                log.info("%s is already installed; nothing to do", version)
                self._discard(files)
                return False
            fields, modes = planned
            try:
                for f, mode in zip(files, modes, strict=True):
                    self._sys.chmod(f.staged, mode, step=f"chmod:{f.role.value}")
                state["txn"] = {
                    "kind": "install",
                    "phase": "prepared",
                    "from_version": from_version,
                    "to_version": version,
                    **fields,
                    "max_starts": confirm.max_starts,
                    "timeout_s": confirm.timeout_s,
                }
                self._save(state, step="journal:prepared")
                self._apply(state)
            except SelfUpgradeError:
                raise
            except OSError as exc:
                log.error("install of %s failed: %s; undoing", version, exc)
                try:
                    self._recover_locked(force_back=True)
                    self._discard(files)
                except Exception as undo_exc:
                    raise RecoveryFailed(
                        f"install of {version} failed ({exc}) and undoing it failed too "
                        f"({undo_exc}); inspect {self._state_path}"
                    ) from undo_exc
                raise InstallFailed(f"install of {version} failed and was undone: {exc}") from exc
            log.info("installed %s over %s; it is on trial", version, from_version)
            return True

    def _discard(self, files: Sequence[StagedFile]) -> None:
        for f in files:
            self._sys.unlink(f.staged, step=f"discard:{f.role.value}")

    # ---- the trial -----------------------------------------------------------------------

    def boot(self, *, now: float, claim: bool) -> BootReport:
        """Recover an interrupted transaction, then count this start of a version on trial.

        The guard calls this before the daemon starts with ``claim=False``: the start is
        counted and left for the daemon to claim. The updater calls it with ``claim=True``: if
        no guard counted this start, it counts it now. A start that makes the count exceed
        ``max_starts`` restores the previous generation.

        Raises:
            LockBusy, RecoveryFailed, HostNotReady.
        """
        messages: list[str] = []
        state = self._load()
        if state.get("txn") is None:
            # Nothing to recover or count: nothing must be written (the state directory may
            # be read-only or full); only what kills left behind is cleared, if it can be.
            try:
                with self._locked():
                    self._collect_garbage(self._load())
            except HostNotReady as exc:
                log.warning("could not clear leftover files: %s", exc)
            return BootReport(status=_status(state), recovered=None, rolled_back=False, messages=())
        with self._locked():
            recovered = self._recover_locked(messages=messages)
            state = self._load()
            txn = state.get("txn")
            rolled_back = False
            if txn is not None and txn["kind"] == "trial":
                if claim and not txn["claimed"]:
                    txn["claimed"] = True  # the guard counted this start already
                else:
                    txn["starts"] += 1
                    txn["claimed"] = claim
                    txn["deadline"] = now + float(txn["timeout_s"])
                    messages.append(
                        f"start {txn['starts']} of {txn['to_version']} on trial "
                        f"(at most {txn['max_starts']})"
                    )
                if txn["starts"] > txn["max_starts"]:
                    reason = (
                        f"{txn['to_version']} started {txn['starts'] - 1} time(s) without "
                        "confirming its health"
                    )
                    self._rollback_locked(state, reason, now=now)
                    messages.append(f"rolled back: {reason}")
                    rolled_back = True
                else:
                    self._save(state, step="journal:boot")
            self._collect_garbage(self._load())
            for m in messages:
                log.info("%s", m)
            return BootReport(
                status=_status(self._load()),
                recovered=recovered,
                rolled_back=rolled_back,
                messages=tuple(messages),
            )

    def confirm(self, *, now: float | None = None) -> None:
        """End the trial: the current generation is healthy. A no-op when nothing is on trial."""
        with self._locked():
            self._recover_locked()
            state = self._load()
            txn = state.get("txn")
            if txn is None or txn["kind"] != "trial":
                return
            state["txn"] = None
            state["last_result"] = ended(
                txn["to_version"], "confirmed", "", time.time() if now is None else now
            )
            self._save(state, step="journal:confirmed")
            log.info("%s confirmed healthy", txn["to_version"])

    def rollback(
        self, reason: str, *, now: float | None = None, if_on_trial: str | None = None
    ) -> str:
        """Restore the previous generation and return its version.

        Args:
            reason: recorded and reported in the next heartbeat.
            now: wall-clock time of the decision (default: now).
            if_on_trial: only roll back if this version is still on trial (checked under the
                lock, so a confirmation that won the race is respected); otherwise return the
                current version and change nothing.

        Raises:
            OperatorNeeded: there is no previous generation.
            LockBusy, RecoveryFailed.
        """
        with self._locked():
            self._recover_locked()
            state = self._load()
            if if_on_trial is not None:
                txn = state.get("txn") or {}
                if txn.get("kind") != "trial" or txn.get("to_version") != if_on_trial:
                    return str((state.get("current") or {}).get("version"))
            if not state.get("previous"):
                raise OperatorNeeded(
                    "nothing to roll back to: no previous generation is recorded in "
                    f"{self._state_path}"
                )
            return self._rollback_locked(state, reason, now=time.time() if now is None else now)

    def _recover_locked(
        self, *, force_back: bool = False, messages: list[str] | None = None
    ) -> Literal["forward", "back"] | None:
        """Finish or undo an interrupted install or rollback (the trial is not touched);
        ``force_back`` undoes an install even where it could be finished."""
        state = self._load()
        txn = state.get("txn")
        if txn is None or txn["kind"] == "trial":
            return None
        note = messages.append if messages is not None else (lambda _m: None)
        if txn["kind"] == "rollback":
            note(f"finishing an interrupted rollback to {txn['to_version']}")
            self._finish_rollback(state)
            return "back"
        if not force_back and self._roll_forward(state):
            note(f"finished the interrupted install of {txn['to_version']}")
            return "forward"
        also = self._undo_install(state, force_back=force_back)
        state["txn"] = None
        state["last_result"] = ended(
            txn["to_version"], "rolled_back", "the install was interrupted and undone", time.time()
        )
        self._save(state, step="journal:undone")
        self._collect_garbage(state, also)
        note(f"undid the interrupted install of {txn['to_version']}")
        return "back"

    def recover(self) -> Literal["forward", "back"] | None:
        """Finish or undo an interrupted transaction (``boot`` does this too).

        Raises:
            LockBusy, RecoveryFailed.
        """
        with self._locked():
            return self._recover_locked()

    # ---- plumbing ------------------------------------------------------------------------

    @staticmethod
    def _trial(txn: Mapping[str, Any], roles: Sequence[str]) -> dict[str, Any]:
        """The journal's record of a new generation on trial, from its install's record."""
        return {
            "kind": "trial",
            "roles": sorted(roles),
            "from_version": txn["from_version"],
            "to_version": txn["to_version"],
            "starts": 0,
            "claimed": True,
            "max_starts": txn["max_starts"],
            "timeout_s": txn["timeout_s"],
            "deadline": None,
        }

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the lock; the one place where the installer's ``OSError`` becomes an error of
        the tree (:func:`~selfupgrade.errors.disk_error`, naming the path and what to do)."""
        try:
            self._lock.acquire()
        except filelock.Timeout:
            raise LockBusy(
                f"another updater holds {self._lock.lock_file}; try again later"
            ) from None
        except OSError as exc:
            raise disk_error(exc, self._lock.lock_file, "taking the install lock") from exc
        try:
            yield
        except OSError as exc:
            raise disk_error(exc, None, "updating") from exc
        finally:
            with contextlib.suppress(OSError):
                self._lock.release()

    def _load(self) -> dict[str, Any]:
        data = read_journal(self._state_path)
        if data is None:
            return {
                "format": _FORMAT,
                "current": None,
                "previous": None,
                "txn": None,
                "last_result": None,
            }
        layout = (data.get("layout") or {}).get("kind", "triple")
        if layout != self.LAYOUT:
            raise OperatorNeeded(
                f"{self._state_path} is the journal of a {layout} installer, and this one is a "
                f"{self.LAYOUT} installer; give it a state directory of its own"
            )
        return data

    def _save(self, state: dict[str, Any], *, step: str) -> None:
        state["format"] = _FORMAT
        state["layout"] = {"kind": self.LAYOUT, **self._layout_fields()}
        try:
            self._sys.write_atomic(
                self._state_path, json.dumps(state, indent=1, sort_keys=True).encode(), step=step
            )
        except OSError as exc:
            raise disk_error(exc, self._state_path, "writing the install journal") from exc


def open_installer(state_dir: str | os.PathLike[str]) -> JournaledInstaller:
    """The installer whose journal is in ``state_dir``, as the journal names it: how the guard
    and the command line, given only the state directory, find the daemon's files. A
    :class:`~selfupgrade.TripleInstaller` when there is no journal yet.

    Raises:
        RecoveryFailed: the journal is unreadable or names an installer this version lacks.
    """
    path = Path(state_dir) / "state.json"
    layout = (read_journal(path) or {}).get("layout") or {}
    kind = layout.get("kind", "triple")
    cls = JournaledInstaller._BY_LAYOUT.get(kind)
    if cls is None:
        raise RecoveryFailed(
            f"{path} was written by a {kind!r} installer, which this selfupgrade does not "
            "have; run the selfupgrade that wrote it"
        )
    return cls._from_journal(Path(state_dir), layout)


def ended(version: str, outcome: str, reason: str, at: float) -> dict[str, Any]:
    """The journal's record of how a trial or transaction ended (read as a
    :class:`~selfupgrade.install.base.LastResult`)."""
    return {"version": version, "outcome": outcome, "reason": reason, "at": at}


def read_journal(path: Path) -> dict[str, Any] | None:
    """The journal at ``path``, or ``None`` if there is none.

    Raises:
        RecoveryFailed: it is not valid JSON or of an unknown format.
    """
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except ValueError as exc:
        raise RecoveryFailed(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != _FORMAT:
        raise RecoveryFailed(f"{path} has an unknown format")
    return data


def _status(state: Mapping[str, Any]) -> InstallerStatus:
    txn = state.get("txn")
    pending = None
    if txn is not None and txn.get("kind") == "trial":
        pending = Pending(
            version=txn["to_version"],
            from_version=txn["from_version"],
            starts=int(txn["starts"]),
            max_starts=int(txn["max_starts"]),
            deadline=txn.get("deadline"),
            roles=tuple(txn.get("roles", ())),
        )
    last = state.get("last_result")
    return InstallerStatus(
        current_version=(state.get("current") or {}).get("version"),
        previous_version=(state.get("previous") or {}).get("version"),
        pending=pending,
        last_result=LastResult(**last) if last else None,
    )
