"""The Store role of the control plane: where rollouts, leases and the fleet view live.

Two implementations: :class:`~selfupgrade.server.sqlite.SqliteStore` (embedded, one hbs
process, survives restarts) and :class:`~selfupgrade.server.redis.RedisStore` (several hbs
processes share rollouts, leases and limits). :class:`~selfupgrade.server.memory.MemoryStore`
keeps everything in memory, for tests and the fleet simulator.

Contract: :meth:`Store.apply` carries out one :class:`~selfupgrade.server.core.Decision`
*atomically* and re-checks its preconditions inside the atomic step (the decision was made on
reads that may be stale): ``ADMIT`` takes a slot only if the rollout admits (``active``, or
``complete`` for late joiners), the host's wave has started, the host holds no slot, is not
done or given up on, and fewer than the current wave's ``max_in_flight`` leases are live after
expired ones were swept; ``COMPLETE`` and ``FAIL`` are idempotent; a failure that takes its
wave over the failure budget halts the rollout in the same step. :meth:`Store.step` and
:meth:`Store.set_status` are compare-and-set. Stores raise :class:`StoreError` when the
backend fails; the control plane then answers "nothing", never "upgrade" (it fails closed).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Protocol, runtime_checkable

from ..errors import RetryLater
from .core import Decision, Step
from .tasks import HostProgress, HostSeen, Task, TaskCounters, TaskStatus

__all__ = ["Store", "StoreError"]


class StoreError(RetryLater):
    """The store's backend failed (a database error, Redis unreachable)."""


@runtime_checkable
class Store(Protocol):
    """Rollouts, per-host progress and leases, and the last heartbeat of every host."""

    def publish(self, task: Task, members: Mapping[str, int] | None = None) -> None:
        """Make ``task`` the active rollout with ``members`` (host -> wave); the previous one
        is cancelled and its slots freed."""

    def active_task(self) -> Task | None:
        """The active rollout, if any."""

    def task(self, task_id: str) -> Task | None:
        """Any stored rollout by id."""

    def tasks(self) -> list[Task]:
        """Every stored rollout, newest first."""

    def cancel(self, task_id: str) -> bool:
        """Abort the rollout, free its slots, and make it no longer the active one."""

    def set_status(self, task_id: str, status: TaskStatus, reason: str) -> bool:
        """Pause, resume or abort; ``False`` when not allowed from the current status."""

    def step(self, task_id: str, step: Step) -> bool:
        """Bake, promote or complete, if the rollout is still where the step was computed."""

    def counters(self, task_id: str, now: float) -> TaskCounters:
        """The rollout's status and counts (expired leases swept first)."""

    def host_state(self, task_id: str, host: str) -> tuple[HostProgress | None, int | None]:
        """The host's progress and wave (``None`` when it is not part of the rollout)."""

    def progress(self, task_id: str, host: str) -> HostProgress | None:
        """What the store knows of ``host`` in the rollout."""

    def members(self, task_id: str) -> dict[str, int]:
        """Every member of the rollout and its wave."""

    def join(self, task_id: str, host: str, wave: int) -> None:
        """Add a host that appeared after the rollout started."""

    def apply(
        self,
        task: Task,
        host: str,
        decision: Decision,
        *,
        failures: int,
        now: float,
        wave: int | None = None,
    ) -> bool:
        """Carry out ``decision`` atomically; return whether the host should get the order.

        Args:
            failures: the host's own failure count from its heartbeat (kept at admission).
            now: the time of the heartbeat.
            wave: the host's wave, as read with :meth:`host_state`.
        """

    def sweep(self, task: Task, now: float) -> int:
        """Expire leases whose time has passed (each counts as a failed attempt)."""

    def all_progress(self, task_id: str) -> list[HostProgress]:
        """Every host's progress in the rollout."""

    def mark_bad(self, version: str, reason: str) -> None:
        """Record that no later rollout may install ``version``."""

    def bad_versions(self) -> dict[str, str]:
        """Versions marked bad, with why."""

    def save_hosts(self, seen: Iterable[HostSeen]) -> None:
        """Record the latest heartbeat of these hosts."""

    def hosts(self) -> dict[str, HostSeen]:
        """The latest heartbeat of every host."""

    def close(self) -> None:
        """Release connections and files."""
