"""Listening sockets that outlive the process: the daemon's side of an upgrade that refuses
no connection.

One protocol for every way a socket reaches a new version: systemd's socket activation
(``sd_listen_fds``): the sockets are file descriptors 3, 4, ... with ``LISTEN_FDS=<n>``,
``LISTEN_PID=<the pid they are for>`` and ``LISTEN_FDNAMES=<name>:<name>...``.

* Under systemd with a ``.socket`` unit, systemd passes them, and keeps them open (and queues
  new connections) while the service restarts.
* Under systemd without a ``.socket`` unit, :func:`listeners` given ``store=True`` puts the
  sockets it binds in systemd's file-descriptor store (``FDSTORE=1``; the unit needs
  ``FileDescriptorStoreMax=``), and systemd passes them back, the same way, to the process of
  the next start.
* With :class:`~selfupgrade.ExecRestarter` given ``sockets=``, the process passes its own to the
  version it ``exec``\\ s (same PID), through the guard: :func:`hand_over` does that just before.
* With :class:`~selfupgrade.OverlapRestarter`, the process starts the new version as its child
  with the sockets (:func:`spawn_with`), and leaves once the child is ready.

A daemon asks for its sockets by name with :func:`listeners`: those passed in are taken (and
the ``LISTEN_*`` variables removed, so that its children do not take them too); the others are
bound now. While the listening socket stays open, a client that connects during the upgrade
waits in its backlog instead of being refused.

The old process's side is :class:`DrainingHTTPServer` (for ``http.server`` and
``socketserver`` daemons): :meth:`~DrainingHTTPServer.drain` stops accepting, answers the next
request of each keep-alive connection with ``Connection: close``, and waits for the requests in
flight, so that no request is cut off.

For uvicorn and aiohttp, :class:`UvicornServing` and :class:`AiohttpServing` serve on the
sockets in a thread and drain with the server's own graceful shutdown. Not here: plain asyncio
servers (``loop.create_server(sock=...)`` takes the socket; ``close()`` ends no connection).
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import fcntl
import http.server
import logging
import os
import socket
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

__all__ = [
    "FIRST_FD",
    "LISTEN_PARENT_ENV",
    "AiohttpServing",
    "DrainAwareHandler",
    "DrainingHTTPServer",
    "UvicornServing",
    "hand_over",
    "listeners",
    "spawn_with",
    "store_in_systemd",
]

log = logging.getLogger("selfupgrade.sockets")

FIRST_FD = 3
"""``SD_LISTEN_FDS_START``: the first passed descriptor."""
_LISTEN_KEYS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "SELFUPGRADE_LISTEN_PARENT")


LISTEN_PARENT_ENV = "SELFUPGRADE_LISTEN_PARENT"
"""Set instead of ``LISTEN_PID`` by :func:`spawn_with` (a child's PID is not known before it
exists): the sockets are for the child of that PID."""


def _for_this_process() -> bool:
    if os.environ.get("LISTEN_PID") == str(os.getpid()):
        return True
    return "LISTEN_PID" not in os.environ and os.environ.get(LISTEN_PARENT_ENV) == str(os.getppid())


def _passed() -> dict[str, socket.socket]:
    """The sockets passed to this process, by name (``LISTEN_FDNAMES``; ``fd<N>`` unnamed)."""
    if not _for_this_process():
        return {}
    count = int(os.environ.get("LISTEN_FDS", "0") or 0)
    names = (os.environ.get("LISTEN_FDNAMES") or "").split(":")
    passed = {}
    for i in range(count):
        fd = FIRST_FD + i
        name = names[i] if i < len(names) and names[i] else f"fd{fd}"
        sock = socket.socket(fileno=fd)
        sock.set_inheritable(False)
        passed[name] = sock
    for key in _LISTEN_KEYS:
        os.environ.pop(key, None)
    return passed


def listeners(
    wanted: Mapping[str, tuple[str, int]], *, backlog: int = 1024, store: bool = False
) -> dict[str, socket.socket]:
    """The listening TCP sockets named in ``wanted`` (``{"http": ("127.0.0.1", 8080)}``): the
    ones passed to this process under those names, and the others bound and listening now.

    The sockets are non-blocking (a flag they share with every process that has them): a
    server must wait for a connection (select, poll, an event loop: every ``socketserver``
    and asyncio server does) rather than block in ``accept()``.

    Args:
        wanted: name -> (host, port).
        backlog: for the sockets bound here.
        store: put the sockets bound here in systemd's file-descriptor store
            (:func:`store_in_systemd`), so that the next start of the service gets them.

    Raises:
        OSError: a socket that was not passed could not be bound.
    """
    passed = _passed()
    out = {}
    bound = {}
    for name, address in wanted.items():
        sock = passed.pop(name, None)
        if sock is not None:
            log.info("took the listening socket %r (%s) from the previous process", name, address)
        else:
            sock = socket.create_server(address, backlog=backlog, reuse_port=False)
            bound[name] = sock
        out[name] = sock
    for sock in out.values():
        # during a hand-off two processes accept on the socket: one woken for a connection
        # that the other took must get EAGAIN, not block in accept() (with its requests)
        sock.setblocking(False)
    if store and bound:
        store_in_systemd(bound)
    for name, sock in passed.items():
        log.warning("closing passed socket %r: nobody asked for it", name)
        sock.close()
    return out


def _high_copies(fds: list[int]) -> list[int]:
    """Copies of ``fds`` above the range they are about to be put on (so that putting one on
    3, 4, ... cannot overwrite another before it was moved)."""
    return [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 100) for fd in fds]


def hand_over(sockets: Mapping[str, socket.socket]) -> None:
    """Just before ``exec`` of this very process: put ``sockets`` on descriptors 3, 4, ...,
    inheritable, and set ``LISTEN_*`` for the PID that the exec'd program keeps."""
    spare = _high_copies([s.fileno() for s in sockets.values()])
    for i, fd in enumerate(spare):
        os.dup2(fd, FIRST_FD + i, inheritable=True)
        os.close(fd)
    os.environ["LISTEN_PID"] = str(os.getpid())
    os.environ["LISTEN_FDS"] = str(len(spare))
    os.environ["LISTEN_FDNAMES"] = ":".join(sockets)


