"""The rulebook: every rule of a rollout, for one host and for the rollout as a whole.

Pure: no I/O, no clock of its own, no store. Each rule takes what was read (the task, the
rollout's :class:`~selfupgrade.server.tasks.RolloutState`, a host's
:class:`~selfupgrade.server.tasks.HostRead`, a heartbeat) and ``now``, and returns the
:class:`~selfupgrade.server.effects.Commit` to make, guarded by what it assumed. A store only
keeps state and commits; when a guard no longer holds it answers ``STALE`` and the caller
reads again and asks the rule again. To change "who may be admitted", edit :func:`admits`
(and :func:`decide` for a host's own state), and their tests.

What a heartbeat means (:func:`decide`), in order:

1. The host already has the task's result: once it has confirmed its health (and is not in
   the middle of restarting into it), it is done and its slot is released; until then its
   slot is renewed.
2. Given up on this host for this task: nothing.
3. It holds a slot:
   * it reports a *new* failure of this task (its failure count grew since it was
     admitted): the attempt failed; the slot is released, the host backs off or is given up;
   * its lease ran out: the attempt failed ("no news within the lease");
   * it reports working on the order (downloading ... restarting): the lease is renewed;
   * otherwise (it did not get the order, or is still backing off on its side): the order
     is sent again.
4. It runs a newer version and the task does not allow a downgrade: nothing.
5. It is backing off and its time has not come: nothing.
6. The rollout does not admit it now (:func:`admits`): nothing.
7. Otherwise: admit it, if a slot of the current wave is free (:func:`slot_limit`).

The rest: a failed attempt backs off (doubling) or gives up after ``max_attempts``
(:func:`failed`), and halts the rollout when its wave goes over its failure budget; a lease
that runs out without news is a failed attempt (:func:`expire`); a wave settles when each of
its hosts is done, given up on, or lost, bakes, and is promoted (:func:`advance`); operators
pause, resume, abort (:func:`change_status`); a host that appears after the start joins a
100% last wave (:func:`may_join`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

from ..models import Heartbeat, UpgradeState
from .effects import Commit, Guard, HostWrite
from .plan import Plan
from .tasks import HostProgress, HostRead, HostState, RolloutState, Status, Task, TextEnum

__all__ = [
    "ADMITTING",
    "STATUS_CHANGES",
    "WORKING_STATES",
    "Action",
    "Decision",
    "Step",
    "Verdict",
    "admits",
    "advance",
    "change_status",
    "decide",
    "expire",
    "failed",
    "halt_reason",
    "initial_counters",
    "is_lost",
    "may_join",
    "on_heartbeat",
    "retry_at",
    "settled",
    "slot_limit",
]

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

ADMITTING = frozenset({Status.ACTIVE, Status.COMPLETE})
"""Statuses in which hosts of started waves are admitted (``complete``: late joiners)."""

_RESENDING = frozenset({Status.ACTIVE, Status.PAUSED, Status.COMPLETE})
"""Statuses in which an admitted host that did not act on its order gets it again."""

STATUS_CHANGES: Mapping[Status, frozenset[Status]] = {
    Status.PAUSED: frozenset({Status.ACTIVE}),
    Status.ACTIVE: frozenset({Status.PAUSED, Status.HALTED}),
    Status.ABORTED: frozenset({Status.ACTIVE, Status.PAUSED, Status.HALTED, Status.COMPLETE}),
    Status.CANCELLED: frozenset({Status.ACTIVE, Status.PAUSED, Status.HALTED, Status.COMPLETE}),
}
"""For each status a rollout may be set to by a command, the statuses it may be set from."""


class Action(TextEnum):
    """What a heartbeat means for its host."""

    NOTHING = "nothing"
    ADMIT = "admit"
    """Take a slot if one is free, and send the order if it was taken."""
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


NOTHING = Decision(Action.NOTHING)


@dataclass(frozen=True, slots=True)
class Verdict:
    """What one heartbeat leads to.

    Attributes:
        decision: what it means for the host.
        commit: what to commit (``None``: nothing to write).
        send: send the order to the host, once the commit is ``OK``.
    """

    decision: Decision
    commit: Commit | None = None
    send: bool = False


NO_VERDICT = Verdict(NOTHING)


# ---- admission -----------------------------------------------------------------------------


def slot_limit(task: Task, rollout: RolloutState) -> int:
    """Slots that may be held at once while the rollout is on its current wave."""
    waves = task.effective_plan.waves
    return waves[min(rollout.wave, len(waves) - 1)].max_in_flight


def admits(task: Task, rollout: RolloutState, wave: int, now: float) -> bool:
    """Whether the rollout admits a host of ``wave`` now: it is active (or complete, for late
    joiners), the host's wave has started, and the maintenance window is open."""
    window = task.effective_plan.window
    return (
        rollout.status in ADMITTING
        and wave <= rollout.wave
        and (window is None or window.is_open(now))
    )


