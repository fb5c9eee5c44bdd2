"""The control plane: one heartbeat in, ``None`` or an order out, through the core and a store.

:class:`ControlPlane` is what every front end calls (the HTTP app, the falcon JSON-RPC
listener, the fleet simulator). It keeps the fleet view (the last heartbeat of each host) in
memory and flushes it to the store every second, reads the active task from the store at most
once a second (so a task published on another hbs replica is seen within that time), asks
:func:`~selfupgrade.server.core.decide` what a heartbeat means and the store to carry it out.

When the store fails, a heartbeat is answered with "nothing": the plane fails closed, never
admitting a host it could not count.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..models import Heartbeat, UpgradeOrder
from .core import Action, decide
from .store import Store, StoreError
from .tasks import HostSeen, Task, TaskCounters, TaskLimits, task_from_seed

__all__ = ["ControlPlane", "PlaneConfig"]

log = logging.getLogger("selfupgrade.server")


@dataclass(frozen=True)
class PlaneConfig:
    """Settings of the control plane.

    Attributes:
        limits: limits of tasks published through the falcon API.
        task_cache_s: how long the active task read from the store is reused.
    """

    limits: TaskLimits = field(default_factory=TaskLimits)
    task_cache_s: float = 1.0


class ControlPlane:
    """Answers heartbeats and runs publish/cancel against a store.

    Args:
        store: where tasks, leases and the fleet view live.
        config: limits and caching.
        clock: wall-clock time (the simulator passes a virtual one).
    """

    def __init__(
        self,
        store: Store,
        config: PlaneConfig | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.config = config or PlaneConfig()
        self._clock = clock
        self._lock = threading.Lock()
        self._task: Task | None = None
        self._task_read_at = -1e18
        self._order_wire: dict[str, Any] | None = None
        self._seen: dict[str, HostSeen] = dict(store.hosts())
        self._dirty: dict[str, HostSeen] = {}

    # ---- heartbeats ----------------------------------------------------------------------

    def heartbeat(self, beat: Heartbeat) -> UpgradeOrder | None:
        """Record ``beat`` and return the order for its host, if it should upgrade now."""
        send = self.heartbeat_wire(beat)
        task = self._task
        return task.order() if send is not None and task is not None else None

    def heartbeat_wire(self, beat: Heartbeat) -> dict[str, Any] | None:
        """Like :meth:`heartbeat`, returning the order's wire form (cached per task)."""
        now = self._clock()
        seen = HostSeen(
            host=beat.host,
            version=str(beat.version),
            state=beat.state.value,
            seen_at=now,
            error=beat.error,
            labels=beat.labels,
        )
        with self._lock:
            self._seen[beat.host] = seen
            self._dirty[beat.host] = seen
        try:
            task = self.active_task(now)
            if task is None:
                return None
            progress = self.store.progress(task.id, beat.host)
            decision = decide(task, beat, progress, now)
            if decision.action == Action.NOTHING:
                return None
            send = self.store.apply(task, beat.host, decision, failures=beat.failures, now=now)
        except StoreError as exc:
            log.error("store failed; answering nothing: %s", exc)
            return None
        if decision.action == Action.ADMIT and send:
            log.info("admitted %s to task %s (%s)", beat.host, task.id, task.version)
        elif decision.action == Action.FAIL:
            log.warning("%s failed task %s: %s", beat.host, task.id, decision.reason)
        elif decision.action == Action.COMPLETE:
            log.info("%s finished task %s", beat.host, task.id)
        return self._order_wire if send else None

    # ---- tasks ---------------------------------------------------------------------------

    def active_task(self, now: float | None = None) -> Task | None:
        """The active task, read from the store at most every ``task_cache_s``."""
        now = self._clock() if now is None else now
        if now - self._task_read_at >= self.config.task_cache_s:
            task = self.store.active_task()
            with self._lock:
                if task is None or self._task is None or task.id != self._task.id:
                    self._order_wire = task.order().to_wire() if task is not None else None
                self._task = task
                self._task_read_at = now
        return self._task

    def publish(self, task: Task) -> Task:
        """Make ``task`` the active task (any previous one is cancelled)."""
        self.store.publish(task)
        self._forget_task()
        log.info("published task %s: %s", task.id, task.version)
        return task

    def publish_seed(self, body: object) -> Task:
        """Publish a task from the falcon API's body.

        Raises:
            FieldError: naming the invalid field.
        """
        return self.publish(task_from_seed(body, limits=self.config.limits, now=self._clock()))

    def cancel(self) -> Task | None:
        """Cancel the active task and free its slots; return it (``None`` if there was none)."""
        task = self.store.active_task()
        if task is not None:
            self.store.cancel(task.id)
            log.info("cancelled task %s", task.id)
        self._forget_task()
        return task

    def _forget_task(self) -> None:
        with self._lock:
            self._task_read_at = -1e18

    # ---- views ---------------------------------------------------------------------------

    def versions(self) -> dict[str, str]:
        """``{host: version}`` of every host seen, here or by another replica."""
        self.flush()
        return {h: s.version for h, s in sorted(self.store.hosts().items())}

    def status(self) -> dict[str, Any]:
        """The active task, its counters, and the fleet by version and by state."""
        now = self._clock()
        self.flush()
        hosts = self.store.hosts()
        task = self.active_task(now)
        counters = self.store.counters(task.id, now) if task is not None else TaskCounters()
        return {
            "task": task.to_json() if task is not None else None,
            "counters": {
                "status": counters.status if task is not None else "none",
                "in_flight": counters.in_flight,
                "done": counters.done,
                "failed": counters.failed,
                "failures": counters.failures,
                "halt_reason": counters.halt_reason,
            },
            "hosts": len(hosts),
            "versions": dict(Counter(s.version for s in hosts.values())),
            "states": dict(Counter(s.state for s in hosts.values())),
        }

    # ---- housekeeping --------------------------------------------------------------------

    def flush(self) -> None:
        """Write the heartbeats seen since the last flush to the store."""
        with self._lock:
            dirty, self._dirty = self._dirty, {}
        if dirty:
            try:
                self.store.save_hosts(dirty.values())
            except StoreError as exc:
                log.error("could not save heartbeats: %s", exc)
                with self._lock:
                    for host, seen in dirty.items():
                        self._dirty.setdefault(host, seen)

    def tick(self) -> None:
        """Periodic work: flush the fleet view, expire leases of the active task."""
        self.flush()
        try:
            task = self.active_task()
            if task is not None:
                expired = self.store.sweep(task, self._clock())
                if expired:
                    log.warning("%d lease(s) of task %s expired", expired, task.id)
        except StoreError as exc:
            log.error("periodic sweep failed: %s", exc)
