"""Limits on request heads for uvicorn's httptools protocol (``selfupgrade[server]``).

httptools keeps a request's headers in memory until the head is complete and has no limit of
its own: one connection sending a 200 MB header made an unbounded hbs grow by 300 MB (measured
here). :class:`BoundedHttpToolsProtocol` answers ``431`` and closes the connection once a
request's head exceeds ``max_head_bytes`` or ``max_headers``. Use it as uvicorn's ``http``
protocol class (``examples/hbs_server`` does).
"""

from __future__ import annotations

from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["BoundedHttpToolsProtocol"]

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

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_bytes = 0
        self._in_head = True
        self._too_many = False

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
        """A new request: its head starts."""
        super().on_message_begin()
        self._in_head = True

    def on_header(self, name: bytes, value: bytes) -> None:
        """Count header fields."""
        super().on_header(name, value)
        if len(self.headers) > self.max_headers:
            self._too_many = True

    def on_headers_complete(self) -> None:
        """The head is complete: the body (if any) is not counted."""
        self._in_head = False
        self._head_bytes = 0
        if not self._too_many:
            super().on_headers_complete()

    def _refuse(self) -> None:
        if not self.transport.is_closing():
            self.transport.write(_431)
            self.transport.close()
