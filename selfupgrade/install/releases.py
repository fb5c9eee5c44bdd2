"""Release directories: each version in a directory of its own, a ``current`` link flipped.

The layout, under a root such as ``/opt/agent``::

    releases/1.0/            every file of release 1.0 (agent, agent.json, ...)
    releases/1.1/
    current -> releases/1.1  what the service runs: /opt/agent/current/agent

A new version is built beside the running one, from the files the order brings and copies of
the rest of the current release, and goes live when ``current`` is pointed at it by one
rename. The most recent ``keep`` release directories stay on disk (never the current one,
never the one a rollback would restore), so that a rollback, or an operator's look at what ran
last week, needs no download.

How a swap is made safe
-----------------------

The journal (``<state_dir>/state.json``, as for :class:`~selfupgrade.TripleInstaller`) records
each step before its effect, each a named checkpoint of :class:`~selfupgrade._system.System`::

    chmod:<role>        the staged file gets its final mode
    journal:prepared    the transaction: the new directory's name, every file it will hold
                        and its sha256
    mkdir:release       the new directory (and mkdir:<dir> for each subdirectory)
    carry:<path>        a durable copy of each file the order does not replace
    place:<role>        os.replace(staged, new directory / path)
    journal:built       the new directory is complete
    flip                ``current`` points at the new directory (a new link renamed over it)
    journal:swapped     current = new, previous = old, trial begins
    journal:pruned      directories beyond ``keep`` are marked for deletion, then drop:<dir>

Recovery, at the next :meth:`ReleaseInstaller.boot` (the guard runs it before the daemon
starts): ``prepared`` deletes the half-built directory and the staged files (``current`` was
never touched); ``built`` checks every file of the new directory against the journal and flips
(or, if one is wrong, undoes); a rollback is flipped again. Flipping is idempotent, so a kill
during recovery is recovered the same way. Only ``current`` decides what the daemon runs, and
it always names a complete directory: byte for byte the old release or the new one.

Staged downloads live in ``releases/`` as ``.<name>.su-<id>.new`` (the same file system, so
placing them is a rename); temporary names are ``.<name>.su-<id>.tmp``; the clean-up after each
transaction and at each boot removes any that the journal does not name, and finishes deleting
the directories it marked.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import stat
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from .._system import System
from ..errors import HostNotReady, InstallFailed, RecoveryFailed
from ._journal import JournaledInstaller, check_room, check_writable, ended, sha256_file
from .base import DEFAULT_MODES, StagedFile

__all__ = ["ReleaseInstaller"]

log = logging.getLogger("selfupgrade.install")

_OURS = re.compile(r"^\..+\.su-[0-9a-f]+\.(?:new|tmp)$")
_DIR_NAME = re.compile(r"^[0-9A-Za-z][0-9A-Za-z.+_!~-]*$")

Files = dict[str, str]
"""A release directory's content: each path in it (POSIX, relative) and its sha256, or
``"link:<target>"`` for a symbolic link."""


class ReleaseInstaller(JournaledInstaller):
    """Installs each version into ``<root>/releases/<version>/`` and flips ``<root>/current``.

    The daemon's files are configured under ``<root>/current`` (``Layout(root / "current",
    ...)``), and its service runs ``<root>/current/<program>``. Before the first upgrade,
    ``<root>/current`` must be a symbolic link to a directory in ``<root>/releases``: that
    release is adopted as the current one.

    Args:
        root: the directory that holds ``releases/`` and ``current``.
        state_dir: where the journal and the lock live (default ``<root>/.selfupgrade``); never
            inside ``releases/``.
        keep: release directories kept, the current one and the one a rollback restores
            included (at least 2).
        system: the seam for file effects (tests pass a crashing one).
        lock_timeout_s: how long to wait for another updater before :class:`LockBusy`.

    Raises:
        ValueError: ``keep`` is below 2, or ``state_dir`` is inside ``releases/``.
    """

    LAYOUT = "releases"

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        state_dir: str | os.PathLike[str] | None = None,
        keep: int = 3,
        system: System | None = None,
        lock_timeout_s: float = 30.0,
    ) -> None:
        if keep < 2:
            raise ValueError(
                f"keep={keep}: at least 2 release directories must be kept (the current one "
                "and the one a rollback restores)"
            )
        self.root = Path(os.path.abspath(root))
        self.releases_dir = self.root / "releases"
        self.current_link = self.root / "current"
        self.keep = keep
        state = Path(state_dir) if state_dir is not None else self.root / ".selfupgrade"
        state = Path(os.path.abspath(state))
        if state == self.releases_dir or self.releases_dir in state.parents:
            raise ValueError(f"state_dir {state} is inside {self.releases_dir}; keep it outside")
        super().__init__(state, system=system, lock_timeout_s=lock_timeout_s)

    def _layout_fields(self) -> dict[str, Any]:
        return {"root": str(self.root), "keep": self.keep}

    @classmethod
    def _from_journal(cls, state_dir: Path, fields: Mapping[str, Any]) -> ReleaseInstaller:
        return cls(fields["root"], state_dir=state_dir, keep=int(fields.get("keep", 3)))

    # ---- where things are ----------------------------------------------------------------

    def current_dir(self) -> str:
        """The name of the release directory ``current`` points at.

        Raises:
            HostNotReady: ``current`` is missing, not a link, or points outside ``releases/``.
        """
        advice = (
            f"{self.current_link} must be a symbolic link to a directory in {self.releases_dir} "
            f"(for example: mkdir -p {self.releases_dir}/1.0, put release 1.0's files there, "
            f"ln -s releases/1.0 {self.current_link})"
        )
        try:
            target = os.readlink(self.current_link)
        except FileNotFoundError:
            raise HostNotReady(
                f"{self.current_link} does not exist; {advice}", path=self.current_link
            ) from None
        except OSError as exc:
            raise HostNotReady(
                f"{self.current_link} is not a link ({exc.strerror}); {advice}",
                path=self.current_link,
            ) from exc
        path = PurePosixPath(target)
        if path.is_absolute():
            path = PurePosixPath(os.path.relpath(target, self.root))
        if len(path.parts) != 2 or path.parts[0] != "releases" or not _DIR_NAME.match(path.name):
            raise HostNotReady(
                f"{self.current_link} points to {target}; {advice}", path=self.current_link
            )
        if not (self.releases_dir / path.name).is_dir():
            raise HostNotReady(
                f"{self.current_link} points to {target}, which is missing",
                path=self.current_link,
            )
        return path.name

    def _relative(self, target: Path) -> str:
        """``target``'s path inside a release directory (``current/x`` or ``releases/v/x``).

        Raises:
            HostNotReady: ``target`` is not inside a release directory.
        """
        real = Path(os.path.realpath(target.parent)) / target.name
        releases = Path(os.path.realpath(self.releases_dir))
        try:
            parts = real.relative_to(releases).parts
        except ValueError:
            parts = ()
        if len(parts) < 2:
            raise HostNotReady(
                f"cannot install {target}: a ReleaseInstaller installs only files inside "
                f"{self.current_link}; configure the daemon's paths there",
                path=target,
            )
        return str(PurePosixPath(*parts[1:]))

    # ---- preflight and staging -----------------------------------------------------------

    def preflight(self, needs: Sequence[tuple[Path, int | None]]) -> None:
        """Check that ``releases/`` is writable and has room for the new files and for copies
        of the current release's other files.

        Raises:
            HostNotReady: ``current`` is not a link into ``releases/``, a target is outside
                it, or ``releases/`` is not writable.
            InsufficientSpace: ``releases/`` lacks room for the new release plus 1 MiB.
        """
        current = self.releases_dir / self.current_dir()
        replaced = {self._relative(target) for target, _ in needs}
        needed = sum(size or 0 for _, size in needs)
        for rel, info in _walk(current):
            if rel not in replaced and stat.S_ISREG(info.st_mode):
                needed += info.st_size
        check_writable(self.releases_dir, self.releases_dir / "release")
        check_room(self.releases_dir, needed)

    def staging_path(self, target: Path) -> Path:
        """A new, unused path in ``releases/`` for ``target``'s download.

        The journal is written if it does not exist yet, so that the guard knows this layout
        (and removes a download orphaned by a crash) before the first install.
        """
        name = PurePosixPath(self._relative(target)).name
        with self._locked():
            if not self._state_path.exists():
                self._save(self._load(), step="journal:managed")
        return self.releases_dir / f".{name}.su-{secrets.token_hex(6)}.new"

    # ---- install -------------------------------------------------------------------------

    def _plan(
        self, state: dict[str, Any], version: str, files: Sequence[StagedFile], from_version: str
    ) -> tuple[dict[str, Any], list[int]] | None:
        """The new directory is named ``<version>``, or ``<version>~<id>`` when that name is
        taken (by an older copy of the same version that is still kept)."""
        if not _DIR_NAME.match(version):
            raise InstallFailed(f"version {version!r} cannot name a release directory")
        from_dir = self.current_dir()
        current = state.get("current") or {}
        if current.get("dir") != from_dir:
            # The first install, or an operator pointed ``current`` elsewhere: adopt it.
            current = {
                "version": from_version,
                "dir": from_dir,
                "files": _scan(self.releases_dir / from_dir),
            }
            state["current"] = current
        old_files: Files = dict(current["files"])
        entries = [self._entry(f, self.releases_dir / from_dir, old_files) for f in files]
        new_files = {**old_files, **{e["rel"]: e["sha256"] for e in entries}}
        if current.get("version") == version and new_files == old_files:
            return None
        txn_id = secrets.token_hex(6)
        taken = {from_dir, *state.get("kept", []), *state.get("dropping", [])}
        name = version
        if name in taken or os.path.lexists(self.releases_dir / name):
            name = f"{version}~{txn_id}"
        fields = {
            "id": txn_id,
            "from_dir": from_dir,
            "dir": name,
            "entries": entries,
            "files": new_files,
        }
        return fields, [e["mode"] for e in entries]

    def _apply(self, state: dict[str, Any]) -> None:
        self._build(state["txn"])
        state["txn"]["phase"] = "built"
        self._save(state, step="journal:built")
        self._sys.point_link(self.current_link, f"releases/{state['txn']['dir']}", step="flip")
        log.info("%s now points to releases/%s", self.current_link, state["txn"]["dir"])
        self._finish_install(state)

    def _entry(self, f: StagedFile, old_dir: Path, old_files: Files) -> dict[str, Any]:
        rel = self._relative(Path(f.target))
        mode = f.mode
        if mode is None and rel in old_files:
            with contextlib.suppress(FileNotFoundError):
                mode = stat.S_IMODE((old_dir / rel).stat().st_mode)
        if mode is None:
            mode = DEFAULT_MODES[f.role]
        return {
            "role": f.role.value,
            "rel": rel,
            "staged": str(f.staged),
            "sha256": sha256_file(Path(f.staged)),
            "mode": mode,
        }

    def _build(self, txn: Mapping[str, Any]) -> None:
        """Make the new release directory: copies of the files the order keeps, then the
        staged files renamed in."""
        new = self.releases_dir / txn["dir"]
        old = self.releases_dir / txn["from_dir"]
        self._sys.make_dir(new, step="mkdir:release")
        placed = {e["rel"]: e for e in txn["entries"]}
        for rel in sorted(txn["files"]):
            for parent in reversed(PurePosixPath(rel).parents[:-1]):
                if not (new / parent).is_dir():
                    self._sys.make_dir(new / parent, step=f"mkdir:{parent}")
            spec = txn["files"][rel]
            if rel in placed:
                e = placed[rel]
                self._sys.replace(Path(e["staged"]), new / rel, step=f"place:{e['role']}")
            elif spec.startswith("link:"):
                self._sys.symlink(spec[len("link:") :], new / rel, step=f"carry:{rel}")
            else:
                self._sys.copy(old / rel, new / rel, step=f"carry:{rel}")

    def _finish_install(self, state: dict[str, Any]) -> None:
        txn = state["txn"]
        state["previous"] = state["current"]
        state["current"] = {"version": txn["to_version"], "dir": txn["dir"], "files": txn["files"]}
        kept = [d for d in state.get("kept", []) if d not in (txn["from_dir"], txn["dir"])]
        state["kept"] = [*kept, txn["from_dir"], txn["dir"]]
        state["txn"] = self._trial(txn, [e["role"] for e in txn["entries"]])
        self._save(state, step="journal:swapped")
        self._prune(state)

    def _prune(self, state: dict[str, Any]) -> None:
        """Mark the oldest kept directories beyond ``keep`` for deletion (never the current
        one or the previous one), then delete every marked one."""
        protected = {(state.get(g) or {}).get("dir") for g in ("current", "previous")}
        kept = list(state.get("kept", []))
        dropping = [
            d
            for d in state.get("dropping", [])
            if d not in protected and os.path.lexists(self.releases_dir / d)
        ]
        while len(kept) > self.keep:
            victim = next((d for d in kept if d not in protected), None)
            if victim is None:
                break
            kept.remove(victim)
            dropping.append(victim)
        if dropping != state.get("dropping", []) or kept != state.get("kept", []):
            state["kept"], state["dropping"] = kept, dropping
            self._save(state, step="journal:pruned")
        self._collect_garbage(state)

    # ---- version on disk, rollback -------------------------------------------------------

    def version_on_disk(self) -> str | None:
        """The version of the directory ``current`` names, if its files are byte for byte as
        the journal records them for that directory (current, previous or either side of an
        interrupted transaction); ``None`` otherwise.

        Raises:
            RecoveryFailed: the journal is unreadable.
        """
        state = self._load()
        try:
            live = self.current_dir()
        except HostNotReady:
            return None
        candidates: list[tuple[str, str, Files]] = []
        for gen in ("current", "previous"):
            spec = state.get(gen) or {}
            if spec.get("dir"):
                candidates.append((str(spec["version"]), spec["dir"], spec["files"]))
        txn = state.get("txn") or {}
        if txn.get("kind") == "install":
            candidates.append((str(txn["to_version"]), txn["dir"], txn["files"]))
        for version, directory, files in candidates:
            if directory == live and _scan(self.releases_dir / live) == files:
                return version
        return None

    def _rollback_locked(self, state: dict[str, Any], reason: str, *, now: float) -> str:
        previous = state["previous"]
        current = state.get("current") or {}
        if _scan(self.releases_dir / previous["dir"]) != previous["files"]:
            raise RecoveryFailed(
                f"cannot roll back to {previous['version']}: {self.releases_dir / previous['dir']}"
                " is missing or altered"
            )
        state["txn"] = {
            "kind": "rollback",
            "from_version": current.get("version"),
            "from_dir": current.get("dir"),
            "to_version": previous["version"],
            "reason": reason,
            "at": now,
        }
        self._save(state, step="journal:rollback")
        self._finish_rollback(state)
        log.warning("rolled back to %s: %s", previous["version"], reason)
        return str(previous["version"])

    def _finish_rollback(self, state: dict[str, Any]) -> None:
        txn = state["txn"]
        previous = state["previous"]
        if self._points_at() != previous["dir"]:
            self._sys.point_link(self.current_link, f"releases/{previous['dir']}", step="flip")
        failed = txn.get("from_dir")
        state["current"] = previous
        state["previous"] = None
        state["kept"] = [d for d in state.get("kept", []) if d != failed]
        dropping = [d for d in state.get("dropping", []) if os.path.lexists(self.releases_dir / d)]
        if failed and failed != previous["dir"] and failed not in dropping:
            dropping.append(failed)
        state["dropping"] = dropping
        state["txn"] = None
        state["last_result"] = ended(txn["from_version"], "rolled_back", txn["reason"], txn["at"])
        self._save(state, step="journal:rolled_back")
        self._collect_garbage(state)

    # ---- recovery ------------------------------------------------------------------------

    def _roll_forward(self, state: dict[str, Any]) -> bool:
        txn = state["txn"]
        if txn["phase"] != "built" or _scan(self.releases_dir / txn["dir"]) != txn["files"]:
            return False
        if self._points_at() != txn["dir"]:
            self._sys.point_link(self.current_link, f"releases/{txn['dir']}", step="flip")
        self._finish_install(state)
        return True

    def _undo_install(self, state: dict[str, Any], *, force_back: bool) -> Sequence[Path]:
        txn = state["txn"]
        if self._points_at() != txn["from_dir"]:
            self._sys.point_link(self.current_link, f"releases/{txn['from_dir']}", step="unflip")
        self._sys.remove_tree(self.releases_dir / txn["dir"], step="discard:release")
        for e in txn["entries"]:
            self._sys.unlink(Path(e["staged"]), step=f"discard:{e['role']}")
        return ()

    # ---- plumbing ------------------------------------------------------------------------

    def _points_at(self) -> str | None:
        try:
            return self.current_dir()
        except HostNotReady:
            return None

    def _collect_garbage(self, state: Mapping[str, Any], also: Sequence[Path] = ()) -> None:
        """Finish deleting the directories marked for it, and delete the staged and temporary
        files in ``releases/`` and the root that the journal no longer names (``also`` adds
        nothing here: every such file lives in those two directories)."""
        live = {(state.get(g) or {}).get("dir") for g in ("current", "previous")}
        for directory in state.get("dropping", []):
            gone = not os.path.lexists(self.releases_dir / directory)
            if not gone and directory not in live and _DIR_NAME.match(directory):
                self._sys.remove_tree(self.releases_dir / directory, step=f"drop:{directory}")
        txn = state.get("txn") or {}
        keep = {e["staged"] for e in txn.get("entries") or []}
        for parent in (self.releases_dir, self.root):
            with contextlib.suppress(OSError), os.scandir(parent) as it:
                for entry in it:
                    if _OURS.match(entry.name) and entry.path not in keep:
                        self._sys.unlink(Path(entry.path), step="gc")


def _walk(directory: Path) -> Iterator[tuple[str, os.stat_result]]:
    """Every entry under ``directory`` but the directories: its relative POSIX path and its
    ``lstat``; nothing if the directory is missing.

    Raises:
        HostNotReady: it holds something that is neither a file, a directory nor a link.
    """
    if not directory.is_dir():
        return
    for here, dirs, names in os.walk(directory):
        for name in [*dirs, *names]:
            path = Path(here) / name
            info = path.lstat()
            if stat.S_ISDIR(info.st_mode):
                continue
            if not (stat.S_ISLNK(info.st_mode) or stat.S_ISREG(info.st_mode)):
                raise HostNotReady(f"{path} is not a file, a directory or a link", path=path)
            yield str(PurePosixPath(*path.relative_to(directory).parts)), info


def _scan(directory: Path) -> Files:
    """What :data:`Files` says of ``directory``: each file's sha256, each link's target."""
    out: Files = {}
    for rel, info in _walk(directory):
        path = directory / rel
        if stat.S_ISLNK(info.st_mode):
            out[rel] = f"link:{os.readlink(path)}"
        else:
            out[rel] = sha256_file(path) or ""
    return out
