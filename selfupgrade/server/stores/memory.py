"""A store in memory, guarded by one lock: for tests, the fleet simulator, and as the
simplest reading of the store contract (see :mod:`selfupgrade.server.stores.base`)."""

from __future__ import annotations

import heapq
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from ..effects import Commit, Outcome
from ..tasks import (
    NO_ROLLOUT,
    HostProgress,
    HostRead,
    HostSeen,
    RolloutState,
    Status,
    Task,
)

__all__ = ["Leases", "MemoryStore"]


class Leases:
    """The leases of one rollout: host -> deadline, with the live ones counted in
    O(log n) (a heap of deadlines finds those that ran out)."""

    def __init__(self) -> None:
        self.until: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []
        self._overdue: set[str] = set()

    def hold(self, host: str, until: float) -> None:
        """Give ``host`` a lease until ``until`` (or move its deadline there)."""
        self.until[host] = until
        self._overdue.discard(host)
        heapq.heappush(self._heap, (until, host))

    def drop(self, host: str) -> None:
        """Take ``host``'s lease away."""
        self.until.pop(host, None)
        self._overdue.discard(host)

    def _catch_up(self, now: float) -> None:
        heap = self._heap
        while heap and heap[0][0] <= now:
            until, host = heapq.heappop(heap)
            if self.until.get(host) == until:
                self._overdue.add(host)

    def live(self, now: float) -> int:
        """Leases whose deadline is after ``now``."""
        self._catch_up(now)
        return len(self.until) - len(self._overdue)

    def is_live(self, host: str, now: float) -> bool:
        """Whether ``host`` holds a lease that runs after ``now``."""
        until = self.until.get(host)
        return until is not None and until > now

    def due(self, now: float) -> list[str]:
        """Hosts whose lease ran out by ``now``."""
        self._catch_up(now)
        return sorted(self._overdue)


@dataclass
class _Rollout:
    task: Task
    fields: dict[str, Any]
    counters: dict[str, int]
    members: dict[str, int]
    progress: dict[str, HostProgress] = field(default_factory=dict)
    leases: Leases = field(default_factory=Leases)


