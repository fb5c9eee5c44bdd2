"""The control plane: one heartbeat in, ``None`` or an order out, through the core and a store.

:class:`ControlPlane` is what every front end calls (the HTTP app, the falcon JSON-RPC
listener, the fleet simulator). It keeps the fleet view (the last heartbeat of each host) in
memory and writes what is new in it to the store every second (a host's unchanged heartbeat
at most every :attr:`PlaneConfig.seen_save_s`), reads the active rollout and its status from
the store at most once a second (so a rollout published on another hbs replica is seen within
that time), asks :func:`~selfupgrade.server.core.decide` what a heartbeat means and the store
to carry it out. :meth:`ControlPlane.tick` runs the housekeeping: flush, expire leases, and
:func:`~selfupgrade.server.core.advance` the rollout (bake, promote, complete).

When the store fails, a heartbeat is answered with "nothing": the plane fails closed, never
admitting a host it could not count.
"""

from __future__ import annotations

import logging
import math
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from ..models import Heartbeat, Release, UpgradeOrder, parse_version
from ._fields import FieldError
from .core import Action, advance, decide
from .memory import ADMITTING
from .plan import Plan, Wave, assign_waves
from .store import Store, StoreError
from .tasks import HostProgress, HostSeen, Task, TaskCounters, TaskLimits, task_from_seed

__all__ = ["ControlPlane", "PlaneConfig"]

log = logging.getLogger("selfupgrade.server")

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


@dataclass(frozen=True)
class PlaneConfig:
    """Settings of the control plane.

    Attributes:
        limits: limits of tasks published through the falcon API, and defaults for rollouts.
        task_cache_s: how long the active rollout and its status read from the store are reused.
        lost_after_leases: a member silent for this many lease times is counted as lost (its
            wave can settle without it).
        seen_save_s: a heartbeat that changes nothing but the host's last-seen time is written
            to the store at most once per this time (a new host, or a change of version,
            state, error or labels, is written at the next flush). The plane's own view is
            always current; after a restart, a stored last-seen time is taken as up to this
            much later, so that no host looks silent longer than it was.
        full_backoff_s: after the store refused an admission (every slot held), answer
            admissions "not now" without asking the store for this long. For a store across
            the network (Redis), it saves a round trip for most heartbeats of a large wave; a
            freed slot then waits at most this long. 0 asks every time.
    """

    limits: TaskLimits = field(default_factory=TaskLimits)
    task_cache_s: float = 1.0
    lost_after_leases: float = 3.0
    seen_save_s: float = 300.0
    full_backoff_s: float = 0.0


