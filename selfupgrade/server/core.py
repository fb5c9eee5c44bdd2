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
6. Otherwise: try to admit it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from ..models import Heartbeat, UpgradeState
from .tasks import HostProgress, Task

__all__ = ["WORKING_STATES", "Action", "Decision", "decide", "retry_at"]

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


@dataclass(frozen=True)
class Decision:
    """An action and, for ``FAIL``, why."""

    action: Action
    reason: str = ""


def decide(task: Task, beat: Heartbeat, progress: HostProgress | None, now: float) -> Decision:
    """Decide what one heartbeat means for one task; see the module docstring."""
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
    return Decision(Action.ADMIT)


def _reports_new_failure(task: Task, beat: Heartbeat, progress: HostProgress) -> bool:
    if beat.state not in _FAILED_STATES:
        return False
    about_this = beat.task_id == task.id or beat.failed_version == task.version
    return about_this and beat.failures > progress.failures_at_admit


def retry_at(task: Task, attempts: int, now: float) -> float:
    """When a host that failed ``attempts`` times may be admitted again (doubling back-off)."""
    return now + task.limits.retry_backoff_s * float(2 ** max(attempts - 1, 0))
