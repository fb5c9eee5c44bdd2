"""The one seam through which selfupgrade touches files, processes and systemd.

Every side effect that matters for crash safety (replace, link, fsync, unlink, the atomic write
of the journal) and every process effect (kill, exec, notify) is a method of :class:`System`.
Each file effect names the *step* it belongs to and calls :meth:`System.checkpoint` first, so a
test can stop the process at any named step (``selfupgrade.testing.CrashingSystem`` SIGKILLs
itself there) and then check what the next start makes of the half-done work.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

__all__ = ["System"]


def temp_name(path: Path) -> Path:
    """A new temporary name beside ``path``: ``.<name>.su-<hex>.tmp``, the pattern the
    installer's clean-up removes when nothing names it."""
    return path.parent / f".{path.name}.su-{secrets.token_hex(6)}.tmp"


class System:
    """Real file, process and notification effects. Subclass to observe or break them.

    The public methods are the durable effects the installers need, each written once here
    from the primitives below it (``_rename``, ``_link``, ``_mkdir``, ``_symlink``,
    ``_unlink``, ``_rmtree``, ``_chmod``, ``_create``, ``_copy_file``, ``_fsync`` and
    :meth:`fsync_dir`): one system call each, and nothing durable on their own. A subclass
    that observes the primitives sees every write, rename and sync in the order made
    (``tests/power_loss.py`` builds the states a power cut could leave from them).
    """

    def checkpoint(self, step: str) -> None:
        """Called before the effect of ``step``; the real system does nothing here."""

    def replace(self, src: Path, dst: Path, *, step: str) -> None:
        """``os.replace`` then fsync the destination's directory, so the rename is durable."""
        self.checkpoint(step)
        self._rename(src, dst)
        self.fsync_dir(dst.parent)

    def link_or_copy(self, src: Path, dst: Path, *, step: str) -> None:
        """Make ``dst`` a second name of ``src`` (a hard link), or a durable copy if links fail.

        ``dst`` must not exist. The directory is fsynced.
        """
        self.checkpoint(step)
        try:
            self._link(src, dst)
        except OSError:
            # Filesystems without hard links (some FUSE and network mounts): copy instead.
            self._durable_copy(src, dst)
        self.fsync_dir(dst.parent)

    def copy(self, src: Path, dst: Path, *, step: str) -> None:
        """Copy ``src`` (bytes and mode) to the new file ``dst``, fsync it and its directory."""
        self.checkpoint(step)
        self._durable_copy(src, dst)
        self.fsync_dir(dst.parent)

    def make_dir(self, path: Path, *, step: str) -> None:
        """Create the directory ``path`` (it must not exist), then fsync its parent."""
        self.checkpoint(step)
        self._mkdir(path)
        self.fsync_dir(path.parent)

    def symlink(self, target: str, path: Path, *, step: str) -> None:
        """Create the symbolic link ``path`` to ``target`` (as written), then fsync its
        directory."""
        self.checkpoint(step)
        self._symlink(target, path)
        self.fsync_dir(path.parent)

    def point_link(self, link: Path, target: str, *, step: str) -> None:
        """Make the symbolic link ``link`` point to ``target``, atomically: a new link under a
        temporary name (:func:`temp_name`) renamed over it, and its directory fsynced."""
        self.checkpoint(step)
        tmp = temp_name(link)
        self._symlink(target, tmp)
        self._rename_into_place(tmp, link)
        self.fsync_dir(link.parent)

    def remove_tree(self, path: Path, *, step: str) -> None:
        """Remove the directory ``path`` and everything in it, if it exists; fsync its parent."""
        self.checkpoint(step)
        if os.path.lexists(path):
            self._rmtree(path)
            self.fsync_dir(path.parent)

    def unlink(self, path: Path, *, step: str) -> None:
        """Remove ``path`` if it exists, then fsync its directory."""
        self.checkpoint(step)
        try:
            self._unlink(path)
        except FileNotFoundError:
            return
        self.fsync_dir(path.parent)

    def chmod(self, path: Path, mode: int, *, step: str) -> None:
        """Set the permission bits of ``path``, and fsync it: a mode that a power cut could
        take back would leave a program that does not start."""
        self.checkpoint(step)
        self._chmod(path, mode)
        with contextlib.suppress(PermissionError):  # a mode without read for its owner
            self._fsync(path)

    def write_atomic(self, path: Path, data: bytes, *, step: str, mode: int = 0o644) -> None:
        """Write ``data`` to ``path`` so that a crash leaves the old or the new content, whole.

        A temporary file in the same directory (named by :func:`temp_name`, so that a kill
        in between leaves nothing the installer's clean-up would not find) is written with
        its mode and fsynced, renamed over ``path``, and the directory is fsynced.
        """
        self.checkpoint(step)
        tmp = temp_name(path)
        try:
            self._create(tmp, data, mode)
            self._fsync(tmp)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                self._unlink(tmp)
            raise
        self._rename_into_place(tmp, path)
        self.fsync_dir(path.parent)

    def fsync_dir(self, path: Path) -> None:
        """fsync a directory so that renames and links in it survive a power loss."""
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # ---- the primitives: one system call each ---------------------------------------------

    def _durable_copy(self, src: Path, dst: Path) -> None:
        self._copy_file(src, dst)
        self._fsync(dst)

    def _rename_into_place(self, tmp: Path, dst: Path) -> None:
        """``os.replace(tmp, dst)``; if that fails, ``tmp`` is removed."""
        try:
            self._rename(tmp, dst)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                self._unlink(tmp)
            raise

    def _rename(self, src: Path, dst: Path) -> None:
        os.replace(src, dst)

    def _link(self, src: Path, dst: Path) -> None:
        os.link(src, dst)

    def _mkdir(self, path: Path) -> None:
        os.mkdir(path, 0o755)

    def _symlink(self, target: str, path: Path) -> None:
        os.symlink(target, path)

    def _unlink(self, path: Path) -> None:
        os.unlink(path)

    def _rmtree(self, path: Path) -> None:
        shutil.rmtree(path)

    def _chmod(self, path: Path, mode: int) -> None:
        os.chmod(path, mode)

    def _create(self, path: Path, data: bytes, mode: int) -> None:
        """A new file (exclusively) holding ``data``, with ``mode``; not synced."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fchmod(fd, mode)
        finally:
            os.close(fd)

    def _copy_file(self, src: Path, dst: Path) -> None:
        """A new file ``dst`` with ``src``'s bytes and mode; not synced."""
        shutil.copy2(src, dst)

    def _fsync(self, path: Path) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def kill(self, pid: int, sig: int) -> None:
        """Send ``sig`` to ``pid``."""
        os.kill(pid, sig)

    def exit_now(self, code: int) -> NoReturn:
        """Leave the process at once, without running cleanup (after stdio was flushed)."""
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)

    def execv(self, path: str, argv: Sequence[str]) -> NoReturn:
        """Replace this process with ``argv`` (same PID), after flushing stdio."""
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os.execv(path, list(argv))

    def signal_self(self, sig: int = signal.SIGTERM) -> None:
        """Deliver ``sig`` to this process, so its own shutdown handlers run."""
        os.kill(os.getpid(), sig)
