"""The one exception tree of selfupgrade, branched by what the caller must do.

::

    SelfUpgradeError
    ├── RetryLater                  the network or the server failed; try again after a back-off
    │   ├── TransportError          a heartbeat could not be sent or its reply was unusable
    │   ├── DownloadError           the artifact could not be fetched (status_code if HTTP said no)
    │   │   └── DeadlineExceeded    the download took longer than its total deadline
    │   └── LockBusy                another updater holds the install lock
    ├── UntrustedContent            never install these bytes; the remote is wrong or hostile
    │   ├── DigestMismatch          expected and actual digest differ (url, expected, actual)
    │   ├── SizeMismatch            fewer or more bytes than announced (url, expected, actual)
    │   └── SignatureError          the release manifest is unsigned, altered, expired or foreign
    ├── OrderRejected               the server asked for something this host does not allow
    │   ├── InvalidVersion          not a version, or a hostile one ("../x", NUL, whitespace)
    │   ├── UnsafeURL               not http/https, or a redirect to another scheme or host
    │   ├── UnsafePath              a target outside the install directory, or a symlink trick
    │   └── DowngradeRefused        the target is older and the order does not allow a downgrade
    ├── HostNotReady                fix the host, then retry: no free space, no write permission,
    │   │                           a read-only file system (path; :func:`disk_error` makes them)
    │   └── InsufficientSpace       the file system is full or too small (path, needed, free)
    ├── InstallFailed               the swap failed and was rolled back; the old version runs
    ├── RestartFailed               the new version is installed but could not be (re)started
    └── OperatorNeeded              the host cannot repair itself; a person must look
        └── RecoveryFailed          an interrupted swap could neither be finished nor undone

Every error carries structured attributes (``url``, ``expected``, ``actual``, ``status_code``,
``path``) so that callers and heartbeats can report them without parsing messages.
A failure of the local disk is never reported as a network one: the places where local file
operations meet foreign code (the installer's public methods, the download's writer) turn an
``OSError`` into a ``HostNotReady`` with :func:`disk_error`.
``InvalidVersion``, ``UnsafeURL`` and ``UnsafePath`` are also ``ValueError``: they are raised
while parsing input, so code that validates input catches them with everything else.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

__all__ = [
    "DeadlineExceeded",
    "DigestMismatch",
    "DowngradeRefused",
    "DownloadError",
    "HostNotReady",
    "InstallFailed",
    "InsufficientSpace",
    "InvalidVersion",
    "LockBusy",
    "OperatorNeeded",
    "OrderRejected",
    "RecoveryFailed",
    "RestartFailed",
    "RetryLater",
    "SelfUpgradeError",
    "SignatureError",
    "SizeMismatch",
    "TransportError",
    "UnsafePath",
    "UnsafeURL",
    "UntrustedContent",
    "disk_error",
]


class SelfUpgradeError(Exception):
    """Root of every error selfupgrade raises on purpose."""


class RetryLater(SelfUpgradeError):
    """A passing failure: the network, the server or a lock. Retry after a back-off."""


class TransportError(RetryLater):
    """A heartbeat could not be delivered, or the server's reply could not be used.

    Attributes:
        url: the address that was called.
        status_code: the HTTP status, when the server answered with an error status.
    """

    def __init__(self, message: str, *, url: str = "", status_code: int | None = None) -> None:
        super().__init__(message)
        self.url = url
        self.status_code = status_code


class DownloadError(RetryLater):
    """An artifact could not be fetched (connection, timeout, HTTP error status).

    Attributes:
        url: the artifact's address.
        status_code: the HTTP status when the server answered with one (404, 503, ...).
    """

    def __init__(self, message: str, *, url: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.url = url
        self.status_code = status_code


class DeadlineExceeded(DownloadError):
    """The download did not finish within its total deadline (a slow or trickling server)."""


class LockBusy(RetryLater):
    """Another updater (thread or process) is installing on the same target right now."""


class UntrustedContent(SelfUpgradeError):
    """The bytes or the release description cannot be trusted: never install them."""


class DigestMismatch(UntrustedContent):
    """The downloaded bytes do not have the expected digest. They were deleted.

    Attributes:
        url: where the bytes came from.
        algorithm: ``md5``, ``sha256`` or ``sha512``.
        expected: the hex digest the order announced.
        actual: the hex digest of the bytes received.
    """

    def __init__(self, *, url: str, algorithm: str, expected: str, actual: str) -> None:
        super().__init__(
            f"{algorithm} mismatch for {url}: expected {expected}, got {actual}; "
            "the download was deleted and nothing was installed"
        )
        self.url = url
        self.algorithm = algorithm
        self.expected = expected
        self.actual = actual


class SizeMismatch(UntrustedContent):
    """More bytes than allowed, or fewer than announced, arrived. They were deleted.

    Attributes:
        url: where the bytes came from.
        expected: the announced size or the cap, in bytes.
        actual: the bytes received (for an oversize download: at least this many).
    """

    def __init__(self, message: str, *, url: str, expected: int, actual: int) -> None:
        super().__init__(message)
        self.url = url
        self.expected = expected
        self.actual = actual


class SignatureError(UntrustedContent):
    """The release manifest is unsigned, signed by unknown keys, altered, expired or foreign."""


class OrderRejected(SelfUpgradeError):
    """The server asked for something this host's policy does not allow. Do not retry as is."""


