"""The Transport role: how an agent talks to its control server and fetches bytes.

Two protocols, because the two jobs are independent (the falcon JSON-RPC transport beats over
TCP but downloads over HTTP like everyone else):

* :class:`Transport` sends one heartbeat and returns the server's order, if any; a
  :class:`PacedTransport` also tells when the server asked the host to beat next.
* :class:`Fetcher` moves the bytes of one URL into a :class:`ByteSink`.

Contract: a transport raises :class:`~selfupgrade.errors.TransportError` when the beat did not
get through (the updater backs off and tries later) and
:class:`~selfupgrade.errors.OrderRejected` (or ``ValueError``) when the reply carried an order
that is malformed. A fetcher raises :class:`~selfupgrade.errors.DownloadError` or
:class:`~selfupgrade.errors.UnsafeURL`. The updater does not trust plug-ins to keep limits:
the sink it hands to :meth:`Fetcher.fetch` enforces the byte cap and the deadline itself, and
any foreign exception is mapped to ``DownloadError``.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from ..models import Heartbeat, UpgradeOrder

__all__ = ["ByteSink", "Fetcher", "KeepingSink", "PacedTransport", "Transport"]


@runtime_checkable
class Transport(Protocol):
    """Delivers heartbeats to the control server."""

    def heartbeat(self, beat: Heartbeat) -> UpgradeOrder | None:
        """Send ``beat``; return the order the server answered with, or ``None``.

        Raises:
            TransportError: the beat did not get through or the reply was unusable.
            OrderRejected: the reply carried an order that is not acceptable as data.
        """

    def close(self) -> None:
        """Release connections."""


@runtime_checkable
class PacedTransport(Transport, Protocol):
    """A transport whose server may say, in each reply, when to beat next
    (:mod:`~selfupgrade.server.pacing`). The updater follows it within its own bounds."""

    @property
    def next_beat_s(self) -> float | None:
        """The wait the last reply asked for, in seconds (``None``: it asked nothing, or the
        last heartbeat failed)."""


class ByteSink(Protocol):
    """Where a fetcher puts bytes. Owned by the updater: it hashes, caps and times them."""

    @property
    def received(self) -> int:
        """Bytes accepted so far; a resumed download asks the server for the rest from here."""

    def write(self, chunk: bytes) -> None:
        """Accept the next chunk (the sink keeps a copy unless it is ``bytes``).

        Raises:
            SizeMismatch: the chunk would exceed the cap.
            DeadlineExceeded: the download's deadline has passed.
        """

    def restart(self) -> None:
        """Drop everything received; the fetcher is starting over from byte 0."""

    def announce(self, size: int) -> None:
        """The server announced the whole artifact's ``size`` (``Content-Length``); a
        fetcher calls this before the body when it knows, so that what cannot fit on the
        local disk is refused before it is downloaded.

        Raises:
            InsufficientSpace: the file system lacks room for ``size`` bytes.
        """


@runtime_checkable
class KeepingSink(ByteSink, Protocol):
    """A sink that can keep a fetcher's buffer instead of copying it; the updater's sink is
    one. :meth:`ByteSink.write` copies any chunk that is not ``bytes``, since a fetcher may
    reuse its buffer; a fetcher that hands over fresh buffers (httpx's chunks are new
    ``bytearray`` objects) saves that copy, 1 in 5 of the receiving thread's work."""

    def take(self, chunk: bytes | bytearray) -> None:
        """Accept ``chunk`` as :meth:`ByteSink.write` does, keeping the object itself: the
        caller must never change it afterwards (it is written and hashed later, on other
        threads)."""


@runtime_checkable
class Fetcher(Protocol):
    """Moves the bytes at a URL into a sink."""

    def fetch(self, url: str, sink: ByteSink, *, deadline: float, max_bytes: int) -> None:
        """Fetch ``url`` completely into ``sink``.

        Args:
            url: an http or https URL (already checked by the caller).
            sink: receives the bytes.
            deadline: ``time.monotonic()`` value after which the fetch must give up.
            max_bytes: the most bytes the sink will accept; a fetcher may refuse earlier
                (for example from ``Content-Length``).

        Raises:
            DownloadError: the bytes could not be fetched.
            UnsafeURL: a redirect led to another scheme or host.
        """

    def close(self) -> None:
        """Release connections."""