def spawn_with(
    argv: list[str],
    sockets: Mapping[str, socket.socket],
    *,
    extra_fds: Sequence[int] = (),
    env: Mapping[str, str] = {},
) -> int:
    """Start ``argv`` (``argv[0]`` a path) as a child with ``sockets`` on descriptors 3, 4,
    ... as :func:`listeners` takes them, then ``extra_fds`` on the next ones; return its PID.
    ``env`` is added to this process's environment for it."""
    spare = _high_copies([*(s.fileno() for s in sockets.values()), *extra_fds])
    child_env = {k: v for k, v in os.environ.items() if k not in _LISTEN_KEYS}
    child_env.update(env)
    child_env.update(
        {
            "LISTEN_FDS": str(len(sockets)),
            "LISTEN_FDNAMES": ":".join(sockets),
            LISTEN_PARENT_ENV: str(os.getpid()),
        }
    )
    try:
        return os.posix_spawn(
            argv[0],
            argv,
            child_env,
            file_actions=[(os.POSIX_SPAWN_DUP2, fd, FIRST_FD + i) for i, fd in enumerate(spare)],
        )
    finally:
        for fd in spare:
            os.close(fd)


def store_in_systemd(sockets: Mapping[str, socket.socket]) -> bool:
    """Send ``sockets`` to systemd's file-descriptor store (``FDSTORE=1`` with ``FDNAME=`` and
    the descriptors as ``SCM_RIGHTS`` on ``$NOTIFY_SOCKET``; ``sdnotify`` cannot send
    descriptors). systemd keeps them while the service restarts (``Restart=``) and passes them
    to the next process as ``LISTEN_FDS``; the unit must allow it with
    ``FileDescriptorStoreMax=`` (systemd ignores them otherwise, and says so in its journal).

    Returns:
        False when not run by systemd (no ``NOTIFY_SOCKET``): nothing was sent.

    Raises:
        OSError: the notification socket refused the message.
    """
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as notify:
        for name, sock in sockets.items():
            message = f"FDSTORE=1\nFDNAME={name}".encode()
            # socket.send_fds drops its address argument before Python 3.13: sendmsg itself
            rights = array.array("i", [sock.fileno()])
            notify.sendmsg([message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)], 0, address)
            log.info("stored the listening socket %r with systemd", name)
    return True


