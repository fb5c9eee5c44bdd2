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


def _rename_into_place(tmp: Path, dst: Path) -> None:
    """``os.replace(tmp, dst)``; if that fails, ``tmp`` is removed."""
    try:
        os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _durable_copy(src: Path, dst: Path) -> None:
    shutil.copy2(src, dst)
    fd = os.open(dst, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class System:
    """Real file, process and notification effects. Subclass to observe or break them."""

    def checkpoint(self, step: str) -> None:
        """Called before the effect of ``step``; the real system does nothing here."""

    def replace(self, src: Path, dst: Path, *, step: str) -> None:
        """``os.replace`` then fsync the destination's directory, so the rename is durable."""
        self.checkpoint(step)
        os.replace(src, dst)
        self.fsync_dir(dst.parent)

    def link_or_copy(self, src: Path, dst: Path, *, step: str) -> None:
        """Make ``dst`` a second name of ``src`` (a hard link), or a durable copy if links fail.

        ``dst`` must not exist. The directory is fsynced.
        """
        self.checkpoint(step)
        try:
            os.link(src, dst)
        except OSError:
            # Filesystems without hard links (some FUSE and network mounts): copy instead.
            _durable_copy(src, dst)
        self.fsync_dir(dst.parent)

    def copy(self, src: Path, dst: Path, *, step: str) -> None:
        """Copy ``src`` (bytes and mode) to the new file ``dst``, fsync it and its directory."""
        self.checkpoint(step)
        _durable_copy(src, dst)
        self.fsync_dir(dst.parent)

    def make_dir(self, path: Path, *, step: str) -> None:
        """Create the directory ``path`` (it must not exist), then fsync its parent."""
        self.checkpoint(step)
        os.mkdir(path, 0o755)
        self.fsync_dir(path.parent)

    def symlink(self, target: str, path: Path, *, step: str) -> None:
        """Create the symbolic link ``path`` to ``target`` (as written), then fsync its
        directory."""
        self.checkpoint(step)
        os.symlink(target, path)
        self.fsync_dir(path.parent)

    def point_link(self, link: Path, target: str, *, step: str) -> None:
        """Make the symbolic link ``link`` point to ``target``, atomically: a new link under a
        temporary name (:func:`temp_name`) renamed over it, and its directory fsynced."""
        self.checkpoint(step)
        tmp = temp_name(link)
        os.symlink(target, tmp)
        _rename_into_place(tmp, link)
        self.fsync_dir(link.parent)

    def remove_tree(self, path: Path, *, step: str) -> None:
        """Remove the directory ``path`` and everything in it, if it exists; fsync its parent."""
        self.checkpoint(step)
        if os.path.lexists(path):
            shutil.rmtree(path)
            self.fsync_dir(path.parent)

    def unlink(self, path: Path, *, step: str) -> None:
        """Remove ``path`` if it exists, then fsync its directory."""
        self.checkpoint(step)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
            self.fsync_dir(path.parent)

    def chmod(self, path: Path, mode: int, *, step: str) -> None:
        """Set the permission bits of ``path``."""
        self.checkpoint(step)
        os.chmod(path, mode)

    def write_atomic(self, path: Path, data: bytes, *, step: str, mode: int = 0o644) -> None:
        """Write ``data`` to ``path`` so that a crash leaves the old or the new content, whole.

        A temporary file in the same directory (named by :func:`temp_name`, so that a kill
        in between leaves nothing the installer's clean-up would not find) is written and
        fsynced, renamed over ``path``, and the directory is fsynced.
        """
        self.checkpoint(step)
        tmp = temp_name(path)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, mode)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        _rename_into_place(tmp, path)
        self.fsync_dir(path.parent)

    def fsync_dir(self, path: Path) -> None:
        """fsync a directory so that renames and links in it survive a power loss."""
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
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