class InvalidVersion(OrderRejected, ValueError):
    """A version string is not a PEP 440 version, or is hostile (path parts, NUL, whitespace).

    Attributes:
        text: the refused string (``repr``-safe; it may contain control characters).
    """

    def __init__(self, text: str, reason: str) -> None:
        super().__init__(f"invalid version {text!r}: {reason}")
        self.text = text


class UnsafeURL(OrderRejected, ValueError):
    """A URL (or a redirect) uses a scheme other than http/https, or leaves the allowed host.

    Attributes:
        url: the refused address.
    """

    def __init__(self, message: str, *, url: str) -> None:
        super().__init__(message)
        self.url = url


class UnsafePath(OrderRejected, ValueError):
    """A target path escapes the install directory or goes through a symlink.

    Attributes:
        path: the refused path.
    """

    def __init__(self, message: str, *, path: str | Path) -> None:
        super().__init__(message)
        self.path = str(path)


class DowngradeRefused(OrderRejected):
    """The order's version is older than the running one and does not allow a downgrade."""


class HostNotReady(SelfUpgradeError):
    """The host cannot take the upgrade now (disk full, directory not writable). Fix, then retry.

    Attributes:
        path: the directory that was checked.
    """

    def __init__(self, message: str, *, path: str | Path) -> None:
        super().__init__(message)
        self.path = str(path)


class InsufficientSpace(HostNotReady):
    """Not enough free space on the target's filesystem.

    Attributes:
        needed: bytes the upgrade needs there.
        free: bytes free there.
    """

    def __init__(
        self, message: str, *, path: str | Path, needed: int | None, free: int | None
    ) -> None:
        super().__init__(message, path=path)
        self.needed = needed
        self.free = free


def disk_error(exc: OSError, path: str | Path | None, doing: str) -> HostNotReady:
    """The error of the tree for a local file operation that failed with ``exc``: what was
    being done, on which path, the cause in words, and what to do about it.

    Args:
        path: the file or directory (``None``: the one ``exc`` names).
        doing: what was being done, as a phrase ("writing the install journal").
    """
    where = Path(path if path is not None else exc.filename or ".")
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        free = _free_bytes(where)
        return InsufficientSpace(
            f"{doing} {where}: the file system is full ({free} bytes free); free space there",
            path=where,
            needed=None,
            free=free,
        )
    if exc.errno == errno.EROFS:
        advice = "the file system is read-only; remount it read-write"
    elif exc.errno in (errno.EACCES, errno.EPERM):
        advice = "permission denied; give the agent's user write access to it"
    else:
        advice = f"{exc.strerror or exc}"
    error = HostNotReady(f"{doing} {where}: {advice}", path=where)
    error.__cause__ = exc
    return error


def _free_bytes(path: Path) -> int | None:
    for candidate in (path, *path.parents):
        if os.path.isdir(candidate):
            try:
                return shutil.disk_usage(candidate).free
            except OSError:
                return None
    return None


class InstallFailed(SelfUpgradeError):
    """The swap could not be completed; it was rolled back and the old files are in place."""


class RestartFailed(SelfUpgradeError):
    """The new files are installed but the restarter could not restart the daemon."""


class OperatorNeeded(SelfUpgradeError):
    """The host cannot repair itself. A person must look at the files named in the message."""


class RecoveryFailed(OperatorNeeded):
    """An interrupted swap could be neither finished nor undone (for example a backup vanished)."""