def may_join(task: Task, beat: Heartbeat) -> bool:
    """A host that was not there when the rollout started joins its last wave, if that wave
    is everyone (100%) and the host is targeted."""
    plan = task.effective_plan
    return task.kind == "upgrade" and plan.waves[-1].percent == 100.0 and plan.matches(beat.labels)


def decide(
    task: Task,
    beat: Heartbeat,
    progress: HostProgress | None,
    now: float,
    *,
    may_admit: bool = True,
) -> Decision:
    """What one heartbeat means for one task; see the module docstring.

    Args:
        may_admit: :func:`admits` for the host's wave.
    """
    state = progress.state if progress is not None else None
    if task.done_for(beat):
        if not beat.confirmed or beat.state in WORKING_STATES:
            return Decision(Action.RENEW) if state == HostState.ADMITTED else NOTHING
        return NOTHING if state == HostState.DONE else Decision(Action.COMPLETE)
    if state == HostState.FAILED:
        return NOTHING
    if state == HostState.ADMITTED:
        assert progress is not None
        if _reports_new_failure(task, beat, progress):
            return Decision(Action.FAIL, beat.error or f"the agent reported {beat.state.value}")
        if progress.lease_until <= now:
            what = "working" if progress.started else "starting"
            return Decision(Action.FAIL, f"no news within the lease while {what}")
        if beat.state in WORKING_STATES:
            return Decision(Action.RENEW)
        return Decision(Action.RESEND)
    if beat.version > task.version and not task.allow_downgrade:
        return NOTHING
    if state == HostState.BACKOFF and progress is not None and now < progress.next_try_at:
        return NOTHING
    if not may_admit:
        return NOTHING
    return Decision(Action.ADMIT)


def _reports_new_failure(task: Task, beat: Heartbeat, progress: HostProgress) -> bool:
    if beat.state not in _FAILED_STATES:
        return False
    about_this = beat.task_id == task.id or beat.failed_version == task.version
    return about_this and beat.failures > progress.failures_at_admit


def on_heartbeat(
    task: Task,
    rollout: RolloutState,
    beat: Heartbeat,
    read: HostRead,
    now: float,
    *,
    slot_may_be_free: bool = True,
) -> Verdict:
    """The verdict on one heartbeat: :func:`decide`, and the commit that carries it out.

    Args:
        slot_may_be_free: ``False`` when the caller knows every slot is held (the store
            refused an admission a moment ago): an admission is then not even tried.
    """
    wave = read.wave
    joining = wave is None
    if wave is None:
        if not may_join(task, beat):
            return NO_VERDICT
        wave = len(task.effective_plan.waves) - 1
    decision = decide(task, beat, read.progress, now, may_admit=admits(task, rollout, wave, now))
    if decision.action == Action.ADMIT and not slot_may_be_free and not joining:
        return NO_VERDICT
    commit = _carry_out(task, rollout, decision, beat, read, wave, now)
    if joining:
        base = commit or Commit(task.id, now)
        add = dict(base.add)
        add[f"w{wave}:members"] = add.get(f"w{wave}:members", 0) + 1
        commit = replace(base, join={beat.host: wave}, add=add)
    send = decision.action in (Action.ADMIT, Action.RESEND)
    return Verdict(decision, commit, send)


