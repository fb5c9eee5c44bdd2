"""A crash-state checker for power loss: what a power cut could leave of an installer's work.

A SIGKILL keeps the page cache: every write the process made survives it. A power cut keeps
only what reached the disk. This module records, through the ``System`` seam's primitives,
every file operation an installer makes (:class:`TracingSystem`), replays them on a model of
the directory trees (:class:`Model`), and at each point of the run enumerates the states a
power cut could leave (:meth:`Model.crash_states`). ``tests/test_power_loss.py`` writes each
state to disk, runs the real guard on it and checks the result.

The model is POSIX's, which promises little (the checker assumes nothing stronger):

* a file's bytes reach the disk when the file is fsynced; before that, after a power cut the
  file may hold what its last fsync saw (nothing, for a file never synced), its last bytes,
  or a truncated part of them. Its mode is the same: the one of its last fsync, or the last;
* a directory's entries reach the disk when the directory is fsynced; before that, each name
  changed since may be found bound to any of the values it had since (the one of the last
  fsync included), each name independently of the others, and of other directories (a
  rename from one directory to another may leave the file under both names, or neither);
* a symbolic link's target is written with its entry (a link is never found half-written);
* a directory's own entries are its own: a directory whose entry survives holds what its
  own fsyncs and changes allow, whatever its parent's.

ext4 (``data=ordered``, the default) and XFS promise more: their metadata changes reach the
disk in the order they were made (a power cut leaves a prefix of them, so a rename never
leaves both names), and ext4 writes a renamed-over file's data before the rename. An
installer correct under this model is correct on them; the converse is not true.
"""

from __future__ import annotations

import itertools
import os
import shutil
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from selfupgrade._system import System


@dataclass
class Inode:
    """A file (``data`` bytes), a directory (``entries``) or a symbolic link (``target``)."""

    kind: str
    mode: int = 0o644
    data: bytes = b""
    target: str = ""
    entries: dict[str, int] = field(default_factory=dict)


