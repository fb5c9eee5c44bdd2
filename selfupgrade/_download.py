"""Download one artifact into a staged file, enforcing the limits whatever the fetcher does.

The fetcher is a plug-in and is not trusted to keep limits: :class:`_Sink` counts every byte
against the cap and checks the deadline on every chunk, feeds the verifier's stream check, and
writes to the staged file. On any failure the staged file is deleted, so nothing half-fetched
or unverified survives to be installed. Foreign exceptions from the fetcher become
:class:`~selfupgrade.errors.DownloadError`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import (
    DeadlineExceeded,
    DownloadError,
    HostNotReady,
    SelfUpgradeError,
    SizeMismatch,
    UnsafeURL,
    UntrustedContent,
    disk_error,
)
from .models import Artifact, Patch, Version
from .transport.base import Fetcher
from .verify.base import StreamCheck, Verifier
from .verify.digest import DigestCheck

__all__ = ["Fetched", "PatchBase", "download_artifact"]

log = logging.getLogger("selfupgrade.download")

_Batch = list[bytes | bytearray]


class _Sink:
    """Receives the fetcher's chunks: checks the cap and the deadline at once, and hands the
    bytes, in batches of about 1 MiB, to two threads: one writes them to the staged file and
    sends each batch on its way to the disk (:func:`_write_back`, so that the final fsync
    waits for the last batches only), the other feeds the stream check. ``os.write`` and
    hashing both release the GIL, so receiving, writing and hashing overlap (each costs
    about as much as another; done by one thread, the two behind the receiver took 1.6
    times as long as receiving). A download smaller than one batch starts no thread."""

    def __init__(
        self,
        fd: int,
        url: str,
        check_factory: Callable[[], StreamCheck],
        *,
        max_bytes: int,
        deadline: float,
        clock: Callable[[], float],
        dest: Path,
        check_room: Callable[[int], None] | None,
    ) -> None:
        self._fd = fd
        self.dest = dest
        self.check_room = check_room
        self._url = url
        self._factory = check_factory
        self.check = check_factory()
        self.max_bytes = max_bytes
        self.deadline = deadline
        self.clock = clock
        self._received = 0
        self._written = 0
        self._pending: _Batch = []
        self._pending_bytes = 0
        self._workers = (
            _Worker("download-writer", self._write_batch),
            _Worker("download-hasher", self._hash_batch),
        )

    @property
    def received(self) -> int:
        return self._received

    def write(self, chunk: bytes) -> None:
        self.take(bytes(chunk))  # a no-op for bytes; anything else may be reused by its owner

    def take(self, chunk: bytes | bytearray) -> None:
        if self.clock() > self.deadline:
            raise DeadlineExceeded(
                f"GET {self._url}: deadline passed after {self._received} bytes", url=self._url
            )
        size = len(chunk)
        if self._received + size > self.max_bytes:
            raise SizeMismatch(
                f"{self._url} sent more than the allowed {self.max_bytes} bytes",
                url=self._url,
                expected=self.max_bytes,
                actual=self._received + size,
            )
        self._received += size
        self._pending.append(chunk)
        self._pending_bytes += size
        if self._pending_bytes >= _BATCH_BYTES:
            batch, self._pending, self._pending_bytes = self._pending, [], 0
            for worker in self._workers:
                worker.put(batch)

    def announce(self, size: int) -> None:
        if self.check_room is not None:
            self.check_room(size)

    def _write_batch(self, batch: _Batch) -> None:
        start = self._written
        for chunk in batch:
            view = memoryview(chunk)
            try:
                while view:
                    written = os.write(self._fd, view)
                    view = view[written:]
            except OSError as exc:  # the local disk, not the network
                raise disk_error(exc, self.dest, "writing the download to") from exc
            self._written += len(chunk)
        if self._workers[0].threaded:
            _write_back(self._fd, start, self._written - start)

    def _hash_batch(self, batch: _Batch) -> None:
        for chunk in batch:
            self.check.update(chunk)

    def drain(self) -> None:
        """Write and check everything received so far; raise what a worker raised."""
        batch, self._pending, self._pending_bytes = self._pending, [], 0
        errors = [worker.finish(batch) for worker in self._workers]
        for error in errors:
            if error is not None:
                raise error

    def restart(self) -> None:
        with contextlib.suppress(BaseException):
            self.drain()
        for worker in self._workers:
            worker.error = None
        os.lseek(self._fd, 0, os.SEEK_SET)
        os.ftruncate(self._fd, 0)
        self.check = self._factory()
        self._received = 0
        self._written = 0


class _Worker:
    """Applies ``work`` to each batch in order, on its own thread once there is more than
    one batch; keeps the first error (the receiving thread raises it at its next batch or
    at :meth:`finish`) and skips the batches after it."""

    def __init__(self, name: str, work: Callable[[_Batch], None]) -> None:
        self._name = name
        self._work = work
        self._queue: queue.Queue[_Batch | None] = queue.Queue(maxsize=_QUEUED_BATCHES)
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    @property
    def threaded(self) -> bool:
        return self._thread is not None

    def put(self, batch: _Batch) -> None:
        if self.error is not None:
            raise self.error
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name=self._name)
            self._thread.start()
        self._queue.put(batch)

    def finish(self, batch: _Batch) -> BaseException | None:
        """Apply ``work`` to the last ``batch``, wait until all is done, stop the thread;
        return the first error."""
        if self._thread is not None:
            self._queue.put(batch)
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        else:
            self._run(batch)
        return self.error

    def _loop(self) -> None:
        while (batch := self._queue.get()) is not None:
            self._run(batch)

    def _run(self, batch: _Batch) -> None:
        if self.error is None:
            try:
                self._work(batch)
            except BaseException as exc:  # handed to the receiving thread
                self.error = exc


def _write_back(fd: int, offset: int, length: int) -> None:
    """Start writing ``length`` bytes of ``fd`` from ``offset`` to the disk, without waiting
    (Linux's ``sync_file_range(SYNC_FILE_RANGE_WRITE)``): the fsync that ends a download then
    waits for little more than the last batch (64 MiB: about 28 ms of fsync become 3 to 7).
    Elsewhere, or if the call fails, nothing: the fsync does all the work, as before."""
    global _sync_file_range
    if _sync_file_range is None or length <= 0:
        return
    if _sync_file_range is _UNLOADED:
        _sync_file_range = _load_sync_file_range()
        if _sync_file_range is None:
            return
    if _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE) != 0:
        _sync_file_range = None  # not supported here (ENOSYS, a file system without it)


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    import ctypes  # only downloads of more than one batch need it

    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_SYNC_FILE_RANGE_WRITE = 2
_UNLOADED: Any = object()
_sync_file_range: Any = _UNLOADED


_BATCH_BYTES = 1 << 20
_QUEUED_BATCHES = 8


def download_artifact(
    artifact: Artifact,
    dest: Path,
    *,
    fetcher: Fetcher,
    verifier: Verifier,
    max_bytes: int,
    timeout_s: float,
    clock: Callable[[], float] = time.monotonic,
    on_verifying: Callable[[], None] | None = None,
    check_room: Callable[[int], None] | None = None,
    base: PatchBase | None = None,
) -> Fetched:
    """Fetch ``artifact`` into the new file ``dest``, verify it, fsync it.

    Its URLs (``artifact.urls``: ``url``, then the mirrors) are tried in order, within one
    deadline. A transfer that fails midway goes on at the next URL from the byte where it
    stopped (an HTTP ``Range`` request: the expected digest tells at the end whether the
    pieces make the file); bytes that fail their size or digest check are thrown away, and the
    next URL gives the whole file. A full disk, the deadline or an order the verifier refuses
    end it at once.

    ``base`` names the running version and the file this artifact replaces. When the
    artifact has a patch from that version (and zstandard is installed), the patch is fetched
    into ``base.scratch`` and applied first, within half the deadline; what it builds is held
    to the same size and verifier as a download. If anything about the patch fails, the whole
    artifact is fetched as above, without asking the server.

    ``dest`` is created exclusively (mode 0600) and, when this raises, removed.
    ``check_room(size)`` is called with the size the artifact or its server announces, before
    its bytes (it raises ``InsufficientSpace`` when they cannot fit).

    Raises:
        DownloadError: the fetch failed at every URL (``DeadlineExceeded`` when it was too
            slow); the message says what each URL did.
        SizeMismatch: more than ``max_bytes`` or the artifact's size, or fewer than its size.
        DigestMismatch: the bytes are not the expected ones.
        UnsafeURL: a redirect was refused.
        HostNotReady: the local disk failed (``InsufficientSpace``: it is full, or the
            announced size cannot fit).
    """
    cap = max_bytes if artifact.size is None else min(max_bytes, artifact.size)
    now = clock()
    patch = artifact.patch_from(base.version) if base is not None else None
    if patch is not None and base is not None:
        try:
            return _into(
                dest,
                artifact,
                lambda: verifier.begin(artifact),
                lambda sink: _apply(artifact, patch, base, sink, fetcher, max_bytes, on_verifying),
                max_bytes=cap,
                deadline=now + timeout_s / 2,
                clock=clock,
                check_room=check_room,
            )
        except Exception as exc:  # whatever went wrong, the whole artifact is the way on
            log.warning(
                "the patch from %s for the %s artifact failed (%s); fetching the whole of it",
                patch.from_version,
                artifact.role.value,
                exc,
            )
    return _into(
        dest,
        artifact,
        lambda: verifier.begin(artifact),
        lambda sink: _from_each_url(artifact, sink, fetcher, on_verifying),
        max_bytes=cap,
        deadline=now + timeout_s,
        clock=clock,
        check_room=check_room,
    )


@dataclass(frozen=True)
class PatchBase:
    """What a patch applies to: the running ``version``, its installed file at ``path``, and
    ``scratch``, a new path for the patch's own bytes (removed afterwards; the installer's
    :meth:`~selfupgrade.install.base.Installer.staging_path`, so that a crash's leftover is
    cleaned up like a download's)."""

    version: Version
    path: Path
    scratch: Path


@dataclass(frozen=True)
class Fetched:
    """A download that succeeded: its size, the URL that gave its last bytes, and the URLs
    that gave earlier bytes of it (``()`` when one URL gave it all); ``patch`` is the patch
    the file was built from (``url`` is then the patch's), else ``None``."""

    size: int
    url: str
    resumed_from: tuple[str, ...] = ()
    patch: Patch | None = None


def _into(
    dest: Path,
    artifact: Artifact,
    check_factory: Callable[[], StreamCheck],
    fill: Callable[[_Sink], Fetched],
    *,
    max_bytes: int,
    deadline: float,
    clock: Callable[[], float],
    check_room: Callable[[int], None] | None,
) -> Fetched:
    """Create ``dest``, let ``fill`` pour ``artifact``'s bytes into a sink on it (within
    ``max_bytes`` and ``deadline``, each checked by ``check_factory()``), fsync it; remove
    it if anything fails."""
    try:
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise disk_error(exc, dest, "creating the download file") from exc
    ok = False
    sink: _Sink | None = None
    try:
        sink = _Sink(
            fd,
            artifact.url,
            check_factory,
            max_bytes=max_bytes,
            deadline=deadline,
            clock=clock,
            dest=dest,
            check_room=check_room,
        )
        if artifact.size is not None:
            sink.announce(artifact.size)
        fetched = fill(sink)
        try:
            os.fsync(fd)
        except OSError as exc:
            raise disk_error(exc, dest, "flushing the download to") from exc
        ok = True
        log.info(
            "fetched %s (%d bytes, %s verified)%s",
            fetched.url,
            fetched.size,
            artifact.digest.algorithm,
            f"; resumed from {', '.join(fetched.resumed_from)}" if fetched.resumed_from else "",
        )
        return fetched
    finally:
        if not ok and sink is not None:
            with contextlib.suppress(BaseException):
                sink.drain()  # stop the writer before the file goes
        os.close(fd)
        if not ok:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(dest)


def _apply(
    artifact: Artifact,
    patch: Patch,
    base: PatchBase,
    sink: _Sink,
    fetcher: Fetcher,
    max_bytes: int,
    on_verifying: Callable[[], None] | None,
) -> Fetched:
    """Fetch ``patch`` into ``base.scratch`` (held to its own digest), apply it to
    ``base.path`` (read whole, at most ``max_bytes``) into the sink, and check the result as
    a download of ``artifact``."""
    from . import _delta

    _delta.zstandard()  # before any byte is fetched: without it the patch is no use
    with open(base.path, "rb") as f:  # the dictionary: the installed file, in memory
        old = f.read(max_bytes + 1)
    if len(old) > max_bytes:
        raise SizeMismatch(
            f"the installed {base.path} is larger than the {max_bytes} bytes allowed",
            url=patch.url,
            expected=max_bytes,
            actual=len(old),
        )
    patch_path = base.scratch
    as_artifact = Artifact(artifact.role, patch.url, patch.digest, size=patch.size)
    try:
        fetched = _into(
            patch_path,
            as_artifact,
            lambda: DigestCheck(patch.url, patch.digest),
            lambda patch_sink: _from_each_url(as_artifact, patch_sink, fetcher, None),
            max_bytes=sink.max_bytes if patch.size is None else min(patch.size, sink.max_bytes),
            deadline=sink.deadline,
            clock=sink.clock,
            check_room=sink.check_room,
        )
        with open(patch_path, "rb") as f:
            _delta.apply_patch(old, f, sink.take, max_output=sink.max_bytes)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(patch_path)
    _check_whole(artifact, sink, patch.url, on_verifying)
    log.info(
        "built the %s artifact from the patch from %s (%d bytes fetched instead of %d)",
        artifact.role.value,
        patch.from_version,
        fetched.size,
        sink.received,
    )
    return Fetched(sink.received, patch.url, patch=patch)


def _check_whole(
    artifact: Artifact, sink: _Sink, url: str, on_verifying: Callable[[], None] | None
) -> None:
    """Raise unless the sink holds exactly ``artifact``'s size and passes its check."""
    sink.drain()
    if artifact.size is not None and sink.received != artifact.size:
        raise SizeMismatch(
            f"{url} ended after {sink.received} of {artifact.size} bytes",
            url=url,
            expected=artifact.size,
            actual=sink.received,
        )
    if on_verifying is not None:
        on_verifying()
    sink.check.finish()


def _from_each_url(
    artifact: Artifact,
    sink: _Sink,
    fetcher: Fetcher,
    on_verifying: Callable[[], None] | None,
) -> Fetched:
    """Fill ``sink`` from ``artifact``'s URLs in turn until its bytes pass their checks."""
    failures: list[str] = []
    earlier: list[str] = []  # the URLs whose bytes are in the sink before this one's
    urls = artifact.urls
    for i, url in enumerate(urls):
        last = i == len(urls) - 1
        try:
            _fetch(fetcher, url, sink)
            _check_whole(artifact, sink, url, on_verifying)
            return Fetched(sink.received, url, tuple(earlier))
        except (DeadlineExceeded, HostNotReady):
            raise  # not the server's doing: another URL would not help
        except (DownloadError, UntrustedContent, UnsafeURL) as exc:
            failures.append(f"{url}: {exc}")
            if last:
                if len(urls) > 1 and isinstance(exc, DownloadError):
                    raise DownloadError(
                        f"every URL of the {artifact.role.value} artifact failed: "
                        + "; ".join(failures),
                        url=url,
                        status_code=exc.status_code,
                    ) from exc
                if len(urls) > 1:
                    log.warning("every URL failed: %s", "; ".join(failures))
                raise
            if isinstance(exc, UntrustedContent) or not sink.received:
                sink.restart()  # bad bytes, or none: the next URL gives the whole file
                earlier.clear()
                log.warning("%s failed (%s); fetching %s instead", url, exc, urls[i + 1])
            else:
                earlier.append(url)
                log.warning(
                    "%s failed after %d bytes (%s); going on from there at %s",
                    url,
                    sink.received,
                    exc,
                    urls[i + 1],
                )
    raise AssertionError("unreachable: the last URL returns or raises")


def _fetch(fetcher: Fetcher, url: str, sink: _Sink) -> None:
    try:
        fetcher.fetch(url, sink, deadline=sink.deadline, max_bytes=sink.max_bytes)
    except SelfUpgradeError:
        raise
    except Exception as exc:  # a plug-in's own failure: never let it escape unmapped
        raise DownloadError(
            f"GET {url} failed in the fetcher: {type(exc).__name__}: {exc}", url=url
        ) from exc
