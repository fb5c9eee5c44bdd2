"""Server-paced check-ins: each heartbeat reply may tell the host when to beat next.

A fleet that beats every minute sends hbs sixty heartbeats per host per hour, though most
hosts have nothing to do most of the time. With :class:`Pacing` in the plane's config, the
reply to a heartbeat carries ``next_beat_s``:

* nothing (the agent's own interval) while the host holds a slot or has just been ordered,
  and while hbs cannot tell how long it will wait (the first moments of a wave, before any
  host has finished);
* for a host of the current wave waiting for a slot, as long as keeps the slots filled:
  the waiting hosts together must come back ``headroom`` times faster than slots free
  (measured from the rollout's counters over ``window_s``, afresh in each wave, from its
  first finished host), so a freed slot is taken soon after it frees;
* for a host of the next wave: while the current wave bakes, until its bake ends (spread
  after that moment, not around it); before, half the time until the next wave can start
  (the rest of the current wave at the mean rate slots free, or nothing while that rate is
  not known yet, then the bake), so that its hosts come back in ever shorter steps;
* ``rarely_s`` otherwise, and at most: a host of a wave after the next, a host that is done
  or given up on;
* ``idle_s`` when no rollout is under way (none, or paused, halted, complete), so that a
  rollout published meanwhile reaches its first hosts within about that long;

each spread by ``±jitter``, so that a fleet told the same thing does not come back at once.
An agent obeys within bounds it sets (:class:`~selfupgrade.updater.UpdaterConfig`); agents
that ignore the field (the seed's falcon-agent, which speaks JSON-RPC) are unaffected. A host
counts as lost only after several of its own intervals of silence
(:func:`~selfupgrade.server.rules.is_lost`), so a paced host is not taken for a lost one.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from . import rules
from .rules import Action
from .tasks import HostRead, RolloutState, Status

__all__ = ["Pacer", "Pacing"]


@dataclass(frozen=True)
class Pacing:
    """How hbs paces check-ins (see the module docstring).

    Attributes:
        rarely_s: the wait asked, during a rollout, of a host with nothing to do soon.
        idle_s: the wait asked when no rollout is under way (none, paused, halted, complete):
            a rollout published meanwhile reaches its first hosts within about that long.
        jitter: each wait is spread by this fraction (0.2 = ±20%).
        headroom: how many times faster than slots free the waiting hosts come back.
        window_s: over how long the rate at which slots free is measured.
    """

    rarely_s: float = 900.0
    idle_s: float = 300.0
    jitter: float = 0.2
    headroom: float = 4.0
    window_s: float = 300.0

    def __post_init__(self) -> None:
        for name in ("rarely_s", "idle_s", "headroom", "window_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"pacing {name}: must be a positive number, got {value!r}")
        if not isinstance(self.jitter, (int, float)) or not 0 <= self.jitter < 1:
            raise ValueError(f"pacing jitter: must be at least 0 and below 1, got {self.jitter!r}")


class Pacer:
    """The advice of one plane: :meth:`observe` the rollout as the heartbeat path reads it,
    then :meth:`advise` each reply."""

    def __init__(self, pacing: Pacing) -> None:
        self.pacing = pacing
        self._of = ("", -1)
        self._samples: deque[tuple[float, int]] = deque()

    def observe(self, task_id: str, rollout: RolloutState, now: float) -> None:
        """Note how many hosts of ``task_id`` have finished (done, given up on, or failed an
        attempt: each frees a slot) by ``now``; the count starts again with each wave."""
        if (task_id, rollout.wave) != self._of:  # a wave frees slots at a rate of its own
            self._of, self._samples = (task_id, rollout.wave), deque()
        finished = rollout.done + rollout.failed + rollout.failures
        samples, window = self._samples, self.pacing.window_s
        if samples and now - samples[-1][0] < window / 16:
            return
        samples.append((now, finished))
        while len(samples) > 2 and now - samples[1][0] >= window:
            samples.popleft()

    def turnover(self) -> float:
        """Slots freed per second over the window, from the first host that finished in it
        (0: none yet): the wait for a wave's first upgrades does not count as a slow rate."""
        samples = self._samples
        if len(samples) < 2:
            return 0.0
        first = 0
        while first + 1 < len(samples) and samples[first + 1][1] == samples[0][1]:
            first += 1
        (t0, n0), (t1, n1) = samples[first], samples[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0

    def advise(
        self,
        rollout: RolloutState | None,
        read: HostRead | None,
        action: Action,
        ordered: bool,
        uniform: float,
        *,
        bake_s: float = 0.0,
        now: float = 0.0,
    ) -> float | None:
        """Seconds until the host's next heartbeat, or ``None`` for its own interval.

        Args:
            rollout: the active rollout's state (``None``: there is none).
            read: the host in that rollout.
            action: what its heartbeat meant (:class:`~selfupgrade.server.rules.Action`;
                ``ADMIT`` without ``ordered``: every slot was held).
            ordered: the reply carries the order.
            uniform: a random number in [0, 1) for the jitter.
            bake_s: the current wave's bake time.
            now: the time (the plane's clock).
        """
        wait = self._wait(rollout, read, action, ordered, bake_s, now)
        if wait is None:
            return None
        seconds, not_before = wait
        jitter = self.pacing.jitter
        if not_before:  # a moment to meet (a wave's start): spread after it, not around it
            return round(min(seconds * (1.0 + jitter * uniform), self.pacing.rarely_s), 1)
        return round(seconds * (1.0 - jitter + 2.0 * jitter * uniform), 1)

    def _wait(
        self,
        rollout: RolloutState | None,
        read: HostRead | None,
        action: Action,
        ordered: bool,
        bake_s: float,
        now: float,
    ) -> tuple[float, bool] | None:
        """The wait and whether it must not end early, or ``None`` (the host's own pace)."""
        rarely = (self.pacing.rarely_s, False)
        if rollout is None or rollout.status != Status.ACTIVE or read is None:
            return (self.pacing.idle_s, False)
        if action == Action.COMPLETE or rules.settled(read.progress):
            return rarely
        if ordered or action not in (Action.NOTHING, Action.ADMIT):
            return None  # working on an order, or just failed one: its own pace
        waves = rollout.waves
        wave = read.wave if read.wave is not None else len(waves) - 1  # newcomers: the last
        if wave > rollout.wave + 1 or rollout.wave >= len(waves):
            return rarely
        current = waves[rollout.wave]
        waiting = current.members - current.done - current.failed - rollout.in_flight
        turnover = self.turnover()
        if wave == rollout.wave + 1:  # the next wave: meet its start
            if rollout.wave_done_at is not None:  # baking: it starts at the bake's end
                starts_in = rollout.wave_done_at + bake_s - now
                return (starts_in, True) if starts_in >= 1.0 else None
            if turnover > 0:
                starts_in = (max(waiting, 0) + rollout.in_flight) / turnover + bake_s
            else:
                starts_in = bake_s  # at least, from when the current wave settles
            wait = starts_in / 2
        elif waiting <= 0 or turnover <= 0:
            return None
        else:
            wait = waiting / (self.pacing.headroom * turnover)
        return (min(wait, self.pacing.rarely_s), False) if wait >= 1.0 else None