class MemoryStore:
    """Everything in memory; nothing survives the process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rollouts: dict[str, _Rollout] = {}
        self._order: list[str] = []
        self._active: str | None = None
        self._hosts: dict[str, HostSeen] = {}
        self._bad: dict[str, str] = {}

    # ---- rollouts ------------------------------------------------------------------------

    def publish(self, task: Task, members: Mapping[str, int], counters: Mapping[str, int]) -> None:
        """Store a new active rollout."""
        fields = {"status": Status.ACTIVE, "halt_reason": "", "wave": 0, "wave_done_at": None}
        record = _Rollout(task, fields, dict(counters), dict(members))
        with self._lock:
            self._rollouts[task.id] = record
            self._order.insert(0, task.id)
            self._active = task.id

    def active_id(self) -> str | None:
        """The active rollout's id."""
        return self._active

    def task(self, task_id: str) -> Task | None:
        """A stored task."""
        record = self._rollouts.get(task_id)
        return record.task if record is not None else None

    def tasks(self) -> list[Task]:
        """Every task, newest first."""
        with self._lock:
            return [self._rollouts[i].task for i in self._order[:200]]

    def rollout(self, task_id: str, now: float) -> RolloutState:
        """The rollout's state."""
        with self._lock:
            r = self._rollouts.get(task_id)
            if r is None:
                return NO_ROLLOUT
            return RolloutState(counters=dict(r.counters), in_flight=r.leases.live(now), **r.fields)

    def members(self, task_id: str) -> dict[str, int]:
        """Every member and its wave."""
        with self._lock:
            r = self._rollouts.get(task_id)
            return dict(r.members) if r is not None else {}

    # ---- hosts in a rollout --------------------------------------------------------------

    def read(self, task_id: str, hosts: Sequence[str]) -> list[HostRead]:
        """Progress and wave of each host."""
        with self._lock:
            r = self._rollouts.get(task_id)
            if r is None:
                return [HostRead(h) for h in hosts]
            progress, members = r.progress, r.members
            return [HostRead(h, progress.get(h), members.get(h)) for h in hosts]

    def all_progress(self, task_id: str) -> list[HostProgress]:
        """Every progress record."""
        with self._lock:
            r = self._rollouts.get(task_id)
            return list(r.progress.values()) if r is not None else []

    def due(self, task_id: str, now: float, limit: int = 1000) -> list[str]:
        """Hosts whose lease ran out."""
        with self._lock:
            r = self._rollouts.get(task_id)
            return r.leases.due(now)[:limit] if r is not None else []

    def commit(self, commits: Sequence[Commit]) -> list[Outcome]:
        """Apply each commit whose guards hold, under the lock."""
        with self._lock:
            return [self._commit(c) for c in commits]

    def _commit(self, c: Commit) -> Outcome:
        r = self._rollouts.get(c.task_id)
        if r is None:
            return Outcome.STALE
        g = c.guard
        if g.statuses is not None and r.fields["status"] not in g.statuses:
            return Outcome.STALE
        if any(r.fields.get(k) != v for k, v in g.fields.items()):
            return Outcome.STALE
        if any(r.counters.get(k, 0) != v for k, v in g.counters.items()):
            return Outcome.STALE
        if any(h in r.members for h in c.join):
            return Outcome.STALE
        for w in c.writes:
            current = r.progress.get(w.host)
            if (current.rev if current is not None else 0) != w.expect_rev:
                return Outcome.STALE
        takes = c.takes
        released = [self._rollouts[p].leases for p in c.others if p in self._rollouts]
        if takes:
            pools = [
                self._rollouts[p].leases
                for p in c.pools
                if p in self._rollouts and p not in c.others
            ]
            own = r.leases
            live = (
                len(own.until)  # held until released, even once run out
                + sum(p.live(c.now) for p in pools if p is not own)
                + sum(
                    p.live(c.now) - sum(1 for w in c.writes if p.is_live(w.host, c.now))
                    for p in released
                )
            )
            if live + takes > c.slot_limit:
                return Outcome.FULL
            for w in c.writes:
                if w.takes_slot and any(p.is_live(w.host, c.now) for p in pools):
                    return Outcome.FULL
        for leases in released:
            for w in c.writes:
                leases.drop(w.host)
        for w in c.writes:
            r.progress[w.host] = replace(w.progress, rev=w.expect_rev + 1)
            if w.lease_until is not None:
                r.leases.hold(w.host, w.lease_until)
            else:
                r.leases.drop(w.host)
        for k, delta in c.add.items():
            r.counters[k] = r.counters.get(k, 0) + delta
        r.fields.update(c.set)
        r.members.update(c.join)
        if c.deactivate and self._active == c.task_id:
            self._active = None
        return Outcome.OK

    # ---- the fleet view and bad versions -------------------------------------------------

    def save_hosts(self, seen: Iterable[HostSeen]) -> None:
        """Record the latest heartbeats."""
        batch = list(seen)
        with self._lock:
            for s in batch:
                self._hosts[s.host] = s

    def hosts(self) -> dict[str, HostSeen]:
        """The latest heartbeat of every host."""
        with self._lock:
            return dict(self._hosts)

    def forget_hosts(self, hosts: Iterable[str]) -> None:
        """Drop these hosts' records."""
        with self._lock:
            for host in hosts:
                self._hosts.pop(host, None)

    def mark_bad(self, version: str, reason: str) -> None:
        """Record a bad version."""
        with self._lock:
            self._bad[version] = reason

    def bad_versions(self) -> dict[str, str]:
        """Versions marked bad."""
        with self._lock:
            return dict(self._bad)

    # ---- lifecycle -----------------------------------------------------------------------

    def ping(self) -> None:
        """Always answers."""

    def stats(self) -> dict[str, float]:
        """Nothing to report."""
        return {}

    def close(self) -> None:
        """Nothing to release."""
