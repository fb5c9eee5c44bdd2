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
   * (its lease running out is housekeeping's business, :func:`expire`: a host that speaks
     is judged on what it says);
   * it reports working on the order (downloading ... restarting): the lease is renewed;
   * an unmodified falcon agent, which reports only its version and ``InUpgrading``, is
     judged by :func:`judge_silent_agent`: the order is never sent twice to one process;
   * otherwise (an agent that reports its state, and did not get the order or is still
     backing off on its side): the order is sent again (such an agent acts on a task once).

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
    "SILENT_BEATS",
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
    "judge_silent_agent",
    "may_join",
    "on_heartbeat",
    "on_probation",
    "retry_at",
    "settled",
    "silence_grace",
    "silence_reason",
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
    WAIT = "wait"
    """An unmodified agent reported the old version once after its order (the beat may have
    crossed the order): note it, extend the lease, send nothing."""
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


def on_probation(task: Task, seen_since: float | None, now: float) -> bool:
    """Whether a host first heard from at ``seen_since`` must still wait before it joins
    ``task``: it appeared after the rollout was published, less than ``probation_s`` ago.
    Until then it takes no slot, counts as no member and spends no failure budget, so that
    names made up during a rollout cannot steer it."""
    return (
        seen_since is not None
        and seen_since > task.created_at
        and now - seen_since < task.limits.probation_s
    )


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
    if state == HostState.DONE and not beat.reports_state:
        return NOTHING  # what an unmodified agent did cannot be checked again
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
        if not beat.reports_state:
            return judge_silent_agent(task, beat, progress, now)
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


def judge_silent_agent(task: Task, beat: Heartbeat, progress: HostProgress, now: float) -> Decision:
    """What the idle heartbeat of an admitted, unmodified falcon agent means.

    Such an agent says only its version and whether a download is running. After its order
    it either kills itself (the upgrade worked, or a config was replaced; a new process
    reports) or keeps running the old version (md5 mismatch, HTTP error: it restored its
    backup). So, from the process the order went to, the old version and no download is a
    failed attempt, from the second such beat on (the first may have crossed the order, or
    fallen between the end of the download and the agent's kill). From a new process it is
    the end of the attempt: a config-only task is done; otherwise the new version did not
    come up. When it cannot be told (hbs restarted since the order, or another replica sent
    it), the order is sent to the reporting process once. A download that has not ended in a
    restart within the task's ``lease_s`` of the order has failed too.
    """
    same = _same_process(progress.process, beat.process)
    if beat.state in WORKING_STATES:
        if now - progress.admitted_at > task.limits.lease_s:
            return Decision(
                Action.FAIL,
                f"no restart within {task.limits.lease_s:g} s of the order: still downloading",
            )
        return Decision(Action.RENEW)
    if same is None:
        return Decision(Action.RESEND)
    if not same:
        if not task.changes_program:
            return Decision(Action.COMPLETE)
        return Decision(
            Action.FAIL,
            f"restarted after the order but still reports {beat.version}: the new version "
            "did not come up (download error, md5 mismatch, or it restored its backup)",
        )
    if progress.idle_beats < 1:
        return Decision(Action.WAIT)
    return Decision(
        Action.FAIL,
        f"reported {beat.version} again after the order without restarting: the agent rolled "
        "back (md5 mismatch, download error)",
    )


def _same_process(ordered: str, reporting: str) -> bool | None:
    """Whether two process ids (``"<listener>/<n>"``) name one process; ``None``: cannot
    tell (unknown, or given by different listeners)."""
    if not ordered or not reporting:
        return None
    if ordered.partition("/")[0] != reporting.partition("/")[0]:
        return None
    return ordered == reporting


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
    interval_s: float | None = None,
    seen_since: float | None = None,
) -> Verdict:
    """The verdict on one heartbeat: :func:`decide`, and the commit that carries it out.

    Args:
        slot_may_be_free: ``False`` when the caller knows every slot is held (the store
            refused an admission a moment ago): an admission is then not even tried.
        interval_s: the host's heartbeat interval as measured (``None``: unknown); an
            admission sets the host's silence grace from it.
        seen_since: when the host was first heard from (``None``: unknown); a host first
            heard from after the rollout was published joins it only after the rollout's
            ``probation_s`` (:func:`on_probation`).
    """
    wave = read.wave
    joining = wave is None
    if wave is None:
        if not may_join(task, beat) or on_probation(task, seen_since, now):
            return NO_VERDICT
        wave = len(task.effective_plan.waves) - 1
    decision = decide(task, beat, read.progress, now, may_admit=admits(task, rollout, wave, now))
    if decision.action == Action.ADMIT and not slot_may_be_free and not joining:
        return NO_VERDICT
    commit = _carry_out(task, rollout, decision, beat, read, wave, now, interval_s)
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
    interval_s: float | None,
) -> Commit | None:
    action, current, rev = decision.action, read.progress, read.rev
    if action == Action.ADMIT:
        grace = silence_grace(task, interval_s)
        lease = now + grace
        progress = HostProgress(
            host=beat.host,
            state=HostState.ADMITTED,
            attempts=current.attempts if current is not None else 0,
            lease_until=lease,
            failures_at_admit=beat.failures,
            admitted_at=now,
            process=beat.process,
            grace_s=grace,
        )
        admission = Commit(
            task.id,
            now,
            (HostWrite(progress, rev, lease, takes_slot=True),),
            # the wave too: its limit is the one the slot is counted against
            Guard(statuses=ADMITTING, fields={"wave": rollout.wave}),
            slot_limit=slot_limit(task, rollout),
        )
        return _sharing_slots(task, beat, admission)
    if current is None:
        if action == Action.COMPLETE:
            return _sharing_slots(task, beat, _complete(task, beat.host, None, 0, wave, now))
        return None
    lease = now + (current.grace_s or task.limits.lease_s)
    if action == Action.RESEND:
        renewed = replace(current, lease_until=lease, process=beat.process, idle_beats=0)
        return Commit(task.id, now, (HostWrite(renewed, rev, lease),), Guard(statuses=_RESENDING))
    if action == Action.RENEW:
        # an unmodified agent's downloading beat also says which process is at work
        working = replace(
            current, lease_until=lease, started=True, process=beat.process or current.process
        )
        return Commit(task.id, now, (HostWrite(working, rev, lease),))
    if action == Action.WAIT:
        noted = replace(current, lease_until=lease, idle_beats=current.idle_beats + 1)
        return Commit(task.id, now, (HostWrite(noted, rev, lease),))
    if action == Action.COMPLETE:
        return _complete(task, beat.host, current, rev, wave, now)
    if action == Action.FAIL:
        return failed(task, rollout, current, wave, decision.reason, now)
    return None


