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

The state file, the lock and the trial (each start counted, the rollback beyond
``max_starts``) are :class:`~selfupgrade.install._journal.JournaledInstaller`'s.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import InstallFailed, RecoveryFailed
from ._journal import JournaledInstaller, check_room, check_writable, ended, sha256_file
from .base import DEFAULT_MODES, StagedFile

__all__ = ["TripleInstaller"]

log = logging.getLogger("selfupgrade.install")

_OURS = re.compile(r"^\.(?P<name>.+)\.su-(?P<id>[0-9a-f]+)\.(?:new|bak|tmp)$")


class TripleInstaller(JournaledInstaller):
    """Installs a program/config/service-file triple atomically, with a previous generation.

    Args:
        state_dir: where ``state.json`` and the lock live (created if missing). Keep it on the
            host's disk, outside anything an upgrade replaces.
        system: the seam for file effects (tests pass a crashing one).
        lock_timeout_s: how long to wait for another updater before :class:`LockBusy`.
    """

    LAYOUT = "triple"

    # ---- preflight and staging -----------------------------------------------------------

    def preflight(self, needs: Sequence[tuple[Path, int | None]]) -> None:
        """Check each target's directory is writable and its filesystem has room.

        Raises:
            HostNotReady: a directory is missing or not writable.
            InsufficientSpace: a filesystem lacks room for the announced sizes plus 1 MiB.
        """
        by_device: dict[int, tuple[Path, int]] = {}
        for target, size in needs:
            check_writable(target.parent, target)
            dev = target.parent.stat().st_dev
            seen = by_device.get(dev, (target.parent, 0))
            by_device[dev] = (seen[0], seen[1] + (size or 0))
        for directory, needed in by_device.values():
            check_room(directory, needed)

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

    def _plan(
        self, state: dict[str, Any], version: str, files: Sequence[StagedFile], from_version: str
    ) -> tuple[dict[str, Any], list[int]] | None:
        current = state.get("current") or {}
        entries = [self._entry(f) for f in files]
        if current.get("version") == version and all(
            e["old_sha256"] == e["new_sha256"] for e in entries
        ):
            return None
        txn_id = secrets.token_hex(6)
        for e in entries:
            target = Path(e["path"])
            e["backup"] = str(target.parent / f".{target.name}.su-{txn_id}.bak")
        return {"id": txn_id, "files": entries}, [e["mode"] for e in entries]

    def _apply(self, state: dict[str, Any]) -> None:
        entries = state["txn"]["files"]
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
        state["txn"] = self._trial(txn, [e["role"] for e in txn["files"]])
        self._save(state, step="journal:swapped")
        self._collect_garbage(state)

    # ---- version on disk, rollback ------------------------------------------------------

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
        state["last_result"] = ended(txn["from_version"], "rolled_back", txn["reason"], txn["at"])
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

    def _roll_forward(self, state: dict[str, Any]) -> bool:
        entries = state["txn"]["files"]
        if state["txn"]["phase"] != "backed_up" or not self._can_finish(entries):
            return False
        for e in entries:
            target = Path(e["path"])
            if sha256_file(target) != e["new_sha256"]:
                self._sys.replace(Path(e["staged"]), target, step=f"swap:{e['role']}")
        self._finish_install(state)
        return True

    def _undo_install(self, state: dict[str, Any], *, force_back: bool) -> Sequence[Path]:
        txn = state["txn"]
        entries = txn["files"]
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
        return [Path(e["path"]) for e in entries]

    @staticmethod
    def _can_finish(entries: Sequence[Mapping[str, Any]]) -> bool:
        for e in entries:
            if sha256_file(Path(e["path"])) == e["new_sha256"]:
                continue
            if sha256_file(Path(e["staged"])) != e["new_sha256"]:
                return False
        return True

    # ---- plumbing ------------------------------------------------------------------------

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
