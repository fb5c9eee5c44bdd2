"""The Store role of the control plane: where tasks, leases and the fleet view live.

Two implementations: :class:`~selfupgrade.server.sqlite.SqliteStore` (embedded, one hbs
process, survives restarts) and :class:`~selfupgrade.server.redis.RedisStore` (several hbs
processes share the task, the leases and the limit). :class:`~selfupgrade.server.memory.MemoryStore`
keeps everything in memory, for tests and the fleet simulator.

Contract: :meth:`Store.apply` carries out one :class:`~selfupgrade.server.core.Decision`
*atomically* and re-checks its preconditions inside the atomic step (the decision was made on a
read that may be stale): ``ADMIT`` takes a slot only if the task is active, the host holds none,
is not done or given up on, and fewer than ``max_in_flight`` leases are live after expired
ones were swept; ``COMPLETE`` and ``FAIL`` are idempotent. Stores raise
:class:`StoreError` when the backend fails; the control plane then answers "nothing", never
"upgrade" (it fails closed).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol, runtime_checkable

from ..errors import RetryLater
from .core import Decision
from .tasks import HostProgress, HostSeen, Task, TaskCounters

__all__ = ["Store", "StoreError"]


class StoreError(RetryLater):
    """The store's backend failed (a database error, Redis unreachable)."""


@runtime_checkable
class Store(Protocol):
    """Tasks, per-host progress and leases, and the last heartbeat of every host."""

    def publish(self, task: Task) -> None:
        """Make ``task`` the active task; a previous active task is cancelled, its slots freed."""

    def active_task(self) -> Task | None:
        """The active task, if any."""

    def task(self, task_id: str) -> Task | None:
        """Any stored task by id."""

    def cancel(self, task_id: str) -> bool:
        """Cancel a task and free its slots; ``False`` if it was not active."""

    def counters(self, task_id: str, now: float) -> TaskCounters:
        """The task's status and counts (expired leases swept first)."""

    def progress(self, task_id: str, host: str) -> HostProgress | None:
        """What the store knows of ``host`` in the task."""

    def apply(
        self, task: Task, host: str, decision: Decision, *, failures: int, now: float
    ) -> bool:
        """Carry out ``decision`` atomically; return whether the host should get the order.

        Args:
            failures: the host's own failure count from its heartbeat (kept at admission).
        """

    def sweep(self, task: Task, now: float) -> int:
        """Expire leases whose time has passed (each counts as a failed attempt)."""

    def all_progress(self, task_id: str) -> list[HostProgress]:
        """Every host's progress in the task."""

    def save_hosts(self, seen: Iterable[HostSeen]) -> None:
        """Record the latest heartbeat of these hosts."""

    def hosts(self) -> dict[str, HostSeen]:
        """The latest heartbeat of every host."""

    def close(self) -> None:
        """Release connections and files."""
