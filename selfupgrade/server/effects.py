"""What the rulebook hands a store to commit: guarded writes, and nothing that needs a rule.

A :class:`Commit` is computed by :mod:`selfupgrade.server.rules` from what was read, and
carried out by a store all at once or not at all. Its guards say what the rule assumed:

* each host's progress is still at the revision that was read (:attr:`HostWrite.expect_rev`);
* the rollout's status is one of :attr:`Guard.statuses`, its fields and counters have the
  values in :attr:`Guard.fields` and :attr:`Guard.counters`, and the hosts in
  :attr:`Commit.join` are not members yet;
* when a write takes a slot, the leases of this rollout (every one it holds: a lease that ran
  out still counts until the failure it means is committed and the lease dropped), the live
  leases (deadline after :attr:`Commit.now`) of the other rollouts in
  :attr:`Commit.slot_pools`, plus the slots the commit takes, stay within
  :attr:`Commit.slot_limit`, and the host holds no live lease in them already.

With :attr:`Commit.release_others`, the written hosts' leases in the other rollouts of
:attr:`Commit.slot_pools` count as gone for that guard, and are dropped with the commit.

The store answers :class:`Outcome`: ``OK`` (everything written), ``FULL`` (the slot guard
failed), ``STALE`` (any other guard failed: read again, decide again). A store knows no
rollout rule: it compares, adds counters, sets fields and keeps leases.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .tasks import HostProgress, Status, TextEnum

__all__ = ["Commit", "Guard", "HostWrite", "Outcome"]


class Outcome(TextEnum):
    """A store's answer to one commit."""

    OK = "ok"
    FULL = "full"
    STALE = "stale"


@dataclass(frozen=True, slots=True)
class HostWrite:
    """One host's new progress, and its lease.

    Attributes:
        progress: the new record; the store keeps it at revision ``expect_rev + 1``.
        expect_rev: the revision the rule read (0: no record).
        lease_until: hold a slot until then; ``None``: hold none (release it if held).
        takes_slot: the host held no slot before: it counts against the slot guard.
    """

    progress: HostProgress
    expect_rev: int
    lease_until: float | None = None
    takes_slot: bool = False

    @property
    def host(self) -> str:
        """The host written."""
        return self.progress.host


@dataclass(frozen=True)
class Guard:
    """What the rollout must still look like for a commit to apply.

    Attributes:
        statuses: its status must be one of these (``None``: any).
        fields: these fields (``status``, ``wave``, ``wave_done_at``) must have these values.
        counters: these counters must have these values (a missing counter is 0).
    """

    statuses: frozenset[Status] | None = None
    fields: Mapping[str, Any] = field(default_factory=dict)
    counters: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Commit:
    """Changes to one rollout, applied atomically when every guard holds.

    Attributes:
        task_id: the rollout.
        now: the time the rule decided at (leases with a deadline after it are live).
        writes: hosts' new progress and leases.
        guard: what the rollout must still look like.
        slot_limit: when a write takes a slot, the most live leases there may be after it.
        slot_pools: rollouts whose live leases count against the limit (empty: this one).
        release_others: the written hosts are done with the other rollouts of
            ``slot_pools`` (they reported that they are not upgrading): drop their leases
            there.
        add: counter deltas.
        set: new values of rollout fields (``status``, ``halt_reason``, ``wave``,
            ``wave_done_at``).
        join: hosts that become members, with their wave (guard: not members yet).
        deactivate: when this rollout is the active one, no rollout is active afterwards.
    """

    task_id: str
    now: float
    writes: tuple[HostWrite, ...] = ()
    guard: Guard = field(default_factory=Guard)
    slot_limit: int = 0
    slot_pools: tuple[str, ...] = ()
    release_others: bool = False
    add: Mapping[str, int] = field(default_factory=dict)
    set: Mapping[str, Any] = field(default_factory=dict)
    join: Mapping[str, int] = field(default_factory=dict)
    deactivate: bool = False

    @property
    def pools(self) -> tuple[str, ...]:
        """The rollouts whose leases count against :attr:`slot_limit`."""
        return self.slot_pools or (self.task_id,)

    @property
    def others(self) -> tuple[str, ...]:
        """The rollouts other than this one whose leases of the written hosts are dropped."""
        if not self.release_others:
            return ()
        return tuple(p for p in self.slot_pools if p != self.task_id)

    @property
    def takes(self) -> int:
        """Slots the commit takes."""
        return sum(1 for w in self.writes if w.takes_slot)