class DrainAwareHandler(http.server.BaseHTTPRequestHandler):
    """A request handler for :class:`DrainingHTTPServer`: HTTP/1.1 with keep-alive; while the
    server drains, each answer says ``Connection: close`` and ends its connection."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms ACK wait
    server: DrainingHTTPServer

    def parse_request(self) -> bool:
        """Mark the connection busy once a request line has come (idle before it)."""
        self.server._mark(self.connection, busy=True)
        return super().parse_request()

    def handle_one_request(self) -> None:
        """One request; the connection counts as idle again once it is answered."""
        try:
            super().handle_one_request()
        finally:
            self.server._mark(self.connection, busy=False)

    def end_headers(self) -> None:
        """Add ``Connection: close`` while the server drains."""
        if self.server.draining.is_set() and not self.close_connection:
            self.send_header("Connection", "close")
        super().end_headers()


class DrainingHTTPServer(http.server.ThreadingHTTPServer):
    """A threading HTTP server on a socket it is given (from :func:`listeners`), which can
    stop without cutting a request off.

    Args:
        sock: the listening socket; :meth:`drain` leaves it open for the next version.
        handler: a :class:`DrainAwareHandler` subclass.
    """

    daemon_threads = True

    def __init__(self, sock: socket.socket, handler: type[DrainAwareHandler]) -> None:
        super().__init__(sock.getsockname()[:2], handler, bind_and_activate=False)
        self.socket.close()
        self.socket = sock
        self.server_address = sock.getsockname()
        self.draining = threading.Event()
        self._open: dict[socket.socket, bool] = {}
        self._changed = threading.Condition()

    def _mark(self, connection: socket.socket, *, busy: bool) -> None:
        with self._changed:
            if connection in self._open:
                self._open[connection] = busy
            self._changed.notify_all()

    def process_request(self, request: Any, client_address: Any) -> None:
        """Count the connection as open (idle) before its thread starts."""
        with self._changed:
            self._open[request] = False
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        """Count the connection as closed."""
        with self._changed:
            self._open.pop(request, None)
            self._changed.notify_all()
        super().shutdown_request(request)

    def server_close(self) -> None:
        """Leave the listening socket open: it belongs to the next version (close it yourself
        when the daemon stops for good)."""

    def drain(self, timeout_s: float = 5.0, idle_grace_s: float = 1.0) -> int:
        """Stop accepting (new connections wait in the backlog), let each keep-alive
        connection make one more request (answered with ``Connection: close``) for
        ``idle_grace_s``, then close the idle ones, and wait up to ``timeout_s`` in all for the
        requests in flight. Call it from another thread than :meth:`serve_forever`'s.

        Returns:
            The connections still open at the end (0 when every request was answered).
        """
        self.draining.set()
        self.shutdown()
        started = time.monotonic()
        with self._changed:
            self._changed.wait_for(lambda: not self._open, timeout=min(idle_grace_s, timeout_s))
            for connection, busy in list(self._open.items()):
                if not busy:
                    with contextlib.suppress(OSError):
                        connection.shutdown(socket.SHUT_RDWR)
            left = max(0.0, timeout_s - (time.monotonic() - started))
            self._changed.wait_for(lambda: not self._open, timeout=left)
            still = len(self._open)
        if still:
            log.warning("drained with %d connection(s) still open after %g s", still, timeout_s)
        return still


_S = TypeVar("_S", bound="_ServingInThread")


class _ServingInThread:
    """An asyncio server on duplicates of listening sockets, in a thread with its own event
    loop, and the drain of a hand-off: stop accepting, wait ``accept_grace_s`` so that
    connections accepted a moment before have sent their request (the servers below end idle
    connections at once when they shut down, and a request on its way would meet a reset),
    then the server's own graceful shutdown. Subclasses say how to serve and shut down.

    Accepting stops by taking the listening sockets out of the loop's selector, not by closing
    the server: asyncio accepts a connection in one callback and makes its transport in a task
    of the next loop iteration, and a server closed in between drops that connection without
    a word (``Server._attach`` asserts that the server is open; the socket is left to the
    garbage collector, and the client meets a reset a while later: 1 request in 4,000 under
    300 requests/s, uvicorn and aiohttp alike). The server is closed by its own shutdown."""

    name = "server"

    def __init__(self, sockets: Sequence[socket.socket], accept_grace_s: float) -> None:
        # socket.dup() would copy the Python timeout, and so reset the shared O_NONBLOCK;
        # the servers close the sockets they are given when they stop: the originals stay
        self._sockets = [socket.socket(fileno=os.dup(sock.fileno())) for sock in sockets]
        self._grace_s = accept_grace_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)

    def _run(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            await self._serve()

        asyncio.run(main())

    async def _serve(self) -> None:
        raise NotImplementedError

    def _started(self) -> bool:
        raise NotImplementedError

    async def _stop_accepting(self) -> None:
        loop = asyncio.get_running_loop()
        for sock in self._sockets:
            if not loop.remove_reader(sock.fileno()):
                raise RuntimeError(
                    f"{self.name}: its event loop ({type(loop).__name__}) does not accept "
                    "through a reader on the listening socket; run it on asyncio's own loop"
                )

    def _shut_down(self) -> None:
        raise NotImplementedError

    def start(self: _S, timeout_s: float = 30.0) -> _S:
        """Start serving; return once the server accepts.

        Raises:
            RuntimeError: it did not start within ``timeout_s`` (its log says why).
        """
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._started() and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not self._started():
            raise RuntimeError(f"{self.name} did not start; see its log")
        return self

    def drain(self, timeout_s: float = 10.0) -> bool:
        """Stop accepting, then shut the server down gracefully; wait at most ``timeout_s``
        in all. ``True`` when it ended."""
        started = time.monotonic()
        loop = self._loop
        if loop is not None and self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self._stop_accepting(), loop).result(timeout_s)
            time.sleep(self._grace_s)
            loop.call_soon_threadsafe(self._shut_down)
        self._thread.join(max(0.0, timeout_s - (time.monotonic() - started)))
        return not self._thread.is_alive()


class UvicornServing(_ServingInThread):
    """A ``uvicorn.Server`` serving on sockets from :func:`listeners`, in a thread, with a
    drain for a restarter (``before_exec=serving.drain``, ``drain=serving.drain``): uvicorn's
    graceful shutdown lets the requests in flight finish (its ``timeout_graceful_shutdown``)
    and runs the app's lifespan shutdown. An idle keep-alive connection is ended without a
    ``Connection: close`` first: HTTP clients send their next request again on a new
    connection (RFC 9112, section 9.3.1).

    Args:
        server: a ``uvicorn.Server`` (uvicorn is in the ``server`` extra).
        sockets: the listening sockets.
        accept_grace_s: the wait between the end of accepting and the shutdown.
    """

    name = "uvicorn"

    def __init__(
        self, server: Any, sockets: Sequence[socket.socket], *, accept_grace_s: float = 0.3
    ) -> None:
        super().__init__(sockets, accept_grace_s)
        self.server = server

    async def _serve(self) -> None:
        await self.server.serve(sockets=self._sockets)

    def _started(self) -> bool:
        return bool(self.server.started)

    def _shut_down(self) -> None:
        self.server.should_exit = True


class AiohttpServing(_ServingInThread):
    """An ``aiohttp.web.Application`` served on sockets from :func:`listeners`, in a thread,
    with a drain for a restarter: aiohttp's graceful shutdown (``AppRunner.cleanup``) ends
    idle keep-alive connections, waits up to ``shutdown_timeout`` for the handlers in flight,
    and runs the app's cleanup. Like uvicorn, it ends an idle keep-alive connection at once.

    Args:
        app: the application (aiohttp is not a dependency of selfupgrade: install it).
        sockets: the listening sockets.
        shutdown_timeout: for the handlers in flight.
        accept_grace_s: the wait between the end of accepting and the shutdown.
    """

    name = "aiohttp"

    def __init__(
        self,
        app: Any,
        sockets: Sequence[socket.socket],
        *,
        shutdown_timeout: float = 10.0,
        accept_grace_s: float = 0.3,
    ) -> None:
        super().__init__(sockets, accept_grace_s)
        self.app = app
        self._shutdown_timeout = shutdown_timeout
        self._serving = False
        self._stop: asyncio.Event | None = None

    async def _serve(self) -> None:
        from aiohttp import web

        self._stop = asyncio.Event()
        runner = web.AppRunner(self.app, handle_signals=False)
        await runner.setup()
        try:
            for sock in self._sockets:
                site = web.SockSite(runner, sock, shutdown_timeout=self._shutdown_timeout)
                await site.start()
            self._serving = True
            await self._stop.wait()
        finally:
            await runner.cleanup()

    def _started(self) -> bool:
        return self._serving

    def _shut_down(self) -> None:
        if self._stop is not None:
            self._stop.set()
