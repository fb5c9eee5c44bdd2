"""What the control plane's jobs share: the store, the fleet view, the cached active rollout,
the settings and the clock (one :class:`PlaneContext`, handed to each job)."""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from .artifacts import ArtifactCheck
from .fleet import FleetView
from .pacing import Pacing
from .stores.base import Store
from .tasks import RolloutState, Task, TaskLimits

__all__ = ["PlaneConfig", "PlaneContext", "PlaneJob", "RolloutCache"]

log = logging.getLogger("selfupgrade.server")


@dataclass(frozen=True)
class PlaneConfig:
    """Settings of the control plane.

    Attributes:
        limits: limits of tasks published through the falcon API, and defaults for rollouts.
        task_cache_s: how long the active rollout and its state read from the store are
            reused by the heartbeat path (a rollout published on another replica is seen
            within that time; every commit re-checks what it assumed).
        lost_after_leases: a member silent for this many lease times is counted as lost (its
            wave can settle without it).
        seen_save_s: a heartbeat that changes nothing but the host's last-seen time is
            written to the store at most once per this time (see
            :mod:`~selfupgrade.server.fleet`).
        full_backoff_s: after the store refused an admission (every slot held), answer
            admissions "not now" without asking the store, until this plane frees a slot
            (a host finished or failed, a lease expired, a command) or for at most this long
            (a slot freed by another hbs replica waits that long). It spares most
            heartbeats of a large wave a commit. 0 asks the store every time.
        artifact_check: fetches and checks each artifact of a release before it is
            published, before each later wave starts, and every ``artifact_recheck_s``
            during a rollout (a failed re-check pauses it); ``None``: no check, and each
            publish logs that its artifacts were not checked. hbs turns it on by default.
        artifact_recheck_s: how often an active rollout's artifacts are checked again.
        max_hosts: hosts the fleet view keeps; heartbeats of new hosts beyond it are not
            recorded or answered (a flood of made-up names cannot grow hbs without bound).
        new_hosts_per_source: host names one network address may bring per
            ``new_hosts_window_s`` (0: no limit); see :mod:`~selfupgrade.server.admission`.
        new_hosts_window_s: that window.
        host_ttl_s: a host no replica has heard from for this long is forgotten (its record,
            its address binding).
        deaf_after_s: when housekeeping last completed longer ago than this (the store
            failed or stalled, hbs was stopped or paused), hbs could not hear anyone meanwhile:
            leases that ran out in that time are renewed, not failed.
        partition_share: when at least this share (and at least three) of the hosts heard
            lately that hold no slot went silent with a host whose lease ran out, hbs takes it
            for a network partition, not a failure of that host: its lease is renewed and
            its slot kept (its real upgrade may go on behind the partition); ``0`` turns it
            off. See :meth:`~selfupgrade.server.fleet.FleetView.quiet`.
        pacing: tell each host in its heartbeat reply when to beat next
            (:mod:`~selfupgrade.server.pacing`); ``None``: say nothing, hosts beat at their
            own interval.
    """

    limits: TaskLimits = field(default_factory=TaskLimits)
    task_cache_s: float = 1.0
    lost_after_leases: float = 3.0
    seen_save_s: float = 300.0
    full_backoff_s: float = 0.2
    artifact_check: ArtifactCheck | None = None
    artifact_recheck_s: float = 60.0
    deaf_after_s: float = 5.0
    max_hosts: int = 2_000_000
    new_hosts_per_source: int = 100
    new_hosts_window_s: float = 600.0
    host_ttl_s: float = 14 * 86400.0
    partition_share: float = 0.2
    pacing: Pacing | None = None

    def __post_init__(self) -> None:
        count = self.new_hosts_per_source
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"new_hosts_per_source: must be an integer, 0 or more, got {count!r}")
        share = self.partition_share
        if not isinstance(share, (int, float)) or not 0 <= share <= 1:
            raise ValueError(f"partition_share: must be between 0 and 1, got {share!r}")
        for name in ("new_hosts_window_s", "host_ttl_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name}: must be a positive number of seconds, got {value!r}")


class RolloutCache:
    """The active rollout and its state, read from the store at most every ``ttl_s``."""

    def __init__(self, store: Store, ttl_s: float) -> None:
        self._store = store
        self._ttl_s = ttl_s
        self._lock = threading.Lock()
        self._value: tuple[Task, RolloutState] | None = None
        self._read_at = -math.inf
        self.full_until = -math.inf
        """Until when admissions are answered "not now" without asking the store."""
        self.lost = ""
        """Why the store seems to have lost its data ("": it has not), for the status."""

    def get(self, now: float, *, fresh: bool = False) -> tuple[Task, RolloutState] | None:
        """The active rollout and its state (``fresh``: read now, whatever the cache holds).

        Raises:
            StoreError: the store failed.
        """
        if not fresh and now - self._read_at < self._ttl_s:
            return self._value
        task_id = self._store.active_id()
        task = self._store.task(task_id) if task_id is not None else None
        value = (task, self._store.rollout(task.id, now)) if task is not None else None
        before = self._value
        if value is None and before is not None:
            self._check_not_lost(before[0])
        elif value is not None:
            self.lost = ""
        with self._lock:
            self._value, self._read_at = value, now
        return value

    def _check_not_lost(self, task: Task) -> None:
        """The active rollout is no longer active: cancelled (it is still listed), or gone
        with everything else (a Redis restarted without its data, a store file replaced)."""
        if any(t.id == task.id for t in self._store.tasks()):
            return
        self.lost = (
            f"the store lost its data: rollout {task.id} ({task.version}) vanished without "
            "being cancelled (a Redis restarted without persistence, a replaced store file?); "
            "its hosts' progress and leases are gone: publish it again"
        )
        log.error("%s", self.lost)

    def update(self, task: Task, rollout: RolloutState) -> None:
        """A fresher state of ``task``, read by someone else."""
        with self._lock:
            if self._value is not None and self._value[0].id == task.id:
                self._value = (task, rollout)

    def forget(self) -> None:
        """Read again at the next :meth:`get` (a command changed the rollout)."""
        with self._lock:
            self._read_at = -math.inf
            self.full_until = -math.inf

    def freed(self) -> None:
        """A slot was freed here: admissions may succeed again."""
        self.full_until = -math.inf


@dataclass(frozen=True)
class PlaneContext:
    """The parts every job of the plane works with.

    Attributes:
        store: where the state lives.
        fleet: the fleet view.
        cache: the active rollout, as the heartbeat path reads it.
        config: the plane's settings.
        clock: wall-clock time (a virtual one in the simulator).
    """

    store: Store
    fleet: FleetView
    cache: RolloutCache
    config: PlaneConfig
    clock: Callable[[], float]


class PlaneJob:
    """A job of the plane (commands, views, housekeeping), over the shared context."""

    def __init__(self, context: PlaneContext) -> None:
        self._store = context.store
        self._fleet = context.fleet
        self._cache = context.cache
        self._config = context.config
        self._clock = context.clock
