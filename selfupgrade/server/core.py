"""The rollout core: what to do with one heartbeat. Pure: no I/O, the time is passed in.

:func:`decide` looks at the active task, the heartbeat, and what the store knows of this host
in this task, and returns one :class:`Decision`. The control plane then asks the store to carry
it out; the store does admission atomically, so the number of slots held never exceeds the
task's limit whatever the number of concurrent heartbeats or hbs processes.

The rules, in order:

1. The host already has the task's result: once it has confirmed its health (and is not in
   the middle of restarting into it), it is done and its slot is released; until then its slot
   is renewed.
2. Given up on this host for this task: nothing.
3. It holds a slot:
   * it reports a *new* failure of this task (its failure count grew since it was admitted):
     the attempt failed; the slot is released, and the host backs off or is given up on;
   * its lease ran out: the attempt failed ("no news within the lease");
   * it reports working on the order (downloading ... restarting): the lease is renewed;
   * otherwise (it did not get the order, or is still backing off on its side): the order is
     sent again.
4. It runs a newer version and the task does not allow a downgrade: nothing.
5. It is backing off and its time has not come: nothing.
6. The rollout does not admit it now (its wave has not started, the rollout is paused,
   halted or aborted, the maintenance window is closed): nothing.
7. Otherwise: try to admit it.

:func:`advance` is the other half: from a rollout's counters, whether the current wave has
settled (every host done, given up on, or lost), whether it has baked long enough, and so
whether to promote the next wave or to complete.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from ..models import Heartbeat, UpgradeState
from .tasks import HostProgress, Task, TaskCounters

__all__ = ["WORKING_STATES", "Action", "Decision", "Step", "advance", "decide", "retry_at"]

WORKING_STATES = frozenset(
    {
        UpgradeState.DOWNLOADING,
        UpgradeState.VERIFYING,
        UpgradeState.INSTALLING,
        UpgradeState.RESTARTING,
        UpgradeState.CONFIRMING,
    }
)
"""States in which a host is busy with an order: its slot is renewed."""

_FAILED_STATES = frozenset({UpgradeState.FAILED, UpgradeState.ROLLED_BACK})


class Action(str, enum.Enum):
    """What the store should do for this heartbeat."""

    NOTHING = "nothing"
    ADMIT = "admit"
    """Take a slot if one is free (atomically), and send the order if it was taken."""
    RESEND = "resend"
    """The host holds a slot but is idle: renew the slot and send the order again."""
    RENEW = "renew"
    """The host is working on the order: extend its lease."""
    COMPLETE = "complete"
    """The host is done: release its slot, count it done."""
    FAIL = "fail"
    """The attempt failed: release the slot; back off or give up on the host."""


@dataclass(frozen=True, slots=True)
class Decision:
    """An action and, for ``FAIL``, why."""

    action: Action
    reason: str = ""


def decide(
    task: Task,
    beat: Heartbeat,
    progress: HostProgress | None,
    now: float,
    *,
    may_admit: bool = True,
) -> Decision:
    """Decide what one heartbeat means for one task; see the module docstring.

    Args:
        may_admit: the rollout admits this host now (its wave has started, the rollout is
            active, the window is open); the store checks the first two again atomically.
    """
    if task.done_for(beat):
        if not beat.confirmed or beat.state in WORKING_STATES:
            if progress is not None and progress.state == "admitted":
                return Decision(Action.RENEW)
            return Decision(Action.NOTHING)
        if progress is not None and progress.state == "done":
            return Decision(Action.NOTHING)
        return Decision(Action.COMPLETE)
    if progress is not None and progress.state == "failed":
        return Decision(Action.NOTHING)
    if progress is not None and progress.state == "admitted":
        if _reports_new_failure(task, beat, progress):
            return Decision(Action.FAIL, beat.error or f"the agent reported {beat.state.value}")
        if progress.lease_until <= now:
            what = "working" if progress.started else "starting"
            return Decision(Action.FAIL, f"no news within the lease while {what}")
        if beat.state in WORKING_STATES:
            return Decision(Action.RENEW)
        return Decision(Action.RESEND)
    if beat.version > task.version and not task.allow_downgrade:
        return Decision(Action.NOTHING)
    if progress is not None and progress.state == "backoff" and now < progress.next_try_at:
        return Decision(Action.NOTHING)
    if not may_admit:
        return Decision(Action.NOTHING)
    return Decision(Action.ADMIT)


def _reports_new_failure(task: Task, beat: Heartbeat, progress: HostProgress) -> bool:
    if beat.state not in _FAILED_STATES:
        return False
    about_this = beat.task_id == task.id or beat.failed_version == task.version
    return about_this and beat.failures > progress.failures_at_admit


def retry_at(task: Task, attempts: int, now: float) -> float:
    """When a host that failed ``attempts`` times may be admitted again (doubling back-off)."""
    return now + task.limits.retry_backoff_s * float(2 ** max(attempts - 1, 0))


@dataclass(frozen=True)
class Step:
    """What :func:`advance` says to do with a rollout.

    Attributes:
        kind: ``none``; ``bake`` (the wave settled: start baking at ``at``); ``unbake`` (a host
            of a baking wave is no longer settled); ``promote`` (start wave ``wave``);
            ``complete`` (the last wave has baked).
        wave: the wave the step is about.
        at: the time of the step.
    """

    kind: str
    wave: int = 0
    at: float = 0.0


def advance(task: Task, counters: TaskCounters, *, lost: int, now: float) -> Step:
    """Decide whether the current wave has settled and baked, and what comes next.

    A wave has settled when each of its hosts is done (confirmed the new version), given up
    on, or lost (``lost``: hosts that stopped heartbeating). It is promoted once it has stayed
    settled for its ``bake_s``. A rollout that is not active does not move.
    """
    if counters.status != "active":
        return Step("none", counters.wave)
    waves = task.effective_plan.waves
    index = counters.wave
    if index >= len(waves):
        return Step("complete", index, now)
    c = counters.waves[index] if index < len(counters.waves) else None
    members = c.members if c else 0
    settled = c is None or c.done + c.failed + lost >= members
    if not settled:
        return Step("unbake", index) if counters.wave_done_at is not None else Step("none", index)
    if counters.wave_done_at is None:
        return Step("bake", index, now)
    if now - counters.wave_done_at < waves[index].bake_s:
        return Step("none", index)
    if index + 1 >= len(waves):
        return Step("complete", index, now)
    return Step("promote", index + 1, now)
