"""What the test servers and supervisors share: start/stop as a context manager, and
threaded HTTP servers whose handler errors are re-raised in the test."""

from __future__ import annotations

import http.server
import sys
import threading
from types import TracebackType
from typing import Any, TypeVar

__all__ = ["Managed", "RecordsErrors", "ThreadedHttpServer"]

_M = TypeVar("_M", bound="Managed")


class Managed:
    """A context manager around :meth:`start` and :meth:`stop`."""

    def start(self: _M) -> _M:
        """Start; return self."""
        raise NotImplementedError

    def stop(self) -> None:
        """Stop everything started."""
        raise NotImplementedError

    def __enter__(self: _M) -> _M:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class RecordsErrors(Managed):
    """A :class:`Managed` whose background threads record errors with :meth:`_error`;
    :meth:`check` re-raises the first, and so does a clean ``__exit__``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._errors: list[BaseException] = []

    def check(self) -> None:
        """Re-raise the first error that happened in a background thread, if any."""
        with self._lock:
            errors, self._errors = self._errors, []
        if errors:
            raise errors[0]

    def _error(self, exc: BaseException) -> None:
        with self._lock:
            self._errors.append(exc)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        if exc_type is None:
            self.check()


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that resets the connection between requests is the client's business;
        # errors inside handlers are recorded and re-raised in the test instead.
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


class ThreadedHttpServer(RecordsErrors):
    """A ``ThreadingHTTPServer`` on 127.0.0.1 and a free port, served from a thread.

    Errors recorded with :meth:`_error` in handler threads are re-raised by :meth:`check`, and
    on a clean ``__exit__``.
    """

    def __init__(self, host: str, handler: type[http.server.BaseHTTPRequestHandler]) -> None:
        super().__init__()
        self._server = _Server((host, 0), handler)
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        """``http://<host>:<port>``."""
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self: Any) -> Any:
        """Start serving in a background thread."""
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(5)
            self._thread = None
        self._server.server_close()
