"""Views: JSON for the API, the dashboard, the CLI and the metrics.

The functions at the top are pure: from what was read (a task, its
:class:`~selfupgrade.server.tasks.RolloutState`, progress records, the fleet view) and ``now``
to plain JSON. :class:`Views` reads what they need from the store and the fleet view.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from . import rules
from .context import PlaneJob
from .tasks import HostProgress, HostSeen, HostState, RolloutState, Status, Task

__all__ = [
    "MAX_LISTED_FAILURES",
    "STATES",
    "MetricsSnapshot",
    "Views",
    "detail_view",
    "display_state",
    "eta_s",
    "failure_entry",
    "status_view",
    "summary_view",
]

_DISPLAY = {
    "downloading": "downloading",
    "verifying": "downloading",
    "installing": "installing",
    "restarting": "restarting",
    "confirming": "restarting",
}
STATES = (
    "pending",
    "downloading",
    "installing",
    "restarting",
    "confirmed",
    "failed",
    "rolled back",
    "lost",
)
"""How hosts of a rollout are counted in status views."""


def display_state(p: HostProgress | None, s: HostSeen | None, lost: bool) -> str:
    """How one member of a rollout is shown (one of :data:`STATES`)."""
    if p is not None and p.state == HostState.DONE:
        return "confirmed"
    if (
        s is not None
        and s.state == "rolled_back"
        and p is not None
        and p.state != HostState.ADMITTED
    ):
        return "rolled back"
    if p is not None and p.state in (HostState.FAILED, HostState.BACKOFF):
        return "failed"
    if s is None or lost:
        return "lost"
    if p is not None and p.state == HostState.ADMITTED:
        return _DISPLAY.get(s.state, "pending")
    return "pending"


def eta_s(
    task: Task,
    rollout: RolloutState,
    progress: Mapping[str, HostProgress],
    members: int,
    now: float,
) -> float | None:
    """Seconds left: hosts left at the rate seen so far, plus the bake times still ahead."""
    if rollout.status in (Status.COMPLETE, Status.ABORTED, Status.CANCELLED):
        return 0.0 if rollout.status == Status.COMPLETE else None
    starts = [p.admitted_at for p in progress.values() if p.admitted_at]
    if rollout.done == 0 or not starts:
        return None
    rate = rollout.done / max(now - min(starts), 1e-6)
    left = max(members - rollout.done - rollout.failed, 0)
    waves = task.effective_plan.waves
    bakes = sum(w.bake_s for w in waves[rollout.wave + 1 :])
    if rollout.wave < len(waves):
        current = waves[rollout.wave].bake_s
        done_at = rollout.wave_done_at
        bakes += current - (now - done_at) if done_at is not None else current
    return math.ceil(left / rate + max(bakes, 0.0))


MAX_LISTED_FAILURES = 20
"""Failed hosts the status lists (the rollout's detail lists them all)."""


def failure_entry(p: HostProgress) -> dict[str, Any]:
    """A host whose last attempt failed, as views list it."""
    return {
        "host": p.host,
        "attempts": p.attempts,
        "reason": p.reason,
        "gave_up": p.state == HostState.FAILED,
    }


def status_view(
    task: Task | None,
    rollout: RolloutState,
    hosts: Mapping[str, HostSeen],
    store_warning: str = "",
    progress: Sequence[HostProgress] = (),
) -> dict[str, Any]:
    """``GET /selfupgrade/v1/status``: the active rollout, its counters, the hosts whose last
    attempt failed and why (at most :data:`MAX_LISTED_FAILURES`), the fleet by version and by
    state, and ``store_warning`` when the store seems to have lost its data."""
    failed = sorted((p for p in progress if p.reason), key=lambda p: p.host)
    return {
        "store_warning": store_warning,
        "task": task.to_json() if task is not None else None,
        "counters": {
            "status": rollout.status.value if task is not None else "none",
            "in_flight": rollout.in_flight,
            "done": rollout.done,
            "failed": rollout.failed,
            "failures": rollout.failures,
            "silent": rollout.silent,
            "halt_reason": rollout.halt_reason,
            "wave": rollout.wave,
        },
        "failures": [failure_entry(p) for p in failed[:MAX_LISTED_FAILURES]],
        "hosts": len(hosts),
        "versions": dict(Counter(s.version for s in hosts.values())),
        "states": dict(Counter(s.state for s in hosts.values())),
    }


def summary_view(task: Task, rollout: RolloutState) -> dict[str, Any]:
    """One line of ``GET /selfupgrade/v1/rollouts``."""
    return {
        "id": task.id,
        "kind": task.kind,
        "version": str(task.version),
        "created_at": task.created_at,
        "status": rollout.status.value,
        "wave": rollout.wave,
        "waves": len(task.effective_plan.waves),
        "done": rollout.done,
        "failed": rollout.failed,
        "failures": rollout.failures,
        "silent": rollout.silent,
        "in_flight": rollout.in_flight,
        "halt_reason": rollout.halt_reason,
    }


def detail_view(
    task: Task,
    rollout: RolloutState,
    members: Mapping[str, int],
    progress: Mapping[str, HostProgress],
    seen: Mapping[str, HostSeen],
    last_beats: Mapping[str, float],
    now: float,
    lost_after_leases: float,
    interval: Callable[[str], float | None] = lambda host: None,
) -> dict[str, Any]:
    """``GET /selfupgrade/v1/rollouts/<id>``: waves with counts by state, failures, ETA
    (``interval``: a host's heartbeat interval as measured, for whether it is lost)."""
    plan = task.effective_plan
    states: list[Counter[str]] = [Counter() for _ in plan.waves]
    hosts: dict[str, dict[str, Any]] = {}
    failures: list[dict[str, Any]] = []
    for host, index in sorted(members.items()):
        s = seen.get(host)
        at = max(last_beats.get(host, -math.inf), s.seen_at if s else -math.inf)
        p = progress.get(host)
        last = at if at > -math.inf else None
        lost = rules.is_lost(task, last, now, lost_after_leases, interval(host))
        state = display_state(p, s, lost)
        states[index][state] += 1
        if len(hosts) < 2000:
            hosts[host] = {"wave": index, "state": state, "version": s.version if s else None}
        if p is not None and p.reason:
            failures.append({**failure_entry(p), "wave": index})
    counters = rollout.waves
    waves = []
    status = rollout.status
    for k, wave in enumerate(plan.waves):
        wc = counters[k] if k < len(counters) else None
        if k < rollout.wave or status == Status.COMPLETE:
            phase = "complete"
        elif k == rollout.wave and status in (
            Status.HALTED,
            Status.PAUSED,
            Status.ABORTED,
            Status.CANCELLED,
        ):
            phase = status.value
        elif k == rollout.wave:
            phase = "baking" if rollout.wave_done_at is not None else "running"
        else:
            phase = "pending"
        bake_left = None
        if k == rollout.wave and rollout.wave_done_at is not None and status == Status.ACTIVE:
            bake_left = max(0.0, wave.bake_s - (now - rollout.wave_done_at))
        waves.append(
            {
                **wave.to_json(),
                "index": k,
                "phase": phase,
                "members": wc.members if wc else 0,
                "done": wc.done if wc else 0,
                "failed": wc.failed if wc else 0,
                "failures": wc.failures if wc else 0,
                "budget": wave.budget(wc.members if wc else 0),
                "states": {s: states[k].get(s, 0) for s in STATES},
                "bake_left_s": bake_left,
            }
        )
    return {
        "task": task.to_json(),
        "status": status.value,
        "halt_reason": rollout.halt_reason,
        "wave": rollout.wave,
        "in_flight": rollout.in_flight,
        "done": rollout.done,
        "failed": rollout.failed,
        "failures": rollout.failures,
        "silent": rollout.silent,
        "members": len(members),
        "waves": waves,
        "failures_list": sorted(failures, key=lambda f: (f["wave"], f["host"]))[:200],
        "hosts": hosts,
        "eta_s": eta_s(task, rollout, progress, len(members), now),
        "window_open": plan.window.is_open(now) if plan.window else True,
    }


@dataclass(frozen=True)
class MetricsSnapshot:
    """What one Prometheus scrape shows.

    Attributes:
        versions: hosts by the version they last reported.
        states: hosts by upgrade state.
        task: the active rollout, if any.
        rollout: its state.
        slot_limit: the slots its current wave allows.
        store: the store's own figures (for example ``round_trips``).
    """

    versions: Mapping[str, int]
    states: Mapping[str, int]
    task: Task | None
    rollout: RolloutState
    slot_limit: int
    store: Mapping[str, float]


class Views(PlaneJob):
    """Reads what the views need from the store and the fleet view.

    Every method may raise :class:`~selfupgrade.server.stores.base.StoreError`.
    """

    def active(self) -> tuple[Task, RolloutState] | None:
        """The active rollout and its state, fresh from the store."""
        return self._cache.get(self._clock(), fresh=True)

    def versions(self) -> dict[str, str]:
        """``{host: version}`` of every host seen, here or by another replica."""
        return {h: s.version for h, s in sorted(self._fleet.all().items())}

    def status(self) -> dict[str, Any]:
        """See :func:`status_view`."""
        active = self.active()
        task, rollout = active if active is not None else (None, RolloutState())
        progress = self._store.all_progress(task.id) if task is not None else []
        return status_view(task, rollout, self._fleet.all(), self._cache.lost, progress)

    def summaries(self) -> list[dict[str, Any]]:
        """One line per rollout, newest first."""
        now = self._clock()
        return [summary_view(t, self._store.rollout(t.id, now)) for t in self._store.tasks()]

    def detail(self, task_id: str) -> dict[str, Any] | None:
        """See :func:`detail_view`; ``None`` when there is no such rollout."""
        task = self._store.task(task_id)
        if task is None:
            return None
        now = self._clock()
        return detail_view(
            task,
            self._store.rollout(task_id, now),
            self._store.members(task_id),
            {p.host: p for p in self._store.all_progress(task_id)},
            self._fleet.all(),
            self._fleet.last_beats(),
            now,
            self._config.lost_after_leases,
            self._fleet.interval,
        )

    def bad_versions(self) -> dict[str, str]:
        """Versions marked bad, with why."""
        return self._store.bad_versions()

    def metrics(self) -> MetricsSnapshot:
        """See :class:`MetricsSnapshot`."""
        hosts = self._fleet.all()
        active = self.active()
        task, rollout = active if active is not None else (None, RolloutState())
        return MetricsSnapshot(
            versions=Counter(s.version for s in hosts.values()),
            states=Counter(s.state for s in hosts.values()),
            task=task,
            rollout=rollout,
            slot_limit=rules.slot_limit(task, rollout) if task is not None else 0,
            store=self._store.stats(),
        )

    def health(self) -> None:
        """Check that the store answers.

        Raises:
            StoreError: it does not.
        """
        self._store.ping()
