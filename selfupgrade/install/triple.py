"""The triple installer: program, config and service file swapped together, crash-safe.

How a swap is made safe
-----------------------

All state lives in one JSON file, ``<state_dir>/state.json``, rewritten atomically (temp file,
fsync, rename, directory fsync) at each step. An install goes through these steps, each a
named checkpoint of :class:`~selfupgrade._system.System`::

    chmod:<role>        the staged file gets its final mode (staged files are ours alone)
    journal:prepared    the state records the transaction: targets, staged files, backups,
                        the sha256 of every old and new file
    backup:<role>       a hard link (or a durable copy) of each old file, next to it
    journal:backed_up   all backups exist; from here on the swap may be finished
    swap:<role>         os.replace(staged, target) and a directory fsync, one file at a time
    journal:swapped     current = new, previous = old (with its backups), trial begins

Recovery, at the next :meth:`TripleInstaller.boot` (the guard runs it before the daemon starts):

* ``prepared``: no target was touched; staged files and new backups are deleted.
* ``backed_up``: finish the swap (each target is the new file already, or its staged file is
  still there and hashes right); if that is impossible, put every old file back.
* ``rollback`` in progress: restore again; restoring is idempotent.

Files are compared by sha256, so the outcome is byte for byte the old triple or the new one.
Backups and staged files are named ``.<name>.su-<id>.bak`` / ``.new`` beside their targets
(same filesystem, so renames are atomic and links are free); any such file that the state no
longer names is deleted after each transaction.

A :class:`filelock.FileLock` on ``<state_dir>/lock`` serialises threads and processes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import stat
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

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
from .base import (
    DEFAULT_MODES,
    BootReport,
    ConfirmPolicy,
    InstallerStatus,
    LastResult,
    Pending,
    StagedFile,
)

__all__ = ["TripleInstaller"]

log = logging.getLogger("selfupgrade.install")

_FORMAT = 1
_RESERVE_BYTES = 1 << 20
_OURS = re.compile(r"^\.(?P<name>.+)\.su-(?P<id>[0-9a-f]+)\.(?:new|bak|tmp)$")


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


class TripleInstaller:
    """Installs a program/config/service-file triple atomically, with a previous generation.

    Args:
        state_dir: where ``state.json`` and the lock live (created if missing). Keep it on the
            host's disk, outside anything an upgrade replaces.
        system: the seam for file effects (tests pass a crashing one).
        lock_timeout_s: how long to wait for another updater before :class:`LockBusy`.
    """

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

    # ---- reading -------------------------------------------------------------------------

    def status(self) -> InstallerStatus:
        """The current, previous and pending generations, read from ``state.json``."""
        return _status(self._load())

    # ---- preflight and staging -----------------------------------------------------------

    def preflight(self, needs: Sequence[tuple[Path, int | None]]) -> None:
        """Check each target's directory is writable and its filesystem has room.

        Raises:
            HostNotReady: a directory is missing or not writable.
            InsufficientSpace: a filesystem lacks room for the announced sizes plus 1 MiB.
        """
        by_device: dict[int, tuple[Path, int]] = {}
        for target, size in needs:
            directory = target.parent
            if not directory.is_dir():
                raise HostNotReady(
                    f"cannot install {target}: directory {directory} does not exist", path=directory
                )
            probe = temp_name(target)  # what a kill leaves here, the clean-up removes
            try:
                os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
                os.unlink(probe)
            except OSError as exc:
                raise HostNotReady(
                    f"cannot install {target}: directory {directory} is not writable "
                    f"({exc.strerror}); give the agent's user write access to it",
                    path=directory,
                ) from exc
            dev = directory.stat().st_dev
            seen = by_device.get(dev, (directory, 0))
            by_device[dev] = (seen[0], seen[1] + (size or 0))
        for directory, needed in by_device.values():
            free = shutil.disk_usage(directory).free
            if needed + _RESERVE_BYTES > free:
                raise InsufficientSpace(
                    f"not enough space in {directory}: the upgrade needs {needed} bytes "
                    f"(+1 MiB reserve) and {free} are free",
                    path=directory,
                    needed=needed,
                    free=free,
                )

    def staging_path(self, target: Path) -> Path:
        """A new, unused path beside ``target`` for its download.

        ``target`` is remembered as a managed file, so that a download orphaned by a crash
        (before the install journaled it) is deleted at the next :meth:`boot`.
        """
        with self._locked():
            state = self._load()
            managed = state.setdefault("managed", [])
            if str(target) not in managed:
                managed.append(str(target))
                self._save(state, step="journal:managed")
        return target.parent / f".{target.name}.su-{secrets.token_hex(6)}.new"

    # ---- install -------------------------------------------------------------------------

    def install(
        self,
        version: str,
        files: Sequence[StagedFile],
        *,
        from_version: str,
        confirm: ConfirmPolicy,
    ) -> bool:
        """Swap ``files`` in as ``version``; see the module docstring for the steps.

        Raises:
            LockBusy: another updater holds the lock for longer than ``lock_timeout_s``.
            InstallFailed: a step failed; the old files were put back.
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
            current = state.get("current") or {}
            entries = []
            for f in files:
                entries.append(self._entry(f))
            if current.get("version") == version and all(
                e["old_sha256"] == e["new_sha256"] for e in entries
            ):
                log.info("%s is already installed; nothing to do", version)
                self._discard(files)
                return False
            txn_id = secrets.token_hex(6)
            for e in entries:
                target = Path(e["path"])
                e["backup"] = str(target.parent / f".{target.name}.su-{txn_id}.bak")
            try:
                for f, e in zip(files, entries, strict=True):
                    self._sys.chmod(f.staged, e["mode"], step=f"chmod:{f.role.value}")
                state["txn"] = {
                    "kind": "install",
                    "id": txn_id,
                    "phase": "prepared",
                    "from_version": from_version,
                    "to_version": version,
                    "files": entries,
                    "max_starts": confirm.max_starts,
                    "timeout_s": confirm.timeout_s,
                }
                self._save(state, step="journal:prepared")
                for e in entries:
                    if e["old_sha256"] is not None:
                        self._sys.link_or_copy(
                            Path(e["path"]), Path(e["backup"]), step=f"backup:{e['role']}"
                        )
                state["txn"]["phase"] = "backed_up"
                self._save(state, step="journal:backed_up")
                for e in entries:
                    self._sys.replace(Path(e["staged"]), Path(e["path"]), step=f"swap:{e['role']}")
                self._finish_install(state)
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

    def _entry(self, f: StagedFile) -> dict[str, Any]:
        target = Path(f.target)
        try:
            old = target.lstat()
        except FileNotFoundError:
            old = None
        if old is not None and not stat.S_ISREG(old.st_mode):
            raise InstallFailed(f"{target} is not a regular file; refusing to replace it")
        mode = f.mode
        if mode is None:
            mode = stat.S_IMODE(old.st_mode) if old is not None else DEFAULT_MODES[f.role]
        return {
            "role": f.role.value,
            "path": str(target),
            "staged": str(f.staged),
            "old_sha256": sha256_file(target),
            "new_sha256": sha256_file(f.staged),
            "mode": mode,
        }

    def _finish_install(self, state: dict[str, Any]) -> None:
        txn = state["txn"]
        current = state.get("current") or {}
        previous_files = {
            e["role"]: {
                "path": e["path"],
                "sha256": e["old_sha256"],
                "backup": e["backup"] if e["old_sha256"] is not None else None,
            }
            for e in txn["files"]
        }
        current_files = dict(current.get("files") or {})
        for e in txn["files"]:
            current_files[e["role"]] = {"path": e["path"], "sha256": e["new_sha256"]}
        state["previous"] = {"version": txn["from_version"], "files": previous_files}
        state["current"] = {"version": txn["to_version"], "files": current_files}
        state["txn"] = {
            "kind": "trial",
            "roles": sorted(e["role"] for e in txn["files"]),
            "from_version": txn["from_version"],
            "to_version": txn["to_version"],
            "starts": 0,
            "claimed": True,
            "max_starts": txn["max_starts"],
            "timeout_s": txn["timeout_s"],
            "deadline": None,
        }
        self._save(state, step="journal:swapped")
        self._collect_garbage(state)

    # ---- boot, confirm, rollback ---------------------------------------------------------

    def boot(self, *, now: float, claim: bool) -> BootReport:
        """Recover an interrupted transaction, then count this start of a version on trial.

        The guard calls this before the daemon starts with ``claim=False``: the start is
        counted and left for the daemon to claim. The updater calls it with ``claim=True``: if
        no guard counted this start, it counts it now. A start that makes the count exceed
        ``max_starts`` restores the previous generation.

        Raises:
            LockBusy, RecoveryFailed.
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

    def version_on_disk(self) -> str | None:
        """The version whose every file the journal records is on disk byte for byte: its
        current or previous generation, or either side of an interrupted transaction
        (``None``: none is whole, or there is no journal). Reads only; for a guard that
        cannot write and must still start a complete version.

        Raises:
            RecoveryFailed: the journal is unreadable.
        """
        state = self._load()
        candidates: list[tuple[str, dict[str, str | None]]] = []
        for gen in ("current", "previous"):
            spec = state.get(gen) or {}
            files = spec.get("files") or {}
            if files:
                candidates.append(
                    (str(spec.get("version")), {f["path"]: f["sha256"] for f in files.values()})
                )
        txn = state.get("txn") or {}
        if txn.get("kind") == "install":
            for side, key in (("from_version", "old_sha256"), ("to_version", "new_sha256")):
                candidates.append(
                    (str(txn[side]), {e["path"]: e[key] for e in txn.get("files") or []})
                )
        for version, files in candidates:
            if files and all(sha256_file(Path(p)) == sha for p, sha in files.items()):
                return version
        return None

    def confirm(self, *, now: float | None = None) -> None:
        """End the trial: the current generation is healthy. A no-op when nothing is on trial."""
        with self._locked():
            self._recover_locked()
            state = self._load()
            txn = state.get("txn")
            if txn is None or txn["kind"] != "trial":
                return
            state["txn"] = None
            state["last_result"] = {
                "version": txn["to_version"],
                "outcome": "confirmed",
                "reason": "",
                "at": time.time() if now is None else now,
            }
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

    def _rollback_locked(self, state: dict[str, Any], reason: str, *, now: float) -> str:
        previous = state["previous"]
        current = state.get("current") or {}
        files = [{"role": role, **spec} for role, spec in previous["files"].items()]
        state["txn"] = {
            "kind": "rollback",
            "from_version": current.get("version"),
            "to_version": previous["version"],
            "files": files,
            "reason": reason,
            "at": now,
        }
        self._save(state, step="journal:rollback")
        self._finish_rollback(state)
        log.warning("rolled back to %s: %s", previous["version"], reason)
        return str(previous["version"])

    def _finish_rollback(self, state: dict[str, Any]) -> None:
        txn = state["txn"]
        for f in txn["files"]:
            self._restore(f)
        current_files = dict((state.get("current") or {}).get("files") or {})
        for f in txn["files"]:
            current_files[f["role"]] = {"path": f["path"], "sha256": f["sha256"]}
        state["current"] = {"version": txn["to_version"], "files": current_files}
        state["previous"] = None
        state["txn"] = None
        state["last_result"] = {
            "version": txn["from_version"],
            "outcome": "rolled_back",
            "reason": txn["reason"],
            "at": txn["at"],
        }
        self._save(state, step="journal:rolled_back")
        self._collect_garbage(state, also=[Path(f["path"]) for f in txn["files"]])

    def _restore(self, f: Mapping[str, Any]) -> None:
        target = Path(f["path"])
        if sha256_file(target) == f["sha256"]:
            return
        if f["sha256"] is None:
            self._sys.unlink(target, step=f"restore:{f['role']}")
            return
        backup = Path(f["backup"])
        if sha256_file(backup) != f["sha256"]:
            raise RecoveryFailed(
                f"cannot restore {target}: its backup {backup} is missing or altered"
            )
        tmp = target.parent / f".{target.name}.su-{secrets.token_hex(6)}.tmp"
        self._sys.link_or_copy(backup, tmp, step=f"restore-link:{f['role']}")
        self._sys.replace(tmp, target, step=f"restore:{f['role']}")

    # ---- recovery ------------------------------------------------------------------------

    def recover(self) -> Literal["forward", "back"] | None:
        """Finish or undo an interrupted transaction (``boot`` does this too).

        Raises:
            LockBusy, RecoveryFailed.
        """
        with self._locked():
            return self._recover_locked()

    def _recover_locked(
        self, *, force_back: bool = False, messages: list[str] | None = None
    ) -> Literal["forward", "back"] | None:
        state = self._load()
        txn = state.get("txn")
        if txn is None or txn["kind"] == "trial":
            return None
        note = messages.append if messages is not None else (lambda _m: None)
        if txn["kind"] == "rollback":
            note(f"finishing an interrupted rollback to {txn['to_version']}")
            self._finish_rollback(state)
            return "back"
        entries = txn["files"]
        if txn["phase"] == "backed_up" and not force_back and self._can_finish(entries):
            for e in entries:
                target = Path(e["path"])
                if sha256_file(target) != e["new_sha256"]:
                    self._sys.replace(Path(e["staged"]), target, step=f"swap:{e['role']}")
            note(f"finished the interrupted install of {txn['to_version']}")
            self._finish_install(state)
            return "forward"
        if txn["phase"] == "backed_up" or force_back:
            for e in entries:
                self._restore(
                    {
                        "role": e["role"],
                        "path": e["path"],
                        "sha256": e["old_sha256"],
                        "backup": e.get("backup"),
                    }
                )
        for e in entries:
            self._sys.unlink(Path(e["staged"]), step=f"discard:{e['role']}")
        state["txn"] = None
        state["last_result"] = {
            "version": txn["to_version"],
            "outcome": "rolled_back",
            "reason": "the install was interrupted and undone",
            "at": time.time(),
        }
        self._save(state, step="journal:undone")
        self._collect_garbage(state, also=[Path(e["path"]) for e in entries])
        note(f"undid the interrupted install of {txn['to_version']}")
        return "back"

    @staticmethod
    def _can_finish(entries: Sequence[Mapping[str, Any]]) -> bool:
        for e in entries:
            if sha256_file(Path(e["path"])) == e["new_sha256"]:
                continue
            if sha256_file(Path(e["staged"])) != e["new_sha256"]:
                return False
        return True

    # ---- plumbing ------------------------------------------------------------------------

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
        try:
            data = json.loads(self._state_path.read_bytes())
        except FileNotFoundError:
            return {
                "format": _FORMAT,
                "current": None,
                "previous": None,
                "txn": None,
                "last_result": None,
            }
        except ValueError as exc:
            raise RecoveryFailed(f"{self._state_path} is not valid JSON: {exc}") from exc
        if not isinstance(data, dict) or data.get("format") != _FORMAT:
            raise RecoveryFailed(f"{self._state_path} has an unknown format")
        return data

    def _save(self, state: dict[str, Any], *, step: str) -> None:
        state["format"] = _FORMAT
        try:
            self._sys.write_atomic(
                self._state_path, json.dumps(state, indent=1, sort_keys=True).encode(), step=step
            )
        except OSError as exc:
            raise disk_error(exc, self._state_path, "writing the install journal") from exc

    def _discard(self, files: Sequence[StagedFile]) -> None:
        for f in files:
            self._sys.unlink(f.staged, step=f"discard:{f.role.value}")

    def _collect_garbage(self, state: Mapping[str, Any], also: Sequence[Path] = ()) -> None:
        """Delete our backup/staged/temporary files that ``state`` no longer names."""
        keep: set[str] = set()
        targets: set[Path] = set(also) | {Path(p) for p in state.get("managed") or []}
        for gen in ("current", "previous"):
            for spec in ((state.get(gen) or {}).get("files") or {}).values():
                targets.add(Path(spec["path"]))
                if spec.get("backup"):
                    keep.add(spec["backup"])
        for e in (state.get("txn") or {}).get("files") or []:
            targets.add(Path(e["path"]))
            keep.update(x for x in (e.get("staged"), e.get("backup")) if x)
        targets.add(self._state_path)  # the journal's own temporary files
        names = {t.name for t in targets}
        for directory in {t.parent for t in targets}:
            with contextlib.suppress(OSError), os.scandir(directory) as it:
                for entry in it:
                    m = _OURS.match(entry.name)
                    if m and m.group("name") in names and entry.path not in keep:
                        self._sys.unlink(Path(entry.path), step="gc")


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
