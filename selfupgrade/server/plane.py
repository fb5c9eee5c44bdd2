"""The control plane: its jobs wired together over one store and one clock.

* the heartbeat path (this module): :meth:`ControlPlane.answer`, the one entry point of every
  front end (the HTTP route, the falcon JSON-RPC listener, the fleet simulator): heartbeats
  in, one :class:`Reply` each out, through a read, the rulebook
  (:mod:`~selfupgrade.server.rules`) and a guarded commit;
* the fleet view (:mod:`~selfupgrade.server.fleet`): the last heartbeat of every host;
* operator commands (:mod:`~selfupgrade.server.commands`): publish, cancel, pause, resume,
  abort, roll back, mark bad;
* views (:mod:`~selfupgrade.server.views`): JSON for the API, the dashboard, the CLI and the
  metrics;
* housekeeping (:mod:`~selfupgrade.server.housekeeping`): flush the fleet view, expire
  leases, bake and promote waves.

Nothing outside the plane reaches into its store or its clock. When the store fails, a
heartbeat is answered with no order: the plane fails closed, never admitting a host it could
not count. Store calls block: front ends on an event loop call :meth:`ControlPlane.answer`
through :class:`~selfupgrade.server.batch.HeartbeatBatcher`, which runs it on a worker
thread with a deadline.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from ..models import Heartbeat, UpgradeOrder, UpgradeState
from . import rules
from ._retry import TRIES
from .admission import Admission
from .commands import Commands
from .context import PlaneConfig, PlaneContext, RolloutCache
from .effects import Outcome
from .fleet import FleetView
from .housekeeping import Housekeeping
from .pacing import Pacer
from .rules import Action, Verdict
from .stores.base import Store, StoreError
from .tasks import HostRead, RolloutState, Task
from .views import Views

__all__ = ["ControlPlane", "PlaneConfig", "Reply"]

log = logging.getLogger("selfupgrade.server")


@dataclass(frozen=True, slots=True)
class Reply:
    """The answer to one heartbeat.

    Attributes:
        task: the rollout whose order the host gets now; ``None``: no order.
        error: why hbs could not decide (the store failed or did not answer in time); the
            host gets no order and asks again at its next heartbeat.
        refused: why the heartbeat was not listened to at all (not recorded, no order; see
            :mod:`~selfupgrade.server.admission`); ``""``: it was.
        mirror_rule: which of the plan's download-source rules the host's labels matched.
        next_beat_s: when the host should beat next (:mod:`~selfupgrade.server.pacing`);
            ``None``: at its own interval.
    """

    task: Task | None = None
    error: str = ""
    refused: str = ""
    mirror_rule: int | None = None
    next_beat_s: float | None = None

    @property
    def order(self) -> UpgradeOrder | None:
        """The order to send, if any (with the host's own download sources first)."""
        return self.task.order(self.mirror_rule) if self.task is not None else None


NO_ORDER = Reply()


class ControlPlane:
    """Answers heartbeats, runs commands and housekeeping, and serves views over a store.

    Args:
        store: where rollouts, leases and the fleet view live.
        config: limits and caching.
        clock: wall-clock time (the simulator passes a virtual one).
        uniform: random numbers in [0, 1), for the jitter of paced check-ins.

    Attributes:
        fleet: the fleet view.
        commands: operator commands.
        views: JSON views.
        housekeeping: periodic work (:meth:`tick` runs it).
    """

    def __init__(
        self,
        store: Store,
        config: PlaneConfig | None = None,
        *,
        clock: Callable[[], float] = time.time,
        uniform: Callable[[], float] = random.random,
    ) -> None:
        self.config = config = config or PlaneConfig()
        self._store = store
        self._clock = clock
        self._uniform = uniform
        self._pacer = Pacer(config.pacing) if config.pacing is not None else None
        self._cache = RolloutCache(store, config.task_cache_s)
        self.fleet = FleetView(store, config.seen_save_s, clock)
        self.admission = Admission(
            self.fleet,
            max_hosts=config.max_hosts,
            new_hosts_per_source=config.new_hosts_per_source,
            new_hosts_window_s=config.new_hosts_window_s,
            clock=clock,
        )
        context = PlaneContext(store, self.fleet, self._cache, config, clock)
        self.commands = Commands(context)
        self.views = Views(context)
        self.housekeeping = Housekeeping(
            context, lambda task_id, why: self.commands.control(task_id, "pause", why)
        )

    # ---- the heartbeat path --------------------------------------------------------------

    def answer(self, beats: Sequence[Heartbeat]) -> list[Reply]:
        """Record ``beats`` and answer each: the order for its host if it should upgrade now.

        The batch is read in one store call and committed in one; a commit whose guard no
        longer holds is decided again on a fresh read. Never raises for a store failure:
        the heartbeats are then answered with no order and the error.
        """
        now = self._clock()
        refusals = [self.admission.refusal(b, now) for b in beats]
        if any(refusals):
            return self._answer_admitted(beats, refusals)
        intervals = [self.fleet.record(beat, now) for beat in beats]
        try:
            current = self._cache.get(now)
            if current is None:
                return self._paced([NO_ORDER] * len(beats), None, None, None)
            task, rollout = current
            if self._pacer is not None:
                self._pacer.observe(task.id, rollout, now)
            reads = self._store.read(task.id, [b.host for b in beats])
            free = now >= self._cache.full_until
            verdicts = [
                rules.on_heartbeat(
                    task,
                    rollout,
                    b,
                    r,
                    now,
                    slot_may_be_free=free,
                    interval_s=g,
                    seen_since=self._since(b.host),
                )
                for b, r, g in zip(beats, reads, intervals, strict=True)
            ]
            replies, actions = self._commit(task, beats, verdicts, now, intervals, rollout.wave)
            return self._paced(replies, rollout, reads, actions, task, now)
        except StoreError as exc:
            log.error("store failed; answering no order: %s", exc)
            return [Reply(error=f"store failed: {exc}")] * len(beats)

    def _answer_admitted(self, beats: Sequence[Heartbeat], refusals: list[str]) -> list[Reply]:
        """Answer the heartbeats :class:`Admission` lets in; the others get their refusal."""
        kept = [b for b, why in zip(beats, refusals, strict=True) if not why]
        answers = iter(self.answer(kept) if kept else [])
        return [Reply(refused=why) if why else next(answers) for why in refusals]

    def _paced(
        self,
        replies: list[Reply],
        rollout: RolloutState | None,
        reads: Sequence[HostRead] | None,
        actions: Sequence[Action] | None,
        task: Task | None = None,
        now: float = 0.0,
    ) -> list[Reply]:
        """``replies`` with when each host should beat next, when check-ins are paced."""
        pacer = self._pacer
        if pacer is None:
            return replies
        bake_s = 0.0
        if task is not None and rollout is not None:
            waves = task.effective_plan.waves
            bake_s = waves[rollout.wave].bake_s if rollout.wave < len(waves) else 0.0
        out = []
        for i, reply in enumerate(replies):
            wait = pacer.advise(
                rollout,
                reads[i] if reads is not None else None,
                actions[i] if actions is not None else Action.NOTHING,
                reply.task is not None,
                self._uniform(),
                bake_s=bake_s,
                now=now,
            )
            out.append(reply if wait is None else replace(reply, next_beat_s=wait))
        return out

    def _since(self, host: str) -> float | None:
        seen = self.fleet.known(host)
        return seen.since if seen is not None else None

    def _commit(
        self,
        task: Task,
        beats: Sequence[Heartbeat],
        verdicts: list[Verdict],
        now: float,
        intervals: Sequence[float | None],
        wave: int,
    ) -> tuple[list[Reply], list[Action]]:
        """Commit the verdicts; return the replies and what each heartbeat finally meant
        (``wave``: the rollout's current wave, which picks a mirror rule that names one)."""
        replies = [NO_ORDER] * len(beats)
        actions = [v.decision.action for v in verdicts]
        pending = [(i, v.commit) for i, v in enumerate(verdicts) if v.commit is not None]
        outcomes = self._store.commit([commit for _, commit in pending])
        for (i, _), first in zip(pending, outcomes, strict=True):
            verdict: Verdict = verdicts[i]
            outcome: Outcome | None = first
            for _ in range(TRIES):
                if outcome != Outcome.STALE:
                    break
                verdict, outcome = self._again(task, beats[i], now, intervals[i])
            actions[i] = verdict.decision.action
            if outcome == Outcome.FULL and self.config.full_backoff_s:
                self._cache.full_until = now + self.config.full_backoff_s
            if outcome == Outcome.OK:
                if verdict.decision.action in (Action.COMPLETE, Action.FAIL):
                    self._cache.freed()
                _log(task, beats[i], verdict)
                if verdict.send:
                    rule = task.effective_plan.mirror_rule(beats[i].labels, wave)
                    replies[i] = Reply(task, mirror_rule=rule)
        return replies, actions

    def _again(
        self, task: Task, beat: Heartbeat, now: float, interval: float | None
    ) -> tuple[Verdict, Outcome | None]:
        """Decide ``beat`` again on a fresh read of the rollout and the host."""
        rollout = self._store.rollout(task.id, now)
        self._cache.update(task, rollout)
        read = self._store.read(task.id, [beat.host])[0]
        verdict = rules.on_heartbeat(
            task, rollout, beat, read, now, interval_s=interval, seen_since=self._since(beat.host)
        )
        if verdict.commit is None:
            return verdict, None
        return verdict, self._store.commit([verdict.commit])[0]

    # ---- housekeeping --------------------------------------------------------------------

    def tick(self) -> None:
        """Periodic work: flush the fleet view, expire leases, bake and promote waves."""
        self.housekeeping.tick()


def _log(task: Task, beat: Heartbeat, verdict: Verdict) -> None:
    """One line per order, failed attempt and finished host (an agent that reports its state
    gets the order again at each idle beat: that is logged at debug level)."""
    action = verdict.decision.action
    if action == Action.ADMIT:
        log.info("ordered %s to install %s (%s)", beat.host, task.version, task.id)
    elif action == Action.RESEND:
        level = logging.DEBUG if beat.reports_state else logging.INFO
        log.log(level, "sent the order for %s again to %s (%s)", task.version, beat.host, task.id)
    elif action == Action.FAIL:
        log.warning("%s failed an attempt at %s: %s", beat.host, task.id, verdict.decision.reason)
    elif action == Action.COMPLETE:
        log.info("%s finished %s", beat.host, task.id)
    elif action == Action.RENEW and beat.state == UpgradeState.RESTARTING and beat.served_by:
        sources = ", ".join(f"{role} from {url}" for role, url in sorted(beat.served_by.items()))
        log.info("%s restarts into %s (%s): fetched %s", beat.host, task.version, task.id, sources)
