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
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

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
from .models import Artifact
from .transport.base import Fetcher
from .verify.base import StreamCheck, Verifier

__all__ = ["Fetched", "download_artifact"]

log = logging.getLogger("selfupgrade.download")


class _Sink:
    """Receives the fetcher's chunks: checks the cap and the deadline at once, and hands the
    bytes, in batches of about 1 MiB, to a writer thread that writes them to the staged file
    and feeds the stream check. Both ``os.write`` and hashing release the GIL, so a large
    download is hashed and written on one core while the next bytes arrive on another
    (hashing alone costs about as much as receiving). A download smaller than one batch never
    starts the thread."""

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
        self._dest = dest
        self._check_room = check_room
        self._url = url
        self._factory = check_factory
        self.check = check_factory()
        self._max = max_bytes
        self._deadline = deadline
        self._clock = clock
        self._received = 0
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._queue: queue.Queue[list[bytes] | None] = queue.Queue(maxsize=_QUEUED_BATCHES)
        self._writer: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def received(self) -> int:
        return self._received

    def write(self, chunk: bytes) -> None:
        if self._clock() > self._deadline:
            raise DeadlineExceeded(
                f"GET {self._url}: deadline passed after {self._received} bytes", url=self._url
            )
        size = len(chunk)
        if self._received + size > self._max:
            raise SizeMismatch(
                f"{self._url} sent more than the allowed {self._max} bytes",
                url=self._url,
                expected=self._max,
                actual=self._received + size,
            )
        self._received += size
        self._pending.append(bytes(chunk))
        self._pending_bytes += size
        if self._pending_bytes >= _BATCH_BYTES:
            self._hand_off()

    def announce(self, size: int) -> None:
        if self._check_room is not None:
            self._check_room(size)

    def _hand_off(self) -> None:
        if self._error is not None:
            raise self._error
        batch, self._pending, self._pending_bytes = self._pending, [], 0
        if self._writer is None:
            self._writer = threading.Thread(target=self._write_loop, name="download-writer")
            self._writer.start()
        self._queue.put(batch)

    def _write_loop(self) -> None:
        while (batch := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self._consume(batch)
                except BaseException as exc:  # handed to the receiving thread
                    self._error = exc

    def _consume(self, batch: list[bytes]) -> None:
        for chunk in batch:
            view = memoryview(chunk)
            try:
                while view:
                    written = os.write(self._fd, view)
                    view = view[written:]
            except OSError as exc:  # the local disk, not the network
                raise disk_error(exc, self._dest, "writing the download to") from exc
            self.check.update(chunk)

    def drain(self) -> None:
        """Write and check everything received so far; raise what the writer raised."""
        if self._writer is not None:
            self._queue.put(self._pending)
            self._queue.put(None)
            self._writer.join()
            self._writer = None
        elif self._error is None:
            try:
                self._consume(self._pending)
            except BaseException as exc:
                self._error = exc
        self._pending, self._pending_bytes = [], 0
        if self._error is not None:
            raise self._error

    def restart(self) -> None:
        with contextlib.suppress(BaseException):
            self.drain()
        self._error = None
        os.lseek(self._fd, 0, os.SEEK_SET)
        os.ftruncate(self._fd, 0)
        self.check = self._factory()
        self._received = 0


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
) -> Fetched:
    """Fetch ``artifact`` into the new file ``dest``, verify it, fsync it.

    Its URLs (``artifact.urls``: ``url``, then the mirrors) are tried in order, within one
    deadline. A transfer that fails midway goes on at the next URL from the byte where it
    stopped (an HTTP ``Range`` request: the expected digest tells at the end whether the
    pieces make the file); bytes that fail their size or digest check are thrown away, and the
    next URL gives the whole file. A full disk, the deadline or an order the verifier refuses
    end it at once.

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
    try:
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise disk_error(exc, dest, "creating the download file") from exc
    ok = False
    deadline = clock() + timeout_s
    sink: _Sink | None = None
    try:
        sink = _Sink(
            fd,
            artifact.url,
            lambda: verifier.begin(artifact),
            max_bytes=cap,
            deadline=deadline,
            clock=clock,
            dest=dest,
            check_room=check_room,
        )
        if artifact.size is not None:
            sink.announce(artifact.size)
        fetched = _from_each_url(artifact, sink, fetcher, cap, deadline, on_verifying)
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


@dataclass(frozen=True)
class Fetched:
    """A download that succeeded: its size, the URL that gave its last bytes, and the URLs
    that gave earlier bytes of it (``()`` when one URL gave it all)."""

    size: int
    url: str
    resumed_from: tuple[str, ...] = ()


def _from_each_url(
    artifact: Artifact,
    sink: _Sink,
    fetcher: Fetcher,
    cap: int,
    deadline: float,
    on_verifying: Callable[[], None] | None,
) -> Fetched:
    """Fill ``sink`` from ``artifact``'s URLs in turn until its bytes pass their checks."""
    failures: list[str] = []
    earlier: list[str] = []  # the URLs whose bytes are in the sink before this one's
    urls = artifact.urls
    for i, url in enumerate(urls):
        last = i == len(urls) - 1
        try:
            _fetch(fetcher, url, sink, deadline, cap)
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


def _fetch(fetcher: Fetcher, url: str, sink: _Sink, deadline: float, cap: int) -> None:
    try:
        fetcher.fetch(url, sink, deadline=deadline, max_bytes=cap)
    except SelfUpgradeError:
        raise
    except Exception as exc:  # a plug-in's own failure: never let it escape unmapped
        raise DownloadError(
            f"GET {url} failed in the fetcher: {type(exc).__name__}: {exc}", url=url
        ) from exc