def _carry_out(
    task: Task,
    rollout: RolloutState,
    decision: Decision,
    beat: Heartbeat,
    read: HostRead,
    wave: int,
    now: float,
) -> Commit | None:
    action, current, rev = decision.action, read.progress, read.rev
    lease = now + task.limits.lease_s
    if action == Action.ADMIT:
        progress = HostProgress(
            host=beat.host,
            state=HostState.ADMITTED,
            attempts=current.attempts if current is not None else 0,
            lease_until=lease,
            failures_at_admit=beat.failures,
            admitted_at=now,
        )
        return Commit(
            task.id,
            now,
            (HostWrite(progress, rev, lease, takes_slot=True),),
            # the wave too: its limit is the one the slot is counted against
            Guard(statuses=ADMITTING, fields={"wave": rollout.wave}),
            slot_limit=slot_limit(task, rollout),
        )
    if current is None:
        if action == Action.COMPLETE:
            return _complete(task, beat.host, None, 0, wave, now)
        return None
    if action == Action.RESEND:
        write = HostWrite(replace(current, lease_until=lease), rev, lease)
        return Commit(task.id, now, (write,), Guard(statuses=_RESENDING))
    if action == Action.RENEW:
        write = HostWrite(replace(current, lease_until=lease, started=True), rev, lease)
        return Commit(task.id, now, (write,))
    if action == Action.COMPLETE:
        return _complete(task, beat.host, current, rev, wave, now)
    if action == Action.FAIL:
        return failed(task, rollout, current, wave, decision.reason, now)
    return None


def _complete(
    task: Task, host: str, current: HostProgress | None, rev: int, wave: int, now: float
) -> Commit:
    progress = HostProgress(
        host=host,
        state=HostState.DONE,
        attempts=current.attempts if current is not None else 0,
        admitted_at=current.admitted_at if current is not None else 0.0,
        done_at=now,
    )
    add = {"done": 1, f"w{wave}:done": 1}
    if current is not None and current.state == HostState.FAILED:
        add.update({"failed": -1, f"w{wave}:failed": -1})
    return Commit(task.id, now, (HostWrite(progress, rev),), add=add)


# ---- failures ------------------------------------------------------------------------------


def retry_at(task: Task, attempts: int, now: float) -> float:
    """When a host that failed ``attempts`` times may be admitted again (doubling back-off)."""
    return now + task.limits.retry_backoff_s * float(2 ** max(attempts - 1, 0))


def failed(
    task: Task,
    rollout: RolloutState,
    current: HostProgress,
    wave: int | None,
    reason: str,
    now: float,
) -> Commit:
    """A failed attempt of an admitted host: back off, or give up after ``max_attempts``; the
    rollout halts when the host's wave goes over its failure budget.

    The commit is guarded by the rollout's status and the wave's failure count as read, so
    that two failures committed at once cannot both miss the budget.
    """
    attempts = current.attempts + 1
    final = attempts >= task.limits.max_attempts
    progress = HostProgress(
        host=current.host,
        state=HostState.FAILED if final else HostState.BACKOFF,
        attempts=attempts,
        next_try_at=0.0 if final else retry_at(task, attempts, now),
        reason=reason[:500],
        admitted_at=current.admitted_at,
    )
    add = {"failures": 1}
    if final:
        add["failed"] = 1
    write = HostWrite(progress, current.rev)
    if wave is None:
        return Commit(task.id, now, (write,), add=add)
    add[f"w{wave}:failures"] = 1
    if final:
        add[f"w{wave}:failed"] = 1
    counted = rollout.counters.get(f"w{wave}:failures", 0)
    guard = Guard(fields={"status": rollout.status}, counters={f"w{wave}:failures": counted})
    changes = {}
    members = rollout.counters.get(f"w{wave}:members", 0)
    if rollout.status == Status.ACTIVE and counted + 1 > task.effective_plan.waves[wave].budget(
        members
    ):
        changes = {
            "status": Status.HALTED,
            "halt_reason": halt_reason(
                task.effective_plan, wave, counted + 1, members, current.host, reason
            ),
        }
    return Commit(task.id, now, (write,), guard, add=add, set=changes)


def halt_reason(plan: Plan, wave: int, failures: int, members: int, host: str, reason: str) -> str:
    """Why a rollout halted, when ``wave`` went over its failure budget."""
    w = plan.waves[wave]
    return (
        f"wave {wave + 1} ({w.name}) exceeded its failure budget: {failures} failed "
        f"attempt(s), {w.budget(members)} allowed; last: {host}: {reason}"
    )[:1000]


LEASE_EXPIRED = "no news within the lease"


def expire(task: Task, rollout: RolloutState, read: HostRead, now: float) -> Commit | None:
    """A host whose lease ran out without news has failed its attempt."""
    p = read.progress
    if p is None or p.state != HostState.ADMITTED or p.lease_until > now:
        return None
    return failed(task, rollout, p, read.wave, LEASE_EXPIRED, now)


