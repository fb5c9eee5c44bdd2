"""A store in memory, and the transition rules every store follows.

:func:`transition` is the pure rule that turns a decision into a new host progress and counter
changes, with the preconditions re-checked (see :mod:`selfupgrade.server.store`).
:class:`MemoryStore` applies it under a lock; :class:`~selfupgrade.server.sqlite.SqliteStore`
builds on it and writes every change through to SQLite; the Redis store runs the same rules in
a Lua script.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from .core import Action, Decision, retry_at
from .tasks import HostProgress, HostSeen, Task, TaskCounters

__all__ = ["Effect", "MemoryStore", "transition"]


@dataclass(frozen=True)
class Effect:
    """The result of one transition.

    Attributes:
        progress: the host's new progress, or ``None`` when nothing changed.
        send: send the order to the host.
        done, failed, failures: changes to the task's counters.
        in_flight: change to the number of slots held (+1 taken, -1 released).
    """

    progress: HostProgress | None = None
    send: bool = False
    done: int = 0
    failed: int = 0
    failures: int = 0
    in_flight: int = 0


NO_EFFECT = Effect()


def transition(
    task: Task,
    current: HostProgress | None,
    decision: Decision,
    *,
    host: str,
    failures: int,
    now: float,
    in_flight: int,
    active: bool,
) -> Effect:
    """Apply ``decision`` to ``current``; see the contract in :mod:`selfupgrade.server.store`.

    Args:
        in_flight: live leases of the task *after* expired ones were swept.
        active: the task is active (not cancelled or halted).
    """
    action = decision.action
    admitted = current is not None and current.state == "admitted"
    lease = now + task.limits.lease_s
    if action == Action.ADMIT:
        if not active or in_flight >= task.limits.max_in_flight:
            return NO_EFFECT
        if current is not None and current.state != "backoff":
            return NO_EFFECT
        if current is not None and now < current.next_try_at:
            return NO_EFFECT
        progress = HostProgress(
            host=host,
            state="admitted",
            attempts=current.attempts if current is not None else 0,
            lease_until=lease,
            failures_at_admit=failures,
        )
        return Effect(progress=progress, send=True, in_flight=1)
    if action == Action.RESEND:
        if not admitted or not active:
            return NO_EFFECT
        assert current is not None
        return Effect(progress=replace(current, lease_until=lease), send=True)
    if action == Action.RENEW:
        if not admitted:
            return NO_EFFECT
        assert current is not None
        return Effect(progress=replace(current, lease_until=lease, started=True))
    if action == Action.COMPLETE:
        if current is not None and current.state == "done":
            return NO_EFFECT
        return Effect(
            progress=HostProgress(
                host=host, state="done", attempts=current.attempts if current else 0
            ),
            done=1,
            failed=-1 if current is not None and current.state == "failed" else 0,
            in_flight=-1 if admitted else 0,
        )
    if action == Action.FAIL:
        if not admitted:
            return NO_EFFECT
        assert current is not None
        return _failed(task, current, decision.reason, now)
    return NO_EFFECT


def _failed(task: Task, current: HostProgress, reason: str, now: float) -> Effect:
    attempts = current.attempts + 1
    final = attempts >= task.limits.max_attempts
    progress = HostProgress(
        host=current.host,
        state="failed" if final else "backoff",
        attempts=attempts,
        next_try_at=0.0 if final else retry_at(task, attempts, now),
        reason=reason[:500],
    )
    return Effect(progress=progress, failed=1 if final else 0, failures=1, in_flight=-1)


@dataclass
class _TaskRecord:
    task: Task
    status: str = "active"
    halt_reason: str = ""
    done: int = 0
    failed: int = 0
    failures: int = 0
    progress: dict[str, HostProgress] = field(default_factory=dict)
    leases: dict[str, float] = field(default_factory=dict)


class MemoryStore:
    """Everything in memory, guarded by one lock. For tests and the fleet simulator.

    Subclasses persist changes by overriding :meth:`_persist`.
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._tasks: dict[str, _TaskRecord] = {}
        self._active: str | None = None
        self._hosts: dict[str, HostSeen] = {}
        self._released: list[str] = []

    # ---- tasks ---------------------------------------------------------------------------

    def publish(self, task: Task) -> None:
        """Make ``task`` the active one, cancelling the previous active task."""
        with self._lock:
            previous = self._active
            if previous is not None and previous != task.id and self._cancel_locked(previous):
                self._persist(previous, hosts=self._released)
            self._tasks[task.id] = _TaskRecord(task)
            self._active = task.id
            self._persist(task.id, hosts=())

    def active_task(self) -> Task | None:
        """The active task, if any."""
        with self._lock:
            if self._active is None:
                return None
            record = self._tasks[self._active]
            return record.task

    def task(self, task_id: str) -> Task | None:
        """A stored task by id."""
        with self._lock:
            record = self._tasks.get(task_id)
            return record.task if record else None

    def cancel(self, task_id: str) -> bool:
        """Cancel the task and free its slots."""
        with self._lock:
            if self._cancel_locked(task_id):
                self._persist(task_id, hosts=self._released)
                return True
            return False

    def _cancel_locked(self, task_id: str) -> bool:
        record = self._tasks.get(task_id)
        if record is None or record.status not in ("active", "halted"):
            return False
        record.status = "cancelled"
        released = list(record.leases)
        for host in released:
            record.progress[host] = replace(record.progress[host], state="backoff", lease_until=0.0)
        record.leases.clear()
        if self._active == task_id:
            self._active = None
        self._released = released
        return True

    def counters(self, task_id: str, now: float) -> TaskCounters:
        """Status and counts of the task (sweeps expired leases first)."""
        with self._lock:
            record = self._tasks.get(task_id)
            if record is None:
                return TaskCounters(status="cancelled")
            self._sweep_locked(record, now)
            return TaskCounters(
                status=record.status,  # type: ignore[arg-type]
                in_flight=len(record.leases),
                done=record.done,
                failed=record.failed,
                failures=record.failures,
                halt_reason=record.halt_reason,
            )

    # ---- hosts in a task -----------------------------------------------------------------

    def progress(self, task_id: str, host: str) -> HostProgress | None:
        """What is known of ``host`` in the task."""
        with self._lock:
            record = self._tasks.get(task_id)
            return record.progress.get(host) if record else None

    def all_progress(self, task_id: str) -> list[HostProgress]:
        """Every host's progress in the task."""
        with self._lock:
            record = self._tasks.get(task_id)
            return list(record.progress.values()) if record else []

    def apply(
        self, task: Task, host: str, decision: Decision, *, failures: int, now: float
    ) -> bool:
        """Carry out ``decision`` atomically (under the lock)."""
        if decision.action == Action.NOTHING:
            return False
        with self._lock:
            record = self._tasks.get(task.id)
            if record is None:
                return False
            changed: list[str] = []
            if decision.action == Action.ADMIT:
                changed += self._sweep_locked(record, now, persist=False)
            effect = transition(
                task,
                record.progress.get(host),
                decision,
                host=host,
                failures=failures,
                now=now,
                in_flight=len(record.leases),
                active=record.status == "active",
            )
            if effect.progress is not None:
                self._apply_effect(record, effect)
                changed.append(host)
            if changed:
                self._persist(task.id, hosts=changed)
            return effect.send

    def sweep(self, task: Task, now: float) -> int:
        """Expire leases that ran out."""
        with self._lock:
            record = self._tasks.get(task.id)
            return len(self._sweep_locked(record, now)) if record else 0

    def _sweep_locked(self, record: _TaskRecord, now: float, *, persist: bool = True) -> list[str]:
        expired = [h for h, until in record.leases.items() if until <= now]
        for host in expired:
            effect = _failed(record.task, record.progress[host], "no news within the lease", now)
            self._apply_effect(record, effect)
        if expired and persist:
            self._persist(record.task.id, hosts=expired)
        return expired

    def _apply_effect(self, record: _TaskRecord, effect: Effect) -> None:
        assert effect.progress is not None
        progress = effect.progress
        record.progress[progress.host] = progress
        if progress.state == "admitted":
            record.leases[progress.host] = progress.lease_until
        else:
            record.leases.pop(progress.host, None)
        record.done += effect.done
        record.failed += effect.failed
        record.failures += effect.failures
        limit = record.task.limits.failure_limit
        if record.status == "active" and effect.failures and record.failures >= limit:
            record.status = "halted"
            record.halt_reason = (
                f"{record.failures} failed attempts reached the failure limit of {limit}"
            )

    # ---- the fleet view ------------------------------------------------------------------

    def save_hosts(self, seen: Iterable[HostSeen]) -> None:
        """Record the latest heartbeats."""
        with self._lock:
            batch = list(seen)
            for s in batch:
                self._hosts[s.host] = s
            self._persist_hosts(batch)

    def hosts(self) -> dict[str, HostSeen]:
        """The latest heartbeat of every host."""
        with self._lock:
            return dict(self._hosts)

    # ---- persistence hooks ---------------------------------------------------------------

    def _persist(self, task_id: str, *, hosts: Iterable[str]) -> None:
        """Called under the lock after a task or some of its hosts changed."""

    def _persist_hosts(self, seen: list[HostSeen]) -> None:
        """Called under the lock after heartbeats were recorded."""

    def close(self) -> None:
        """Nothing to release."""
