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
            shutil.copy2(src, dst)
            fd = os.open(dst, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        self.fsync_dir(dst.parent)

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
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
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