class ControlPlane:
    """Answers heartbeats and runs publish, pause, resume, abort and rollback against a store.

    Args:
        store: where rollouts, leases and the fleet view live.
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
        self._counters = TaskCounters()
        self._task_read_at = -1e18
        self._order_wire: dict[str, Any] | None = None
        self._flush_lock = threading.Lock()
        self._seen: dict[str, HostSeen] = self._loaded_fleet()
        self._last_beat: dict[str, float] = {h: s.seen_at for h, s in self._seen.items()}
        self._dirty: dict[str, HostSeen] = {}
        self._silent: tuple[str, int, float, list[str]] = ("", -1, -1e18, [])
        self._version_text: dict[Any, str] = {}
        self._full_until = -math.inf

    # ---- heartbeats ----------------------------------------------------------------------

    def heartbeat(self, beat: Heartbeat) -> UpgradeOrder | None:
        """Record ``beat`` and return the order for its host, if it should upgrade now."""
        send = self.heartbeat_wire(beat)
        task = self._task
        return task.order() if send is not None and task is not None else None

    def heartbeat_wire(self, beat: Heartbeat) -> dict[str, Any] | None:
        """Like :meth:`heartbeat`, returning the order's wire form (cached per rollout)."""
        now = self._clock()
        version = self._version_text.get(beat.version)
        if version is None:
            version = self._version_text.setdefault(beat.version, str(beat.version))
        self._record(beat.host, version, beat.state.value, beat.error, beat.labels, now)
        try:
            task = self.active_task(now)
            if task is None:
                return None
            progress, wave = self.store.host_state(task.id, beat.host)
            plan = task.effective_plan
            if wave is None and self._may_join(task, beat):
                wave = len(plan.waves) - 1
                self.store.join(task.id, beat.host, wave)
            if wave is None:
                return None
            counters = self._counters
            may_admit = (
                counters.status in ADMITTING
                and wave <= counters.wave
                and (plan.window is None or plan.window.is_open(now))
            )
            decision = decide(task, beat, progress, now, may_admit=may_admit)
            if decision.action == Action.NOTHING:
                return None
            if decision.action == Action.ADMIT and now < self._full_until:
                return None
            send = self.store.apply(
                task, beat.host, decision, failures=beat.failures, now=now, wave=wave
            )
            if decision.action == Action.ADMIT and not send and self.config.full_backoff_s:
                self._full_until = now + self.config.full_backoff_s
        except StoreError as exc:
            log.error("store failed; answering nothing: %s", exc)
            return None
        if decision.action == Action.ADMIT and send:
            log.info("admitted %s to %s (%s, wave %d)", beat.host, task.id, task.version, wave + 1)
        elif decision.action == Action.FAIL:
            log.warning("%s failed %s: %s", beat.host, task.id, decision.reason)
        elif decision.action == Action.COMPLETE:
            log.info("%s finished %s", beat.host, task.id)
        return self._order_wire if send else None

    def observe(self, beat: Heartbeat) -> None:
        """Record ``beat`` in the fleet view without deciding anything.

        For heartbeats that cannot change anything (a simulator's hosts whose wave has not
        started yet), so that their last-seen time stays true.
        """
        self._record(
            beat.host, str(beat.version), beat.state.value, beat.error, beat.labels, self._clock()
        )

    def _record(
        self,
        host: str,
        version: str,
        state: str,
        error: str | None,
        labels: Mapping[str, str],
        now: float,
    ) -> None:
        """Note that ``host`` was heard from; keep (and mark for the store) a new
        :class:`HostSeen` only when it has news (see :attr:`PlaneConfig.seen_save_s`).

        Most heartbeats repeat the last one: they change one float, and allocate nothing that
        outlives the request (with a fleet of 600,000 hosts, a new object per heartbeat keeps
        the garbage collector's full scans, and their pauses, coming).
        """
        save_s = self.config.seen_save_s
        # Each host's periods start at its own phase, so that the fleet's rewrites are spread
        # over the period instead of all falling in the minute after a multiple of it.
        phase = (hash(host) & 0xFFFF) * save_s / 0x10000
        with self._lock:
            self._last_beat[host] = now
            prev = self._seen.get(host)
            if (
                prev is not None
                and (prev.seen_at + phase) // save_s == (now + phase) // save_s
                and prev.version == version
                and prev.state == state
                and prev.error == error
                and prev.labels == labels
            ):
                return
            seen = HostSeen(host, version, state, now, error, labels)
            self._seen[host] = seen
            self._dirty[host] = seen

    def _loaded_fleet(self) -> dict[str, HostSeen]:
        now = self._clock()
        save_s = self.config.seen_save_s
        return {
            host: replace(s, seen_at=min(s.seen_at + save_s, max(s.seen_at, now)))
            for host, s in self.store.hosts().items()
        }

    def last_seen(self, host: str) -> float | None:
        """When ``host`` was last heard from (by this plane, exactly; by another replica, to
        within :attr:`PlaneConfig.seen_save_s`), or ``None`` if never."""
        mine = self._last_beat.get(host)
        if mine is not None:
            return mine
        theirs = self.store.hosts().get(host)
        return theirs.seen_at if theirs is not None else None

    def fleet(self) -> dict[str, HostSeen]:
        """The last heartbeat of every host: the store's view (every replica's), with this
        plane's newer heartbeats over it. ``seen_at`` is exact to within
        :attr:`PlaneConfig.seen_save_s` (:meth:`last_seen` is exact)."""
        merged = self.store.hosts()
        with self._lock:
            local = list(self._seen.values())
        for s in local:
            other = merged.get(s.host)
            if other is None or other.seen_at < s.seen_at:
                merged[s.host] = s
        return merged

    @staticmethod
    def _may_join(task: Task, beat: Heartbeat) -> bool:
        """A host that was not there when the rollout started joins its last wave, if that
        wave is everyone (100%) and the host is targeted."""
        plan = task.effective_plan
        last = plan.waves[-1]
        return task.kind == "upgrade" and last.percent == 100.0 and plan.matches(beat.labels)

    # ---- rollouts ------------------------------------------------------------------------

    def active_task(self, now: float | None = None) -> Task | None:
        """The active rollout, read (with its status) at most every ``task_cache_s``."""
        now = self._clock() if now is None else now
        if now - self._task_read_at >= self.config.task_cache_s:
            task = self.store.active_task()
            counters = self.store.counters(task.id, now) if task is not None else TaskCounters()
            with self._lock:
                if task is None or self._task is None or task.id != self._task.id:
                    self._order_wire = task.order().to_wire() if task is not None else None
                self._task = task
                self._counters = counters
                self._task_read_at = now
        return self._task

    def publish(self, task: Task, members: Mapping[str, int] | None = None) -> Task:
        """Start ``task`` (any previous rollout is cancelled).

        Without ``members``, the targeted hosts are the hosts seen so far whose labels match
        the plan's selector, spread over the waves by a stable hash.

        Raises:
            FieldError: the version was marked bad.
        """
        bad = self.store.bad_versions()
        if task.kind == "upgrade" and str(task.version) in bad:
            raise FieldError("version", f"{task.version} is marked bad: {bad[str(task.version)]}")
        if members is None:
            seen = self.fleet()
            plan = task.effective_plan
            targeted = [h for h, s in seen.items() if plan.matches(s.labels)]
            if not targeted and len(plan.waves) > 1:
                raise FieldError(
                    "plan",
                    "no host that matches the plan has sent a heartbeat yet; a staged rollout "
                    "chooses its waves from the hosts it knows when it starts",
                )
            members = assign_waves(plan, targeted, task.id)
            if not task.previous_version:
                versions = Counter(
                    seen[h].version for h in members if seen[h].version != str(task.version)
                )
                if versions:
                    task = replace(task, previous_version=versions.most_common(1)[0][0])
        self.store.publish(task, members)
        self._forget_task()
        log.info(
            "published %s: %s to %d host(s), %d wave(s)",
            task.id,
            task.version,
            len(members),
            len(task.effective_plan.waves),
        )
        return task

    def publish_seed(self, body: object) -> Task:
        """Publish a task from the falcon API's body: one wave, the configured limits.

        Raises:
            FieldError: naming the invalid field.
        """
        return self.publish(task_from_seed(body, limits=self.config.limits, now=self._clock()))

    def cancel(self) -> Task | None:
        """Cancel the active rollout and free its slots; return it (``None`` if none)."""
        task = self.store.active_task()
        if task is not None:
            self.store.cancel(task.id)
            log.info("cancelled %s", task.id)
        self._forget_task()
        return task

    def control(self, task_id: str, action: str, reason: str = "") -> bool:
        """``pause``, ``resume`` or ``abort`` a rollout.

        Raises:
            FieldError: an unknown action.
        """
        status = {"pause": "paused", "resume": "active", "abort": "aborted"}.get(action)
        if status is None:
            raise FieldError("action", "must be pause, resume or abort")
        done = self.store.set_status(task_id, status, reason or f"{action}d by an operator")  # type: ignore[arg-type]
        if done:
            log.info("%s %s", action, task_id)
        self._forget_task()
        return done

    def rollback(
        self, task_id: str, *, mark_bad: bool = False, release: Release | None = None
    ) -> Task:
        """Take every host that this rollout upgraded back to the version it ran before.

        The rollout is aborted; a new rollout of kind ``rollback`` is started for those hosts,
        under the original's largest concurrency limit. A host restores its backup generation
        when it holds that version; otherwise it installs ``release``'s artifacts, if given.

        Raises:
            FieldError: no such rollout, or no previous version is known.
        """
        original = self.store.task(task_id)
        if original is None:
            raise FieldError("id", f"no rollout {task_id}")
        target = release.version if release is not None else None
        if target is None:
            if not original.previous_version:
                raise FieldError("release", "the previous version is unknown; give the release")
            target = parse_version(original.previous_version)
        self.store.set_status(task_id, "aborted", "rolled back by an operator")
        upgraded = {
            p.host for p in self.store.all_progress(task_id) if p.state in ("done", "admitted")
        }
        seen = self.fleet()
        upgraded |= {
            h
            for h in self.store.members(task_id)
            if h in seen and seen[h].version == str(original.version)
        }
        if mark_bad:
            self.store.mark_bad(str(original.version), f"rolled back from rollout {task_id}")
        widest = max(w.max_in_flight for w in original.effective_plan.waves)
        task = Task(
            id=f"{task_id}-rollback-{secrets.token_hex(3)}",
            release=release or Release(target, ()),
            limits=original.limits,
            created_at=self._clock(),
            allow_downgrade=True,
            plan=Plan(
                (
                    Wave(
                        "rollback",
                        percent=100.0,
                        max_in_flight=widest,
                        max_failures=max(len(upgraded), 1),
                    ),
                )
            ),
            kind="rollback",
            rollback_of=task_id,
            previous_version=str(original.version),
        )
        return self.publish(task, members=dict.fromkeys(upgraded, 0))

    def _forget_task(self) -> None:
        with self._lock:
            self._task_read_at = -1e18

    # ---- views ---------------------------------------------------------------------------

    def versions(self) -> dict[str, str]:
        """``{host: version}`` of every host seen, here or by another replica."""
        return {h: s.version for h, s in sorted(self.fleet().items())}

    def status(self) -> dict[str, Any]:
        """The active rollout, its counters, and the fleet by version and by state."""
        now = self._clock()
        hosts = self.fleet()
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
                "wave": counters.wave,
            },
            "hosts": len(hosts),
            "versions": dict(Counter(s.version for s in hosts.values())),
            "states": dict(Counter(s.state for s in hosts.values())),
        }

    def summaries(self) -> list[dict[str, Any]]:
        """One line per rollout, newest first."""
        now = self._clock()
        out = []
        for task in self.store.tasks():
            c = self.store.counters(task.id, now)
            out.append(
                {
                    "id": task.id,
                    "kind": task.kind,
                    "version": str(task.version),
                    "created_at": task.created_at,
                    "status": c.status,
                    "wave": c.wave,
                    "waves": len(task.effective_plan.waves),
                    "done": c.done,
                    "failed": c.failed,
                    "in_flight": c.in_flight,
                    "halt_reason": c.halt_reason,
                }
            )
        return out

    def detail(self, task_id: str) -> dict[str, Any] | None:
        """Everything about one rollout: waves with counts by state, failures, ETA."""
        task = self.store.task(task_id)
        if task is None:
            return None
        now = self._clock()
        c = self.store.counters(task_id, now)
        members = self.store.members(task_id)
        progress = {p.host: p for p in self.store.all_progress(task_id)}
        seen = self.fleet()
        plan = task.effective_plan
        lost_after = self.config.lost_after_leases * task.limits.lease_s
        states: list[Counter[str]] = [Counter() for _ in plan.waves]
        hosts: dict[str, dict[str, Any]] = {}
        failures: list[dict[str, Any]] = []
        last_beat = self._last_beat
        for host, index in sorted(members.items()):
            s = seen.get(host)
            at = max(last_beat.get(host, -math.inf), s.seen_at if s else -math.inf)
            state = _display(task, progress.get(host), s, now - at > lost_after)
            states[index][state] += 1
            if len(hosts) < 2000:
                hosts[host] = {"wave": index, "state": state, "version": s.version if s else None}
            p = progress.get(host)
            if p is not None and p.reason:
                failures.append(
                    {
                        "host": host,
                        "wave": index,
                        "attempts": p.attempts,
                        "reason": p.reason,
                        "gave_up": p.state == "failed",
                    }
                )
        waves = []
        for k, wave in enumerate(plan.waves):
            wc = c.waves[k] if k < len(c.waves) else None
            if k < c.wave or (c.status == "complete"):
                phase = "complete"
            elif k == c.wave and c.status in ("halted", "paused", "aborted", "cancelled"):
                phase = c.status
            elif k == c.wave:
                phase = "baking" if c.wave_done_at is not None else "running"
            else:
                phase = "pending"
            bake_left = None
            if k == c.wave and c.wave_done_at is not None and c.status == "active":
                bake_left = max(0.0, wave.bake_s - (now - c.wave_done_at))
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
            "status": c.status,
            "halt_reason": c.halt_reason,
            "wave": c.wave,
            "in_flight": c.in_flight,
            "done": c.done,
            "failed": c.failed,
            "failures": c.failures,
            "members": len(members),
            "waves": waves,
            "failures_list": sorted(failures, key=lambda f: (f["wave"], f["host"]))[:200],
            "hosts": hosts,
            "eta_s": _eta(task, c, progress, len(members), now),
            "window_open": plan.window.is_open(now) if plan.window else True,
        }

    # ---- housekeeping --------------------------------------------------------------------

    def flush(self) -> None:
        """Write the heartbeats with news since the last flush to the store (one flush at a
        time, so that an older heartbeat never overwrites a newer one)."""
        with self._flush_lock:
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
        """Periodic work: flush the fleet view, expire leases, bake and promote waves."""
        self.flush()
        try:
            task = self.store.active_task()
            if task is None:
                return
            now = self._clock()
            expired = self.store.sweep(task, now)
            if expired:
                log.warning("%d lease(s) of %s expired", expired, task.id)
            counters = self.store.counters(task.id, now)
            step = advance(task, counters, lost=self._lost(task, counters, now), now=now)
            if step.kind != "none" and self.store.step(task.id, step):
                if step.kind == "promote":
                    log.info("%s: wave %d promoted", task.id, step.wave + 1)
                elif step.kind == "complete":
                    log.info("%s complete", task.id)
                self._forget_task()
        except StoreError as exc:
            log.error("periodic work failed: %s", exc)

    def _lost(self, task: Task, counters: TaskCounters, now: float) -> int:
        """Members of the current wave that are not settled and have stopped heartbeating.

        Finding the silent members scans the wave, so it runs at most every half lease (a host
        is lost only after ``lost_after_leases`` leases of silence); in between, only the hosts
        found silent are checked again, and any that spoke or settled since stop counting.
        """
        wave = counters.wave
        if wave >= len(counters.waves):
            return 0
        c = counters.waves[wave]
        if c.done + c.failed >= c.members:
            return 0
        lost_after = self.config.lost_after_leases * task.limits.lease_s
        task_id, cached_wave, scanned_at, silent = self._silent
        if task_id != task.id or cached_wave != wave or now - scanned_at >= task.limits.lease_s / 2:
            settled = {
                p.host for p in self.store.all_progress(task.id) if p.state in ("done", "failed")
            }
            # dict.get is atomic; the lock is not held over the scan, so heartbeats answered
            # meanwhile are not held up by it.
            get = self._last_beat.get
            silent = []
            for host, w in self.store.members(task.id).items():
                if w == wave and host not in settled:
                    at = get(host)
                    if at is None or now - at > lost_after:
                        silent.append(host)
            self._silent = (task.id, wave, now, silent)
        count = 0
        for host in silent:
            at = self._last_beat.get(host)
            if at is not None and now - at <= lost_after:
                continue  # it spoke again
            p = self.store.progress(task.id, host)
            if p is None or p.state not in ("done", "failed"):
                count += 1
        return count


