"""The artifact check: hbs fetches what it is about to order, before any host does.

An unmodified falcon agent cannot survive a bad download (an unreachable URL leaves it with an
empty, non-executable program), so hbs must never order bytes that are not there. Before a
publish is accepted, and again before each wave starts and periodically during a rollout, each
artifact of the release is fetched once from each of its URLs, and each of its patches: http
or https only, at most ``max_bytes``, within ``deadline_s`` in all, and its size and digest
compared with the release's. Anything else (an unreachable host, a non-200 answer, too many
bytes, too slow, the wrong digest) raises :class:`ArtifactUnavailable`, naming the URL and
what hbs got.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence

import httpx

from ..models import Digest, Release, check_url
from ._fields import FieldError

__all__ = ["ArtifactCheck", "ArtifactUnavailable"]


class ArtifactUnavailable(FieldError):
    """An artifact of a release cannot be fetched as the release describes it.

    Attributes:
        url: the artifact's URL.
    """

    def __init__(self, field_name: str, url: str, what: str) -> None:
        super().__init__(field_name, f"{url}: {what}; nothing was published")
        self.url = url


class ArtifactCheck:
    """Fetch each artifact of a release and check its size and digest.

    Args:
        max_bytes: an artifact larger than this is refused (and not read further).
        deadline_s: the longest one artifact may take, connection and transfer included.
        transport: an httpx transport (tests); the default one otherwise.
        clock: monotonic time, for the deadline.
    """

    def __init__(
        self,
        *,
        max_bytes: int = 1 << 30,
        deadline_s: float = 30.0,
        transport: httpx.BaseTransport | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_bytes < 1 or deadline_s <= 0:
            raise ValueError("max_bytes and deadline_s must be positive")
        self.max_bytes = max_bytes
        self.deadline_s = deadline_s
        self._transport = transport
        self._clock = clock

    def check(self, release: Release, field_name: str = "release") -> None:
        """Fetch every artifact of ``release`` from each of its URLs (its mirrors too) and
        each of its patches; return when each gives the bytes described.

        Raises:
            ArtifactUnavailable: for the first URL that does not, with ``field_name`` as the
                offending field of the request.
        """
        self.check_all([(field_name, release)])

    def check_all(self, releases: Sequence[tuple[str, Release]]) -> None:
        """:meth:`check` for each ``(field_name, release)`` (one release as different hosts
        get it), each URL fetched once.

        Raises:
            ArtifactUnavailable: as :meth:`check`, naming the field of the release in which
                the URL first appears.
        """
        seen: set[tuple[str, str]] = set()
        for field_name, release in releases:
            for artifact in release.artifacts:
                wanted = [(url, artifact.size, artifact.digest) for url in artifact.urls]
                wanted += [(p.url, p.size, p.digest) for p in artifact.patches]
                for url, size, digest in wanted:
                    if (artifact.role.value, url) not in seen:
                        seen.add((artifact.role.value, url))
                        self._check_one(url, size, digest, field_name)

    def _check_one(self, url: str, size: int | None, expected: Digest, field_name: str) -> None:

        def refuse(what: str) -> ArtifactUnavailable:
            return ArtifactUnavailable(field_name, url, what)

        try:
            check_url(url)
        except ValueError as exc:
            raise refuse(str(exc)) from None
        limit = self.max_bytes if size is None else min(self.max_bytes, size)
        started = self._clock()
        timeout = httpx.Timeout(min(self.deadline_s, 10.0))
        digest = hashlib.new(expected.algorithm)
        got = 0
        try:
            with (
                httpx.Client(
                    transport=self._transport,
                    timeout=timeout,
                    follow_redirects=True,
                    max_redirects=5,
                ) as client,
                client.stream("GET", url) as response,
            ):
                if response.status_code != 200:
                    raise refuse(f"answered HTTP {response.status_code}, not 200")
                for chunk in response.iter_bytes(1 << 16):
                    got += len(chunk)
                    if got > limit:
                        raise refuse(
                            f"more than {limit} bytes"
                            + (" (the release's size)" if size is not None else "")
                        )
                    if self._clock() - started > self.deadline_s:
                        raise refuse(f"not fetched within {self.deadline_s:g} s ({got} bytes)")
                    digest.update(chunk)
        except httpx.HTTPError as exc:
            raise refuse(f"could not be fetched: {type(exc).__name__}: {exc}") from None
        if size is not None and got != size:
            raise refuse(f"{got} bytes, the release says {size}")
        if not expected.matches(digest.hexdigest()):
            raise refuse(
                f"{expected.algorithm} is {digest.hexdigest()}, the release says {expected.hex}"
            )
