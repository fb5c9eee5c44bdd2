"""A TCP proxy on 127.0.0.1 that makes a network misbehave: added delay, connections reset,
stalls, and a partition switched on and off.

::

    with FaultProxy(("127.0.0.1", hbs_port), latency_s=0.2, reset_fraction=0.05) as proxy:
        agent_url = f"http://127.0.0.1:{proxy.port}"   # the agents talk to hbs through it
        ...
        proxy.partition(True)    # from now on no byte crosses, in either direction
        time.sleep(30)
        proxy.partition(False)   # what was held goes on, as TCP would retransmit it

What each fault does, per connection (the proxy accepts, dials the target, and forwards each
direction as a stream of chunks):

* ``latency_s``: every chunk is forwarded that long after it arrived (a one-way delay each
  way, so a request and its answer take twice it more; the rate is not capped);
* ``reset_fraction``: that fraction of the connections is reset (an RST both ways, through
  ``SO_LINGER`` 0) after a random number of bytes between 0 and ``reset_within_bytes``,
  so some die before the first byte and some midway;
* ``partition(True)``: nothing is forwarded, on open connections or on new ones, which are
  accepted and held (a loopback cannot drop a SYN; to the client, a connection that never
  answers is what a partition looks like). ``partition(False)`` lets the held bytes through;
* ``stall(True)``: the same for the connections already open only; new ones work.

The proxy never sends a packet off 127.0.0.1: it listens there and dials only ``target``,
which must be a loopback address. It runs on one event-loop thread; :meth:`stop` closes every
connection and the thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import random
import socket
import struct
import threading
from dataclasses import dataclass

from ._base import RecordsErrors

__all__ = ["FaultProxy", "ProxyStats"]


@dataclass
class ProxyStats:
    """What the proxy did so far.

    Attributes:
        connections: connections accepted.
        resets: connections it reset on purpose.
        refused: connections whose target refused or failed to answer the dial.
        bytes_forwarded: bytes passed on, both directions together.
    """

    connections: int = 0
    resets: int = 0
    refused: int = 0
    bytes_forwarded: int = 0


class FaultProxy(RecordsErrors):
    """Forwards ``127.0.0.1:<port>`` to ``target`` with faults; a context manager.

    Args:
        target: the ``(host, port)`` to forward to; a loopback address.
        latency_s: added delay per chunk and direction.
        reset_fraction: the fraction of connections reset, between 0 and 1.
        reset_within_bytes: a reset connection dies after a random number of bytes up to this.
        seed: for the random choice of the connections reset.
        port: the port to listen on; a free one by default.

    Raises:
        ValueError: a target off loopback, or a fraction outside [0, 1].
    """

    def __init__(
        self,
        target: tuple[str, int],
        *,
        latency_s: float = 0.0,
        reset_fraction: float = 0.0,
        reset_within_bytes: int = 4096,
        seed: int | None = None,
        port: int = 0,
    ) -> None:
        super().__init__()
        if not ipaddress.ip_address(target[0]).is_loopback:
            raise ValueError(f"the proxy forwards only to loopback addresses, not {target[0]}")
        if not 0.0 <= reset_fraction <= 1.0 or latency_s < 0 or reset_within_bytes < 0:
            raise ValueError("reset_fraction must be in [0, 1], latency and bytes >= 0")
        self.target = target
        self.latency_s = latency_s
        self.reset_fraction = reset_fraction
        self.reset_within_bytes = reset_within_bytes
        self.stats = ProxyStats()
        self._random = random.Random(seed)
        self._port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()
        self._flowing: asyncio.Event | None = None  # set when no partition is on
        self._partitioned = False
        self._stall_before = -1  # connections numbered below this are stalled
        self._numbered = 0

    @property
    def port(self) -> int:
        """The port the proxy listens on."""
        if self._server is None:
            raise RuntimeError("the proxy is not started")
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def address(self) -> str:
        """``127.0.0.1:<port>``."""
        return f"127.0.0.1:{self.port}"

    def start(self) -> FaultProxy:
        """Listen and start forwarding; return self."""
        ready = threading.Event()
        self._loop = asyncio.new_event_loop()

        def run() -> None:
            assert self._loop is not None
            asyncio.set_event_loop(self._loop)
            self._flowing = asyncio.Event()
            self._flowing.set()
            try:
                self._server = self._loop.run_until_complete(
                    asyncio.start_server(self._accept, "127.0.0.1", self._port, backlog=1024)
                )
            except BaseException as exc:
                self._error(exc)
                ready.set()
                return
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="fault-proxy", daemon=True)
        self._thread.start()
        ready.wait(10)
        self.check()
        return self

    def stop(self) -> None:
        """Close every connection and the listening socket; end the thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return

        async def close() -> None:
            if self._server is not None:
                self._server.close()
            for writer in list(self._open):
                writer.transport.abort()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(RuntimeError):
            asyncio.run_coroutine_threadsafe(close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
        self._loop = self._thread = None

    def partition(self, on: bool) -> None:
        """Switch the partition on (nothing crosses, on any connection) or off."""
        self._call(lambda: self._set_partition(on))

    def stall(self, on: bool) -> None:
        """Hold every connection open now (``True``) while new ones flow; ``False`` ends it."""
        self._call(lambda: setattr(self, "_stall_before", self._numbered if on else -1))

    @property
    def partitioned(self) -> bool:
        """Whether the partition is on."""
        return self._partitioned

    def _call(self, fn: object) -> None:
        if self._loop is None:
            raise RuntimeError("the proxy is not started")
        done = threading.Event()

        def run() -> None:
            try:
                fn()  # type: ignore[operator]
            finally:
                done.set()

        self._loop.call_soon_threadsafe(run)
        done.wait(10)

    def _set_partition(self, on: bool) -> None:
        assert self._flowing is not None
        self._partitioned = on
        if on:
            self._flowing.clear()
        else:
            self._flowing.set()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        number = self._numbered
        self._numbered += 1
        self.stats.connections += 1
        self._open.add(writer)
        budget = (
            self._random.randint(0, self.reset_within_bytes)
            if self._random.random() < self.reset_fraction
            else None
        )
        upstream: asyncio.StreamWriter | None = None
        try:
            await self._wait_flowing(number)
            try:
                up_reader, up_writer = await asyncio.wait_for(
                    asyncio.open_connection(*self.target), timeout=10
                )
            except (OSError, asyncio.TimeoutError):
                self.stats.refused += 1
                _reset(writer)
                return
            upstream = up_writer
            self._open.add(up_writer)
            left = [budget]  # shared by both directions: the reset comes after that many bytes
            both = (writer, up_writer)
            await asyncio.gather(
                self._pump(reader, up_writer, number, left, both),
                self._pump(up_reader, writer, number, left, both),
            )
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass  # the proxy stops: end quietly
        finally:
            for w in (writer, upstream):
                if w is not None:
                    self._open.discard(w)
                    w.transport.abort()

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        number: int,
        left: list[int | None],
        both: tuple[asyncio.StreamWriter, asyncio.StreamWriter],
    ) -> None:
        """One direction: chunks are read as they come and each is written ``latency_s``
        after it was read (a delay, not a cap on the rate: reading goes on meanwhile)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(maxsize=256)

        async def read() -> None:
            while chunk := await reader.read(65536):
                await queue.put((loop.time() + self.latency_s, chunk))
            await queue.put((loop.time() + self.latency_s, b""))

        async def write() -> None:
            while True:
                due, chunk = await queue.get()
                if (wait := due - loop.time()) > 0:
                    await asyncio.sleep(wait)
                await self._wait_flowing(number)
                if not chunk:
                    if writer.can_write_eof():
                        writer.write_eof()  # a half-close is passed on, as TCP would
                    return
                budget = left[0]
                if budget is not None and len(chunk) >= budget:
                    if budget:
                        writer.write(chunk[:budget])
                    self.stats.resets += 1
                    for w in both:
                        _reset(w)
                    return
                if budget is not None:
                    left[0] = budget - len(chunk)
                writer.write(chunk)
                self.stats.bytes_forwarded += len(chunk)
                await writer.drain()

        reading = asyncio.ensure_future(read())
        try:
            await write()
        except (ConnectionError, OSError):
            for w in both:
                w.transport.abort()
        finally:
            reading.cancel()
            with contextlib.suppress(BaseException):
                await reading

    async def _wait_flowing(self, number: int) -> None:
        assert self._flowing is not None
        while not self._flowing.is_set() or number < self._stall_before:
            if not self._flowing.is_set():
                await self._flowing.wait()
            else:
                await asyncio.sleep(0.05)


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with an RST rather than a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
