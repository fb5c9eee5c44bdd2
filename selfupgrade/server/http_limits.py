"""Limits on requests for uvicorn's httptools protocol (``selfupgrade[server]``).

httptools keeps a request's headers in memory until the head is complete and has no limit of
its own: one connection sending a 200 MB header made an unbounded hbs grow by 300 MB (measured
here). :class:`BoundedHttpToolsProtocol` answers ``431`` and closes the connection once a
request's head exceeds ``max_head_bytes`` or ``max_headers``. uvicorn has no time limit on a
head or a body either (a client sending a byte now and then holds its connection forever):
the head must be complete within ``head_timeout_s`` of the connection (or of the previous
response), the body within ``body_timeout_s`` of the head; otherwise the connection is
closed. And beyond ``max_connections`` connections, the oldest that has not sent a complete
head yet is closed (or, when there is none, the new one), so that hostile clients cannot take
every file descriptor from the agents. Use it as uvicorn's ``http`` protocol class
(``selfupgrade-hbs`` does).
"""

from __future__ import annotations

import asyncio
import resource
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["BoundedHttpToolsProtocol", "connection_cap"]


def connection_cap(share: float = 0.8, reserve: int = 64) -> int:
    """How many client connections one listener may hold: ``share`` of the file descriptors
    this process may open, less ``reserve`` for the store, logs and the other listener."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = soft if soft != resource.RLIM_INFINITY else 65536
    return max(16, int((limit - reserve) * share))


_431 = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
    b"content-type: text/plain; charset=utf-8\r\n"
    b"connection: close\r\n"
    b"content-length: 32\r\n\r\n"
    b"request header fields too large\n"
)


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with bounded request heads."""

    max_head_bytes = 64 * 1024
    """Bytes a request line and headers may take."""
    max_headers = 100
    """Header fields a request may carry."""
    head_timeout_s = 10.0
    """Time a request's head may take, from the connection or from the request's first byte."""
    body_timeout_s = 30.0
    """Time a request's body may take, from the end of its head."""
    max_connections = connection_cap(0.4)
    """Connections held at once (both of hbs's listeners share the process's descriptors)."""

    _unproven: dict[BoundedHttpToolsProtocol, None] = {}  # noqa: RUF012 - shared on purpose
    """Connections that have not sent a complete request head yet, oldest first."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_bytes = 0
        self._in_head = True
        self._too_many = False
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Count the connection; beyond the cap, close the oldest one that has not sent a
        request head yet (a client that is slow or silent on purpose), or else this one.
        Start the head's clock."""
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            if not self._unproven:
                transport.abort()
                return
            oldest = next(iter(self._unproven))
            self._unproven.pop(oldest)
            oldest.transport.abort()
        self._unproven[self] = None
        self._arm(self.head_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        """Stop the clock."""
        self._arm(None)
        self._unproven.pop(self, None)
        super().connection_lost(exc)

    def _arm(self, seconds: float | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        if seconds is not None:
            self._deadline = self.loop.call_later(seconds, self._too_slow)

    def _too_slow(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            self.transport.abort()

    def on_message_complete(self) -> None:
        """The request is in: its handler has no deadline here (views have their own)."""
        self._arm(None)
        super().on_message_complete()

    def data_received(self, data: bytes) -> None:
        """Feed the parser, then refuse a head that grew past the limits."""
        super().data_received(data)
        if self._too_many:
            self._refuse()
            return
        if self._in_head:
            self._head_bytes += len(data)
            if self._head_bytes > self.max_head_bytes:
                self._refuse()

    def on_message_begin(self) -> None:
        """A new request: its head starts, and its clock (between requests, uvicorn's
        keep-alive timeout closes an idle connection)."""
        super().on_message_begin()
        self._in_head = True
        self._arm(self.head_timeout_s)

    def on_header(self, name: bytes, value: bytes) -> None:
        """Count header fields."""
        super().on_header(name, value)
        if len(self.headers) > self.max_headers:
            self._too_many = True

    def on_headers_complete(self) -> None:
        """The head is complete: the body (if any) is not counted, but timed."""
        self._in_head = False
        self._head_bytes = 0
        self._unproven.pop(self, None)
        self._arm(self.body_timeout_s)
        if not self._too_many:
            super().on_headers_complete()

    def _refuse(self) -> None:
        if not self.transport.is_closing():
            self.transport.write(_431)
            self.transport.close()