def _display(task: Task, p: HostProgress | None, s: HostSeen | None, silent: bool) -> str:
    if p is not None and p.state == "done":
        return "confirmed"
    if s is not None and s.state == "rolled_back" and p is not None and p.state != "admitted":
        return "rolled back"
    if p is not None and p.state in ("failed", "backoff"):
        return "failed"
    if s is None or silent:
        return "lost"
    if p is not None and p.state == "admitted":
        return _DISPLAY.get(s.state, "pending")
    return "pending"


def _eta(
    task: Task, c: TaskCounters, progress: Mapping[str, HostProgress], members: int, now: float
) -> float | None:
    """Seconds left: hosts left at the rate seen so far, plus the bake times still ahead."""
    if c.status in ("complete", "aborted", "cancelled"):
        return 0.0 if c.status == "complete" else None
    starts = [p.admitted_at for p in progress.values() if p.admitted_at]
    if c.done == 0 or not starts:
        return None
    rate = c.done / max(now - min(starts), 1e-6)
    left = max(members - c.done - c.failed, 0)
    waves = task.effective_plan.waves
    bakes = sum(w.bake_s for w in waves[c.wave + 1 :])
    if c.wave < len(waves):
        current = waves[c.wave].bake_s
        bakes += current - (now - c.wave_done_at) if c.wave_done_at is not None else current
    return math.ceil(left / rate + max(bakes, 0.0))
