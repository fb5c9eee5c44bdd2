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
import time
from collections.abc import Callable
from pathlib import Path

from .errors import DeadlineExceeded, DownloadError, SelfUpgradeError, SizeMismatch
from .models import Artifact
from .transport.base import Fetcher
from .verify.base import StreamCheck, Verifier

__all__ = ["download_artifact"]

log = logging.getLogger("selfupgrade.download")


class _Sink:
    def __init__(
        self,
        fd: int,
        url: str,
        check_factory: Callable[[], StreamCheck],
        *,
        max_bytes: int,
        deadline: float,
        clock: Callable[[], float],
    ) -> None:
        self._fd = fd
        self._url = url
        self._factory = check_factory
        self.check = check_factory()
        self._max = max_bytes
        self._deadline = deadline
        self._clock = clock
        self._received = 0

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
        view = memoryview(chunk)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        self.check.update(chunk)
        self._received += size

    def restart(self) -> None:
        os.lseek(self._fd, 0, os.SEEK_SET)
        os.ftruncate(self._fd, 0)
        self.check = self._factory()
        self._received = 0


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
) -> int:
    """Fetch ``artifact`` into the new file ``dest``, verify it, fsync it; return its size.

    ``dest`` is created exclusively (mode 0600) and, when this raises, removed.

    Raises:
        DownloadError: the fetch failed (``DeadlineExceeded`` when it was too slow).
        SizeMismatch: more than ``max_bytes`` or the artifact's size, or fewer than its size.
        DigestMismatch: the bytes are not the expected ones.
        UnsafeURL: a redirect was refused.
    """
    cap = max_bytes if artifact.size is None else min(max_bytes, artifact.size)
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    ok = False
    deadline = clock() + timeout_s
    try:
        sink = _Sink(
            fd,
            artifact.url,
            lambda: verifier.begin(artifact),
            max_bytes=cap,
            deadline=deadline,
            clock=clock,
        )
        try:
            fetcher.fetch(artifact.url, sink, deadline=deadline, max_bytes=cap)
        except SelfUpgradeError:
            raise
        except Exception as exc:  # a plug-in's own failure: never let it escape unmapped
            raise DownloadError(
                f"GET {artifact.url} failed in the fetcher: {type(exc).__name__}: {exc}",
                url=artifact.url,
            ) from exc
        if artifact.size is not None and sink.received != artifact.size:
            raise SizeMismatch(
                f"{artifact.url} ended after {sink.received} of {artifact.size} bytes",
                url=artifact.url,
                expected=artifact.size,
                actual=sink.received,
            )
        if on_verifying is not None:
            on_verifying()
        sink.check.finish()
        os.fsync(fd)
        ok = True
        log.info(
            "fetched %s (%d bytes, %s verified)",
            artifact.url,
            sink.received,
            artifact.digest.algorithm,
        )
        return sink.received
    finally:
        os.close(fd)
        if not ok:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(dest)