@dataclass
class Model:
    """Directory trees under ``roots`` as the running process sees them (``inodes``) and
    what of them is on disk (``synced_*``; ``history``: the values each name changed since
    its directory's last fsync had, the synced one first)."""

    roots: dict[Path, int]
    inodes: dict[int, Inode]
    synced_data: dict[int, bytes] = field(default_factory=dict)
    synced_mode: dict[int, int] = field(default_factory=dict)
    history: dict[int, dict[str, list[int | None]]] = field(default_factory=dict)
    next_id: int = 0

    # ---- building ----------------------------------------------------------------------------

    @classmethod
    def of(cls, roots: list[Path]) -> Model:
        """The trees on disk now, every byte of them synced."""
        model = cls({}, {})
        for root in roots:
            model.roots[root] = model._read(root)
        return model

    def _read(self, path: Path) -> int:
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            node = Inode("link", target=os.readlink(path))
        elif stat.S_ISDIR(st.st_mode):
            node = Inode("dir", mode=stat.S_IMODE(st.st_mode))
            for child in sorted(os.listdir(path)):
                node.entries[child] = self._read(path / child)
        else:
            node = Inode("file", mode=stat.S_IMODE(st.st_mode), data=path.read_bytes())
        return self._add(node, synced=True)

    def _add(self, node: Inode, *, synced: bool) -> int:
        ident = self.next_id
        self.next_id += 1
        self.inodes[ident] = node
        if node.kind == "file":
            self.synced_data[ident] = node.data if synced else b""
        self.synced_mode[ident] = node.mode if synced else 0o600  # the mode files are made with
        return ident

    def copy(self) -> Model:
        return Model(
            dict(self.roots),
            {
                i: Inode(n.kind, n.mode, n.data, n.target, dict(n.entries))
                for i, n in self.inodes.items()
            },
            dict(self.synced_data),
            dict(self.synced_mode),
            {d: {k: list(v) for k, v in h.items()} for d, h in self.history.items()},
            self.next_id,
        )

    # ---- resolving paths ------------------------------------------------------------------

    def _root_of(self, path: Path) -> tuple[int, tuple[str, ...]]:
        for root, ident in self.roots.items():
            if path == root or root in path.parents:
                return ident, path.relative_to(root).parts
        raise ValueError(f"{path} is outside the traced trees {sorted(map(str, self.roots))}")

    def parent(self, path: Path) -> tuple[int, str]:
        """The directory inode holding ``path``'s entry, and the entry's name."""
        ident, parts = self._root_of(path.parent)
        for part in parts:
            ident = self._follow(self.inodes[ident].entries[part], path)
        return ident, path.name

    def _follow(self, ident: int, path: Path) -> int:
        node = self.inodes[ident]
        if node.kind == "link":  # the installers' paths name real directories, never a link
            raise ValueError(f"{path}: the model does not follow links in the middle of paths")
        return ident

    def lookup(self, path: Path) -> int | None:
        d, name = self.parent(path)
        return self.inodes[d].entries.get(name)

    # ---- the operations ---------------------------------------------------------------------

    def bind(self, d: int, name: str, value: int | None) -> None:
        entries = self.inodes[d].entries
        changes = self.history.setdefault(d, {})
        if name not in changes:
            changes[name] = [entries.get(name)]
        changes[name].append(value)
        if value is None:
            entries.pop(name, None)
        else:
            entries[name] = value

    def apply(self, op: tuple[object, ...]) -> None:
        """Carry out one recorded primitive on the model."""
        kind = op[0]
        if kind == "create":
            _, path, data, mode = op
            ident = self._add(Inode("file", mode=mode, data=data), synced=False)  # type: ignore[arg-type]
            self.bind(*self.parent(path), ident)  # type: ignore[arg-type]
        elif kind == "mkdir":
            ident = self._add(Inode("dir", mode=0o755), synced=True)  # made with its mode
            self.bind(*self.parent(op[1]), ident)  # type: ignore[arg-type]
        elif kind == "symlink":
            _, target, path = op
            ident = self._add(Inode("link", target=target), synced=True)  # type: ignore[arg-type]
            self.bind(*self.parent(path), ident)  # type: ignore[arg-type]
        elif kind == "link":
            _, src, dst = op
            self.bind(*self.parent(dst), self.lookup(src))  # type: ignore[arg-type]
        elif kind == "rename":
            _, src, dst = op
            ident = self.lookup(src)  # type: ignore[arg-type]
            self.bind(*self.parent(src), None)  # type: ignore[arg-type]
            self.bind(*self.parent(dst), ident)  # type: ignore[arg-type]
        elif kind == "unlink":
            self.bind(*self.parent(op[1]), None)  # type: ignore[arg-type]
        elif kind == "chmod":
            _, path, mode = op
            self.inodes[self.lookup(path)].mode = mode  # type: ignore[arg-type, index]
        elif kind == "fsync":
            ident = self.lookup(op[1])  # type: ignore[arg-type]
            assert ident is not None
            node = self.inodes[ident]
            if node.kind == "file":
                self.synced_data[ident] = node.data
            self.synced_mode[ident] = node.mode
        elif kind == "fsync_dir":
            d = self.lookup(op[1]) if op[1] not in self.roots else self.roots[op[1]]  # type: ignore[index, arg-type]
            assert d is not None
            self.history.pop(d, None)
            self.synced_mode[d] = self.inodes[d].mode
        else:
            raise ValueError(f"unknown operation {op!r}")

    # ---- what a power cut could leave -----------------------------------------------------

    def crash_states(self) -> Iterator[CrashState]:
        """Each state a power cut now could leave."""
        names = [(d, n, _unique(v)) for d, h in self.history.items() for n, v in h.items()]
        names = [(d, n, v) for d, n, v in names if len(v) > 1]
        files = [
            (i, _unique([self.synced_data[i], node.data, node.data[: len(node.data) // 2]]))
            for i, node in self.inodes.items()
            if node.kind == "file" and self.synced_data.get(i) != node.data
        ]
        modes = [
            (i, _unique([self.synced_mode[i], node.mode]))
            for i, node in self.inodes.items()
            if self.synced_mode.get(i, node.mode) != node.mode
        ]
        for bound in itertools.product(*(v for _, _, v in names)):
            entries = {i: dict(n.entries) for i, n in self.inodes.items() if n.kind == "dir"}
            for (d, name, _), value in zip(names, bound, strict=True):
                if value is None:
                    entries[d].pop(name, None)
                else:
                    entries[d][name] = value  # type: ignore[assignment]
            reachable = self._reachable(entries)
            live_files = [(i, v) for i, v in files if i in reachable]
            live_modes = [(i, v) for i, v in modes if i in reachable]
            for data in itertools.product(*(v for _, v in live_files)):
                for mode in itertools.product(*(v for _, v in live_modes)):
                    yield CrashState(
                        self,
                        entries,
                        {i: d for (i, _), d in zip(live_files, data, strict=True)},  # type: ignore[misc]
                        {i: m for (i, _), m in zip(live_modes, mode, strict=True)},  # type: ignore[misc]
                    )

    def _reachable(self, entries: dict[int, dict[str, int]]) -> set[int]:
        seen: set[int] = set()
        stack = list(self.roots.values())
        while stack:
            ident = stack.pop()
            if ident not in seen:
                seen.add(ident)
                stack.extend(entries.get(ident, {}).values())
        return seen


@dataclass(frozen=True)
class CrashState:
    """One state a power cut could leave: each directory's entries, and the bytes and mode
    of each file whose own differ from the running process's view."""

    model: Model
    entries: dict[int, dict[str, int]]
    data: dict[int, bytes]
    mode: dict[int, int]

    def write(self) -> None:
        """Make the roots on disk hold this state (what was there is removed first)."""
        for root, ident in self.model.roots.items():
            if os.path.lexists(root):
                shutil.rmtree(root)
            self._write(root, ident)

    def _write(self, path: Path, ident: int) -> None:
        node = self.model.inodes[ident]
        mode = self.mode.get(ident, node.mode)
        if node.kind == "link":
            os.symlink(node.target, path)
        elif node.kind == "file":
            path.write_bytes(self.data.get(ident, node.data))
            os.chmod(path, mode)
        else:
            path.mkdir()
            for name, child in self.entries.get(ident, {}).items():
                self._write(path / name, child)
            os.chmod(path, mode)


def _unique(values: list[object]) -> list[object]:
    out: list[object] = []
    for v in values:
        if v not in out:
            out.append(v)
    return out


class TracingSystem(System):
    """The real system, recording each primitive it carries out (``ops``), in order.

    Args:
        drop_fsync: the index (counting both kinds of fsync from 0) of one fsync to leave
            out, as if the code did not make it; ``None`` keeps them all.
    """

    def __init__(self, drop_fsync: int | None = None) -> None:
        self.ops: list[tuple[object, ...]] = []
        self.fsyncs = 0
        self.drop_fsync = drop_fsync

    def _sync(self, op: tuple[object, ...]) -> None:
        index = self.fsyncs
        self.fsyncs += 1
        if index != self.drop_fsync:
            self.ops.append(op)

    def _rename(self, src: Path, dst: Path) -> None:
        super()._rename(src, dst)
        self.ops.append(("rename", Path(src), Path(dst)))

    def _link(self, src: Path, dst: Path) -> None:
        super()._link(src, dst)
        self.ops.append(("link", Path(src), Path(dst)))

    def _mkdir(self, path: Path) -> None:
        super()._mkdir(path)
        self.ops.append(("mkdir", Path(path)))

    def _symlink(self, target: str, path: Path) -> None:
        super()._symlink(target, path)
        self.ops.append(("symlink", target, Path(path)))

    def _unlink(self, path: Path) -> None:
        super()._unlink(path)
        self.ops.append(("unlink", Path(path)))

    def _rmtree(self, path: Path) -> None:
        # recorded as what rmtree does: each entry unlinked, deepest first, then each directory
        for here, dirs, files in os.walk(path, topdown=False):
            for name in files + [d for d in dirs if os.path.islink(os.path.join(here, d))]:
                self.ops.append(("unlink", Path(here) / name))
            for name in dirs:
                if not os.path.islink(os.path.join(here, name)):
                    self.ops.append(("unlink", Path(here) / name))
        self.ops.append(("unlink", Path(path)))
        super()._rmtree(path)

    def _chmod(self, path: Path, mode: int) -> None:
        super()._chmod(path, mode)
        self.ops.append(("chmod", Path(path), mode))

    def _create(self, path: Path, data: bytes, mode: int) -> None:
        super()._create(path, data, mode)
        self.ops.append(("create", Path(path), bytes(data), mode))

    def _copy_file(self, src: Path, dst: Path) -> None:
        super()._copy_file(src, dst)
        self.ops.append(
            ("create", Path(dst), Path(dst).read_bytes(), stat.S_IMODE(os.stat(dst).st_mode))
        )

    def _fsync(self, path: Path) -> None:
        super()._fsync(path)
        self._sync(("fsync", Path(path)))

    def fsync_dir(self, path: Path) -> None:
        super().fsync_dir(path)
        self._sync(("fsync_dir", Path(path)))