def _sharing_slots(task: Task, beat: Heartbeat, commit: Commit) -> Commit:
    """For a rollout that shares its slots with earlier ones: count their leases, and drop
    the host's own lease there when it reports that it is not upgrading any more."""
    if not task.shares_slots_with:
        return commit
    idle = beat.state not in WORKING_STATES and beat.confirmed
    return replace(commit, slot_pools=(task.id, *task.shares_slots_with), release_others=idle)


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


SILENT_BEATS = 3
"""Heartbeats a host may miss after its order, on top of its restart, before it is silent."""


def silence_grace(task: Task, interval_s: float | None) -> float:
    """How long an admitted host may stay silent before its attempt fails: a few of its
    heartbeat intervals plus the time it may take to restart (``restart_grace_s``), never
    more than the task's ``lease_s`` (which is also the grace when the interval is unknown).

    A falcon agent beating every 5 s gets 3 x 5 + 30 = 45 s instead of a 180 s lease: a host
    bricked by its order (an agent that cannot start again) stops counting as in flight,
    and counts as failed, within a minute.
    """
    limits = task.limits
    if interval_s is None or interval_s <= 0:
        return limits.lease_s
    return min(limits.lease_s, SILENT_BEATS * max(interval_s, 1.0) + limits.restart_grace_s)


def silence_reason(task: Task, progress: HostProgress) -> str:
    """Why an admitted host's attempt failed when its lease ran out."""
    grace = progress.grace_s or task.limits.lease_s
    if progress.lease_until - grace <= progress.admitted_at:
        return f"silent since the order: no heartbeat within {grace:.0f} s"
    what = "working on the order" if progress.started else "after the order"
    return f"silent for {grace:.0f} s since its last heartbeat ({what})"


def expire(
    task: Task,
    rollout: RolloutState,
    read: HostRead,
    now: float,
    *,
    deaf: tuple[float, float] | None = None,
    partition: bool = False,
) -> Commit | None:
    """A host whose lease ran out without news has failed its attempt. The lease of a host
    that no longer holds a slot (its rollout was cancelled while it upgraded) is dropped.

    Args:
        deaf: ``(since, until)``: hbs could not hear anyone in that time (the store failed or
            stalled, hbs was stopped): a lease that ran out then is not a failure of its
            host, and gets a new grace from ``now``.
        partition: many hosts that hold no slot went silent too: the host is likely behind
            a network partition, still working on its order; its lease gets a new grace and
            its slot stays held (freeing it would let more hosts upgrade at once than the
            limit). A host bricked by its order is silent alone, and fails.
    """
    p = read.progress
    if p is None or p.lease_until > now:
        return None
    if p.state != HostState.ADMITTED:
        return Commit(task.id, now, (HostWrite(p, p.rev),))
    if partition or (deaf is not None and deaf[0] < p.lease_until <= deaf[1]):
        lease = now + (p.grace_s or task.limits.lease_s)
        return Commit(task.id, now, (HostWrite(replace(p, lease_until=lease), p.rev, lease),))
    commit = failed(task, rollout, p, read.wave, silence_reason(task, p), now)
    return replace(commit, add={**commit.add, "silent": 1})


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


def is_lost(
    task: Task,
    last_seen: float | None,
    now: float,
    lost_after_leases: float,
    interval_s: float | None = None,
) -> bool:
    """Whether a host that has not settled counts as lost: silent for ``lost_after_leases``
    lease times, or as many of its own heartbeat intervals (``interval_s``, as measured)
    when they are longer (a host paced to beat rarely is not lost); its wave can then settle
    without it."""
    period = max(task.limits.lease_s, interval_s or 0.0)
    return last_seen is None or now - last_seen > lost_after_leases * period


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

    Aborting or cancelling stops the hosts in ``admitted`` (those holding a slot) from being
    ordered again: each backs off. Their leases are kept: a host may still be downloading or
    restarting, so its slot counts (against a later rollout's limit too, see
    :attr:`~selfupgrade.server.tasks.Task.shares_slots_with`) until its lease ends.
    """
    if rollout.status not in STATUS_CHANGES.get(status, frozenset()):
        return None
    writes: tuple[HostWrite, ...] = ()
    if status in (Status.ABORTED, Status.CANCELLED):
        writes = tuple(
            HostWrite(
                replace(p, state=HostState.BACKOFF, reason=reason),
                p.rev,
                p.lease_until if p.lease_until > now else None,
            )
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
