"""Heartbeats from an event loop to the control plane, in batches, off the loop, on time.

:class:`HeartbeatBatcher` is how the HTTP route and the falcon JSON-RPC listener call
:meth:`~selfupgrade.server.plane.ControlPlane.answer`: heartbeats that arrive while a batch is
being answered wait for the next one, so under load a batch of many heartbeats costs one read
and one commit (one or two round trips to Redis, one SQLite transaction). Batches run one at a
time on a worker thread of their own, never on the event loop; each heartbeat waits at most
``deadline_s`` for its answer, and is answered "no order" when the store takes longer (it asks
again at its next heartbeat). A stalled store therefore delays nothing but heartbeats, and
those by at most the deadline.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from ..models import Heartbeat
from .plane import Reply

__all__ = ["HeartbeatBatcher"]

log = logging.getLogger("selfupgrade.server")


class HeartbeatBatcher:
    """Batches heartbeats for ``answer`` (a control plane's :meth:`answer`).

    Args:
        answer: answers a batch of heartbeats, one reply each, in order.
        deadline_s: the longest a heartbeat waits for its reply.
        max_batch: heartbeats answered together at most.
        max_waiting: heartbeats that may wait at once; more are answered "no order" at once.
    """

    def __init__(
        self,
        answer: Callable[[Sequence[Heartbeat]], list[Reply]],
        *,
        deadline_s: float = 1.0,
        max_batch: int = 512,
        max_waiting: int = 20_000,
    ) -> None:
        self._answer = answer
        self.deadline_s = deadline_s
        self._max_batch = max_batch
        self._max_waiting = max_waiting
        # (heartbeat, its future, when it arrived), in arrival order
        self._waiting: list[tuple[Heartbeat, asyncio.Future[Reply], float]] = []
        self._running: list[tuple[Heartbeat, asyncio.Future[Reply], float]] = []
        self._watchdog: asyncio.TimerHandle | None = None
        self._draining = False
        self._drainer: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._late = Reply(error=f"the store did not answer within {deadline_s:g} s")
        self._busy = Reply(error="too many heartbeats are waiting for the store")

    async def answer(self, beat: Heartbeat) -> Reply:
        """The reply to ``beat``, within :attr:`deadline_s`."""
        if len(self._waiting) >= self._max_waiting:
            return self._busy
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Reply] = loop.create_future()
        self._waiting.append((beat, future, loop.time()))
        if not self._draining:
            self._draining = True
            self._drainer = loop.create_task(self._drain(loop))
        return await future

    def _watch(self, loop: asyncio.AbstractEventLoop) -> None:
        """Answer "no order" to every heartbeat that has waited its deadline (those of the
        batch being answered, and those waiting for the next); runs every tenth of the deadline
        while batches are being answered, one timer for all of them."""
        too_old = loop.time() - self.deadline_s
        for items in (self._running, self._waiting):
            for _, future, since in items:
                if since > too_old:
                    break  # in arrival order: the rest are younger
                if not future.done():
                    future.set_result(self._late)
        self._watchdog = loop.call_later(self.deadline_s / 10, self._watch, loop)

    async def _drain(self, loop: asyncio.AbstractEventLoop) -> None:
        self._watchdog = loop.call_later(self.deadline_s / 10, self._watch, loop)
        try:
            while self._waiting:
                taken = self._waiting[: self._max_batch]
                del self._waiting[: self._max_batch]
                # those answered "late" already are not sent to the store
                self._running = [item for item in taken if not item[1].done()]
                if not self._running:
                    continue
                beats = [b for b, _, _ in self._running]
                if self._executor is None:
                    self._executor = ThreadPoolExecutor(1, thread_name_prefix="hbs-heartbeats")
                try:
                    replies = await loop.run_in_executor(self._executor, self._answer, beats)
                except Exception:
                    log.exception("answering %d heartbeat(s) failed", len(beats))
                    replies = [Reply(error="internal error")] * len(beats)
                for (_, future, _), reply in zip(self._running, replies, strict=True):
                    if not future.done():
                        future.set_result(reply)
                self._running = []
        finally:
            self._draining = False
            if self._watchdog is not None:
                self._watchdog.cancel()

    def close(self) -> None:
        """Stop the worker thread (after the batch it is answering, if any); a heartbeat
        answered later starts a new one."""
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