# ---- the rollout as a whole ----------------------------------------------------------------


def initial_counters(task: Task, members: Iterable[int]) -> dict[str, int]:
    """The counters of a rollout that starts with ``members`` (each member's wave)."""
    per_wave = [0] * len(task.effective_plan.waves)
    for wave in members:
        per_wave[wave] += 1
    counters = {"done": 0, "failed": 0, "failures": 0}
    for k, n in enumerate(per_wave):
        counters.update(
            {f"w{k}:members": n, f"w{k}:done": 0, f"w{k}:failed": 0, f"w{k}:failures": 0}
        )
    return counters


def settled(progress: HostProgress | None) -> bool:
    """Whether a host no longer holds up its wave: done, or given up on."""
    return progress is not None and progress.state in (HostState.DONE, HostState.FAILED)


def is_lost(task: Task, last_seen: float | None, now: float, lost_after_leases: float) -> bool:
    """Whether a host that has not settled counts as lost: silent for ``lost_after_leases``
    lease times (its wave can then settle without it)."""
    return last_seen is None or now - last_seen > lost_after_leases * task.limits.lease_s


@dataclass(frozen=True)
class Step:
    """What :func:`advance` says to do with a rollout.

    Attributes:
        kind: ``bake`` (the wave settled: its bake starts), ``unbake`` (a host of a baking
            wave is no longer settled), ``promote`` (start wave ``wave``), ``complete``.
        wave: the wave the step is about.
        commit: the guarded commit that carries it out.
    """

    kind: str
    wave: int
    commit: Commit


def advance(task: Task, rollout: RolloutState, *, lost: int, now: float) -> Step | None:
    """Whether the current wave has settled and baked, and what comes next.

    A wave has settled when each of its hosts is done (confirmed the new version), given up
    on, or lost (``lost``: hosts of the wave that stopped heartbeating). It is promoted once
    it has stayed settled for its ``bake_s``. A rollout that is not active does not move.
    """
    if rollout.status != Status.ACTIVE:
        return None
    waves = task.effective_plan.waves
    index = rollout.wave
    guard = Guard(
        statuses=frozenset({Status.ACTIVE}),
        fields={"wave": index, "wave_done_at": rollout.wave_done_at},
    )

    def step(kind: str, about: int, **changes: object) -> Step:
        return Step(kind, about, Commit(task.id, now, guard=guard, set=changes))

    if index >= len(waves):
        return step("complete", index, status=Status.COMPLETE, wave_done_at=now)
    c = rollout.waves[index] if index < len(rollout.waves) else None
    members = c.members if c else 0
    is_settled = c is None or c.done + c.failed + lost >= members
    if not is_settled:
        return (
            step("unbake", index, wave_done_at=None) if rollout.wave_done_at is not None else None
        )
    if rollout.wave_done_at is None:
        return step("bake", index, wave_done_at=now)
    if now - rollout.wave_done_at < waves[index].bake_s:
        return None
    if index + 1 >= len(waves):
        return step("complete", index, status=Status.COMPLETE, wave_done_at=now)
    return step("promote", index + 1, wave=index + 1, wave_done_at=None)


def change_status(
    task: Task,
    rollout: RolloutState,
    status: Status,
    reason: str,
    admitted: Iterable[HostProgress],
    now: float,
    *,
    deactivate: bool = False,
) -> Commit | None:
    """An operator's (or a new rollout's) change of status; ``None`` when it is not allowed
    from the rollout's status (see :data:`STATUS_CHANGES`).

    Aborting or cancelling frees every slot: each host in ``admitted`` (the hosts holding
    one) backs off, so that a later rollout may admit it again.
    """
    if rollout.status not in STATUS_CHANGES.get(status, frozenset()):
        return None
    writes: tuple[HostWrite, ...] = ()
    if status in (Status.ABORTED, Status.CANCELLED):
        writes = tuple(
            HostWrite(replace(p, state=HostState.BACKOFF, lease_until=0.0), p.rev)
            for p in admitted
            if p.state == HostState.ADMITTED
        )
    return Commit(
        task.id,
        now,
        writes,
        Guard(statuses=frozenset({rollout.status})),
        set={"status": status, "halt_reason": "" if status == Status.ACTIVE else reason},
        deactivate=deactivate,
    )
