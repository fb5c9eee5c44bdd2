"""A store in memory, and the transition rules every store follows.

:func:`transition` is the pure rule that turns a decision into a new host progress and counter
changes, with the preconditions re-checked (see :mod:`selfupgrade.server.store`).
:class:`MemoryStore` applies it under a lock; :class:`~selfupgrade.server.sqlite.SqliteStore`
builds on it and writes every change through to SQLite; the Redis store runs the same rules in
a Lua script.
"""

from __future__ import annotations

import heapq
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from .core import Action, Decision, Step, retry_at
from .tasks import HostProgress, HostSeen, Task, TaskCounters, TaskStatus, WaveCounters

__all__ = ["STATUS_CHANGES", "Effect", "MemoryStore", "transition"]

STATUS_CHANGES: Mapping[TaskStatus, frozenset[str]] = {
    "paused": frozenset({"active"}),
    "active": frozenset({"paused", "halted"}),
    "aborted": frozenset({"active", "paused", "halted", "complete"}),
}
"""For each status an operator may set, the statuses it may be set from."""

ADMITTING = frozenset({"active", "complete"})
"""Statuses in which hosts of started waves are admitted (``complete``: late joiners)."""


@dataclass(frozen=True, slots=True)
class Effect:
    """The result of one transition.

    Attributes:
        progress: the host's new progress, or ``None`` when nothing changed.
        send: send the order to the host.
        done, failed, failures: changes to the task's counters (and to the host's wave's).
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
    status: str,
    host_wave: int | None,
    current_wave: int,
) -> Effect:
    """Apply ``decision`` to ``current``; see the contract in :mod:`selfupgrade.server.store`.

    Args:
        in_flight: live leases of the task *after* expired ones were swept.
        status: the rollout's status.
        host_wave: the host's wave (``None``: not part of the rollout).
        current_wave: the rollout's current wave.
    """
    action = decision.action
    admitted = current is not None and current.state == "admitted"
    lease = now + task.limits.lease_s
    if action == Action.ADMIT:
        waves = task.effective_plan.waves
        limit = waves[min(current_wave, len(waves) - 1)].max_in_flight
        if status not in ADMITTING or host_wave is None or host_wave > current_wave:
            return NO_EFFECT
        if in_flight >= limit:
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
            admitted_at=now,
        )
        return Effect(progress=progress, send=True, in_flight=1)
    if action == Action.RESEND:
        if not admitted or status not in ("active", "paused", "complete"):
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
                host=host,
                state="done",
                attempts=current.attempts if current else 0,
                admitted_at=current.admitted_at if current else 0.0,
                done_at=now,
            ),
            done=1,
            failed=-1 if current is not None and current.state == "failed" else 0,
            in_flight=-1 if admitted else 0,
        )
    if action == Action.FAIL:
        if not admitted:
            return NO_EFFECT
        assert current is not None
        return failed(task, current, decision.reason, now)
    return NO_EFFECT


def failed(task: Task, current: HostProgress, reason: str, now: float) -> Effect:
    """A failed attempt of an admitted host: back off, or give up after ``max_attempts``."""
    attempts = current.attempts + 1
    final = attempts >= task.limits.max_attempts
    progress = HostProgress(
        host=current.host,
        state="failed" if final else "backoff",
        attempts=attempts,
        next_try_at=0.0 if final else retry_at(task, attempts, now),
        reason=reason[:500],
        admitted_at=current.admitted_at,
    )
    return Effect(progress=progress, failed=1 if final else 0, failures=1, in_flight=-1)


def halt_reason(task: Task, wave: int, counters: WaveCounters, host: str, reason: str) -> str:
    """Why a rollout halted, when ``wave`` went over its failure budget."""
    w = task.effective_plan.waves[wave]
    allowed = w.budget(counters.members)
    return (
        f"wave {wave + 1} ({w.name}) exceeded its failure budget: {counters.failures} failed "
        f"attempt(s), {allowed} allowed; last: {host}: {reason}"
    )[:1000]


@dataclass
class _TaskRecord:
    task: Task
    status: str = "active"
    halt_reason: str = ""
    done: int = 0
    failed: int = 0
    failures: int = 0
    wave: int = 0
    wave_done_at: float | None = None
    progress: dict[str, HostProgress] = field(default_factory=dict)
    leases: dict[str, float] = field(default_factory=dict)
    members: dict[str, int] = field(default_factory=dict)
    waves: list[WaveCounters] = field(default_factory=list)
    # (deadline, host) of every lease granted or renewed; an entry whose host holds another
    # deadline by now is stale and skipped. Sweeping costs O(expired * log n), not O(leases).
    deadlines: list[tuple[float, str]] = field(default_factory=list)

    def hold(self, host: str, until: float) -> None:
        self.leases[host] = until
        heapq.heappush(self.deadlines, (until, host))


class MemoryStore:
    """Everything in memory, guarded by one lock. For tests and the fleet simulator.

    Subclasses persist changes by overriding :meth:`_persist`.
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._tasks: dict[str, _TaskRecord] = {}
        self._active: str | None = None
        self._hosts: dict[str, HostSeen] = {}
        self._bad: dict[str, str] = {}

    # ---- rollouts ------------------------------------------------------------------------

    def publish(self, task: Task, members: Mapping[str, int] | None = None) -> None:
        """Make ``task`` the active rollout with ``members`` (host -> wave); the previous one is
        cancelled and its slots freed."""
        members = dict(members or {})
        # A large rollout's members are written before the lock is taken: heartbeats go on
        # being answered meanwhile, and nobody reads members of a task not yet published.
        self._persist_members(task.id, members)
        with self._lock:
            previous = self._active
            if (
                previous is not None
                and previous != task.id
                and self._tasks[previous].status not in ("aborted", "cancelled")
            ):
                released = self._set_status_locked(previous, "cancelled", "replaced by " + task.id)
                self._persist(previous, hosts=released)
            record = _TaskRecord(task, members=members)
            record.waves = [WaveCounters() for _ in task.effective_plan.waves]
            for wave in record.members.values():
                record.waves[wave] = replace(
                    record.waves[wave], members=record.waves[wave].members + 1
                )
            self._tasks[task.id] = record
            self._active = task.id
            self._persist(task.id, hosts=())

    def active_task(self) -> Task | None:
        """The rollout hosts are compared against (the newest that was not replaced)."""
        with self._lock:
            return self._tasks[self._active].task if self._active is not None else None

    def task(self, task_id: str) -> Task | None:
        """A stored rollout by id."""
        with self._lock:
            record = self._tasks.get(task_id)
            return record.task if record else None

    def tasks(self) -> list[Task]:
        """Every stored rollout, newest first."""
        with self._lock:
            return sorted((r.task for r in self._tasks.values()), key=lambda t: -t.created_at)

    def cancel(self, task_id: str) -> bool:
        """Abort the rollout, free its slots, and stop comparing hosts against it."""
        with self._lock:
            record = self._tasks.get(task_id)
            if record is None or record.status in ("aborted", "cancelled"):
                return False
            released = self._set_status_locked(task_id, "aborted", "cancelled by an operator")
            if self._active == task_id:
                self._active = None
            self._persist(task_id, hosts=released)
            return True

    def set_status(self, task_id: str, status: TaskStatus, reason: str) -> bool:
        """An operator's change (pause, resume, abort); ``False`` if not allowed from the
        rollout's status (see :data:`STATUS_CHANGES`)."""
        with self._lock:
            record = self._tasks.get(task_id)
            if record is None or record.status not in STATUS_CHANGES.get(status, ()):
                return False
            released = self._set_status_locked(task_id, status, reason)
            self._persist(task_id, hosts=released)
            return True

    def _set_status_locked(self, task_id: str, status: str, reason: str) -> list[str]:
        record = self._tasks[task_id]
        record.status = status
        record.halt_reason = "" if status == "active" else reason
        released: list[str] = []
        if status in ("aborted", "cancelled"):
            released = list(record.leases)
            for host in released:
                record.progress[host] = replace(
                    record.progress[host], state="backoff", lease_until=0.0
                )
            record.leases.clear()
        return released

    def step(self, task_id: str, step: Step) -> bool:
        """Carry out :func:`~selfupgrade.server.core.advance`'s step if the rollout is still
        active and on the wave it was computed for."""
        with self._lock:
            record = self._tasks.get(task_id)
            if record is None or record.status != "active":
                return False
            if step.kind == "bake" and record.wave == step.wave and record.wave_done_at is None:
                record.wave_done_at = step.at
            elif step.kind == "unbake" and record.wave == step.wave:
                record.wave_done_at = None
            elif step.kind == "promote" and record.wave == step.wave - 1:
                record.wave, record.wave_done_at = step.wave, None
            elif step.kind == "complete" and record.wave == step.wave:
                record.status, record.wave_done_at = "complete", step.at
            else:
                return False
            self._persist(task_id, hosts=())
            return True

    def counters(self, task_id: str, now: float) -> TaskCounters:
        """Status and counts of the rollout (sweeps expired leases first)."""
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
                wave=record.wave,
                wave_done_at=record.wave_done_at,
                waves=tuple(record.waves),
            )

    # ---- hosts in a rollout --------------------------------------------------------------

    def host_state(self, task_id: str, host: str) -> tuple[HostProgress | None, int | None]:
        """The host's progress and its wave (``None``: not part of the rollout)."""
        with self._lock:
            record = self._tasks.get(task_id)
            if record is None:
                return None, None
            return record.progress.get(host), record.members.get(host)

    def progress(self, task_id: str, host: str) -> HostProgress | None:
        """What is known of ``host`` in the rollout."""
        return self.host_state(task_id, host)[0]

    def members(self, task_id: str) -> dict[str, int]:
        """Every member and its wave."""
        with self._lock:
            record = self._tasks.get(task_id)
            return dict(record.members) if record else {}

    def join(self, task_id: str, host: str, wave: int) -> None:
        """Add a host that appeared after the rollout started to ``wave``."""
        with self._lock:
            record = self._tasks.get(task_id)
            if record is None or host in record.members:
                return
            record.members[host] = wave
            counters = record.waves[wave]
            record.waves[wave] = replace(counters, members=counters.members + 1)
            self._persist(task_id, hosts=(), members={host: wave})

    def all_progress(self, task_id: str) -> list[HostProgress]:
        """Every host's progress in the rollout."""
        with self._lock:
            record = self._tasks.get(task_id)
            return list(record.progress.values()) if record else []

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
        """Carry out ``decision`` atomically (under the lock; the host's wave is read here)."""
        if decision.action == Action.NOTHING:
            return False
        with self._lock:
            record = self._tasks.get(task.id)
            if record is None:
                return False
            if decision.action == Action.ADMIT and self._full(record, now):
                return False  # the usual answer in a big wave; nothing to sweep or change
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
                status=record.status,
                host_wave=record.members.get(host),
                current_wave=record.wave,
            )
            if effect.progress is not None:
                self._apply_effect(record, effect, decision.reason)
                changed.append(host)
            if changed:
                self._persist(task.id, hosts=changed)
            return effect.send

    def free_slots(self, task_id: str, now: float) -> int:
        """Slots of the current wave an admission could take now, after expiring due leases
        (as an admission attempt would). For simulators; hbs learns it by trying."""
        with self._lock:
            record = self._tasks.get(task_id)
            if record is None or record.status not in ADMITTING:
                return 0
            self._sweep_locked(record, now)
            waves = record.task.effective_plan.waves
            limit = waves[min(record.wave, len(waves) - 1)].max_in_flight
            return max(0, limit - len(record.leases))

    @staticmethod
    def _full(record: _TaskRecord, now: float) -> bool:
        """Every slot of the current wave is held and no lease is due: admission must fail."""
        waves = record.task.effective_plan.waves
        limit = waves[min(record.wave, len(waves) - 1)].max_in_flight
        due = bool(record.deadlines) and record.deadlines[0][0] <= now
        return len(record.leases) >= limit and not due

    def sweep(self, task: Task, now: float) -> int:
        """Expire leases that ran out."""
        with self._lock:
            record = self._tasks.get(task.id)
            return len(self._sweep_locked(record, now)) if record else 0

    def _sweep_locked(self, record: _TaskRecord, now: float, *, persist: bool = True) -> list[str]:
        expired = []
        heap = record.deadlines
        while heap and heap[0][0] <= now:
            until, host = heapq.heappop(heap)
            if record.leases.get(host) == until:
                expired.append(host)
        reason = "no news within the lease"
        for host in expired:
            self._apply_effect(
                record, failed(record.task, record.progress[host], reason, now), reason
            )
        if expired and persist:
            self._persist(record.task.id, hosts=expired)
        return expired

    def _apply_effect(self, record: _TaskRecord, effect: Effect, reason: str) -> None:
        assert effect.progress is not None
        progress = effect.progress
        record.progress[progress.host] = progress
        if progress.state == "admitted":
            record.hold(progress.host, progress.lease_until)
        else:
            record.leases.pop(progress.host, None)
        record.done += effect.done
        record.failed += effect.failed
        record.failures += effect.failures
        wave = record.members.get(progress.host)
        if wave is None:
            return
        c = record.waves[wave]
        c = WaveCounters(
            c.members, c.done + effect.done, c.failed + effect.failed, c.failures + effect.failures
        )
        record.waves[wave] = c
        budget = record.task.effective_plan.waves[wave].budget(c.members)
        if record.status == "active" and effect.failures and c.failures > budget:
            record.status = "halted"
            record.halt_reason = halt_reason(record.task, wave, c, progress.host, reason)

    # ---- bad versions --------------------------------------------------------------------

    def mark_bad(self, version: str, reason: str) -> None:
        """Record that no later rollout may install ``version``."""
        with self._lock:
            self._bad[version] = reason
            self._persist_bad(version, reason)

    def bad_versions(self) -> dict[str, str]:
        """Versions marked bad, with why."""
        with self._lock:
            return dict(self._bad)

    # ---- the fleet view ------------------------------------------------------------------

    def save_hosts(self, seen: Iterable[HostSeen]) -> None:
        """Record the latest heartbeats. The persistence hook runs after the lock is
        released, so that heartbeats are not held up while a large batch is written."""
        batch = list(seen)
        with self._lock:
            for s in batch:
                self._hosts[s.host] = s
        self._persist_hosts(batch)

    def hosts(self) -> dict[str, HostSeen]:
        """The latest heartbeat of every host."""
        with self._lock:
            return dict(self._hosts)

    # ---- persistence hooks ---------------------------------------------------------------

    def _persist(
        self, task_id: str, *, hosts: Iterable[str], members: Mapping[str, int] | None = None
    ) -> None:
        """Called under the lock after a rollout, some of its hosts, or members changed."""

    def _persist_members(self, task_id: str, members: Mapping[str, int]) -> None:
        """Called without the lock before ``task_id`` is published with ``members``."""

    def _persist_hosts(self, seen: list[HostSeen]) -> None:
        """Called (without the lock) after heartbeats were recorded; the caller makes sure
        that batches do not overlap (the plane flushes one at a time)."""

    def _persist_bad(self, version: str, reason: str) -> None:
        """Called under the lock after a version was marked bad."""

    def close(self) -> None:
        """Nothing to release."""
