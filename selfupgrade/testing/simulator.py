"""A fleet simulator: the real rollout core (the same ControlPlane hbs runs) with a virtual
clock and simulated hosts, to answer "how long does a rollout of this plan take, and what is
the peak download bandwidth" for 100,000 hosts in seconds of real time.

::

    result = FleetSimulator(SimConfig(hosts=100_000, plan=plan)).run()
    print(result.summary())

What is simulated, and how:

* every host heartbeats every ``interval_s`` spread by ``±jitter``, starting at a random phase;
* an admitted host downloads ``artifact_bytes``; host bandwidths are log-normal around
  ``host_bandwidth_bps``; every ``step_s`` the server's capacity is shared among the active
  downloads by water-filling (no download above its host's bandwidth, the rest shared equally,
  never more than the capacity in all) and their progress advances; the total rate is the
  download bandwidth, whose peak is reported;
* then it installs and restarts (``install_s + restart_s``), heartbeats on trial, and confirms
  on its next heartbeat (``confirm_s`` later);
* ``fail_fraction`` of the hosts fail their upgrade (reported like an agent reports a bad
  download), ``vanish_fraction`` stop heartbeating at a random moment;
* the plane's housekeeping (lease expiry, promotion) runs every ``tick_s``;
* with ``pacing``, hbs paces check-ins (:mod:`~selfupgrade.server.pacing`): every host beats
  when its last reply asked, within the library agent's default bounds
  (:func:`~selfupgrade.policy.paced_interval`), or at ``interval_s`` when it asked nothing.

Heartbeats that could not change anything are skipped: hosts of waves that have not started
sleep until their wave starts (they are then recorded as seen, as their heartbeats would have
kept them), and hosts that have confirmed stop beating (they are recorded as heard every
half of the lost window, :meth:`~selfupgrade.server.fleet.FleetView.heard`). With
``park_waiting`` (the default), a host whose admission was refused because every slot is
held is parked instead of beating again; when a slot frees, a random parked host beats
after an exponential delay of mean ``interval_s / parked`` (the first of many independent
random-phase heartbeats), and parked hosts are recorded as seen every half of the lost
window. A promotion or any change of the
rollout's status wakes every parked host. This is equivalent in distribution to simulating
each of their heartbeats, which the core would all answer "nothing", and makes a 100,000-host
rollout ten times cheaper; ``park_waiting=False`` simulates every heartbeat. Everything else
(admission, leases, back-off, budgets, bake times, lost hosts) is the real code.

With ``pacing`` nothing is skipped: every heartbeat of every host, from publication to the
end, is simulated and counted, since what the server answers decides when the next one comes.
Without it, the heartbeats the fleet sent are counted as each live host's time over
``interval_s`` (what fixed intervals send), whichever of them were simulated.
"""

from __future__ import annotations

import heapq
import logging
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any

from ..models import Heartbeat, UpgradeState, parse_version
from ..policy import paced_interval
from ..server import rules
from ..server.pacing import Pacing
from ..server.plan import Plan
from ..server.plane import ControlPlane, PlaneConfig
from ..server.stores.base import Store
from ..server.stores.memory import MemoryStore
from ..server.tasks import Task, TaskLimits
from .toy import toy_release

__all__ = ["FleetSimulator", "SimConfig", "SimResult", "three_waves"]


def three_waves(limit: int = 2000, bake_s: float = 300.0) -> Plan:
    """A canary, 25%, everyone; ``limit`` upgrades at once in the big waves."""
    return Plan.from_json(
        {
            "waves": [
                {"name": "canary", "hosts": 1, "max_in_flight": 1, "bake_s": bake_s},
                {
                    "name": "25%",
                    "percent": 25,
                    "max_in_flight": limit,
                    "bake_s": bake_s,
                    "max_failure_ratio": 0.05,
                },
                {"name": "all", "percent": 100, "max_in_flight": limit, "max_failure_ratio": 0.05},
            ]
        }
    )


@dataclass(frozen=True)
class SimConfig:
    """The fleet, the plan and the environment to simulate.

    Attributes:
        hosts: fleet size.
        plan: the rollout plan.
        interval_s, jitter: heartbeat interval and its spread (a fraction).
        artifact_bytes: the download's size.
        host_bandwidth_bps: median download rate of one host (bytes/s).
        host_bandwidth_sigma: spread of the log-normal host rates.
        server_bandwidth_bps: the file server's (or CDN's) capacity (bytes/s).
        install_s: from downloaded to restarting.
        restart_s: from restarting to the new version's first heartbeat.
        confirm_s: from that heartbeat to the confirming one.
        fail_fraction: hosts whose upgrade fails.
        vanish_fraction: hosts that stop heartbeating at a random moment.
        lease_s, max_attempts, retry_backoff_s: the rollout's limits.
        tick_s: how often the plane's housekeeping runs.
        step_s: time step of the download model.
        max_virtual_s: give up after this much simulated time.
        park_waiting: park hosts refused for want of a slot (see the module docstring);
            not with ``pacing``.
        pacing: hbs paces check-ins; ``None``: every host beats every ``interval_s``.
        seed: random seed (the same seed gives the same run).
        batch_s: heartbeats that come within this many simulated seconds of one another are
            answered as one batch (as hbs's batcher answers those that arrive together under
            load: one round trip to the store for all); ``0``: each alone.
        store: where the control plane keeps its state; ``None``: a new in-memory store.
            A :class:`~selfupgrade.server.stores.redis.RedisStore` on a real redis-server
            runs the same rollout against it (``bench/million.py``); the store must be empty.
    """

    hosts: int = 100_000
    plan: Plan = field(default_factory=three_waves)
    interval_s: float = 60.0
    jitter: float = 0.2
    artifact_bytes: int = 64 << 20
    host_bandwidth_bps: float = 50e6
    host_bandwidth_sigma: float = 0.5
    server_bandwidth_bps: float = 1.25e9
    install_s: float = 1.0
    restart_s: float = 2.0
    confirm_s: float = 1.0
    fail_fraction: float = 0.001
    vanish_fraction: float = 0.001
    lease_s: float = 300.0
    max_attempts: int = 3
    retry_backoff_s: float = 120.0
    tick_s: float = 5.0
    step_s: float = 2.0
    max_virtual_s: float = 7 * 86400.0
    park_waiting: bool = True
    pacing: Pacing | None = None
    seed: int = 1
    batch_s: float = 0.0
    store: Store | None = None


@dataclass
class SimResult:
    """What a simulated rollout did.

    Attributes:
        status: the rollout's final status (``complete``, ``halted``, or ``timeout``).
        duration_s: simulated seconds from publication to the end.
        peak_bandwidth_bps: the highest total download rate.
        waves: ``(name, started_at, settled_at)`` per wave, in simulated seconds; a wave has
            settled when each of its hosts is done, given up on or lost (its bake begins).
        done, failed, failures: as the control plane counted them.
        heartbeats: heartbeats the plane answered.
        wall_s: real seconds the simulation took.
        sent: heartbeats the fleet sent from publication to the end (see the module
            docstring).
        hosts: the fleet's size.
    """

    status: str
    duration_s: float
    peak_bandwidth_bps: float
    waves: list[tuple[str, float, float | None]]
    done: int
    failed: int
    failures: int
    heartbeats: int
    wall_s: float
    halt_reason: str = ""
    sent: float = 0.0
    hosts: int = 0

    @property
    def per_host_hour(self) -> float:
        """Heartbeats per host per hour, over the rollout."""
        if not self.hosts or self.duration_s <= 0:
            return 0.0
        return self.sent / self.hosts / (self.duration_s / 3600)

    def summary(self) -> str:
        """A few lines for a terminal."""
        lines = [
            f"{self.status} in {self.duration_s / 60:.1f} min simulated "
            f"({self.wall_s:.1f} s real, {self.heartbeats} heartbeats); "
            f"peak download {self.peak_bandwidth_bps / 1e9:.2f} GB/s; done {self.done}, "
            f"given up {self.failed}, failed attempts {self.failures}; "
            f"{self.per_host_hour:.1f} heartbeats per host per hour"
        ]
        for name, start, end in self.waves:
            took = (
                f"settled after {(end - start) / 60:.1f} min" if end is not None else "unfinished"
            )
            lines.append(f"  wave {name}: starts at {start / 60:.1f} min, {took}")
        if self.halt_reason:
            lines.append(f"  halted: {self.halt_reason}")
        return "\n".join(lines)


_BEAT, _STEP, _RESTARTED, _TICK, _VANISH = range(5)
_IDLE, _DOWNLOADING, _RESTARTING, _TRIAL, _DONE, _FAILED = range(6)


class FleetSimulator:
    """Runs one rollout over a simulated fleet; see the module docstring."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.now = 0.0
        self.store = config.store if config.store is not None else MemoryStore()
        self._rng = random.Random(config.seed)
        self.plane = ControlPlane(
            self.store,
            PlaneConfig(task_cache_s=config.tick_s, pacing=config.pacing),
            clock=lambda: self.now,
            uniform=self._rng.random,
        )
        self._events: list[tuple[float, int, int, int]] = []
        self._seq = 0
        self._free: int | None = None

    def _free_slots(self, task: Task) -> int:
        """Slots an admission could take now (hbs itself learns it by trying). Read from the
        store once, then kept: an order takes one, and what could free one (a host that
        confirms or fails, the housekeeping) forgets the figure (``self._free = None``)."""
        if self._free is None:
            state = self.store.rollout(task.id, self.now)
            admitting = state.status in rules.ADMITTING
            self._free = max(0, rules.slot_limit(task, state) - state.in_flight) if admitting else 0
        return self._free

    def _at(self, when: float, kind: int, host: int) -> None:
        self._seq += 1
        heapq.heappush(self._events, (when, self._seq, kind, host))

    def run(self) -> SimResult:
        """Simulate the rollout to its end (complete, halted, or ``max_virtual_s``)."""
        server_log = logging.getLogger("selfupgrade.server")
        level = server_log.level
        server_log.setLevel(logging.ERROR)  # thousands of admissions are not news here
        try:
            return self._run()
        finally:
            server_log.setLevel(level)

    def _run(self) -> SimResult:
        c, rng = self.config, self._rng
        started = time.perf_counter()
        names = [f"h{i:06d}" for i in range(c.hosts)]
        old, new = parse_version("1.0"), parse_version("1.1")
        version = [old] * c.hosts
        phase = [_IDLE] * c.hosts
        failures = [0] * c.hosts
        bandwidth = [
            c.host_bandwidth_bps * math.exp(rng.gauss(0, c.host_bandwidth_sigma))
            for _ in range(c.hosts)
        ]
        fails = [rng.random() < c.fail_fraction for _ in range(c.hosts)]
        vanished = [False] * c.hosts
        vanished_at: dict[int, float] = {}
        remaining: dict[int, float] = {}  # bytes left of each active download
        peak = 0.0
        beats = 0
        stepping = False

        answer = self.plane.answer
        observe = self.plane.fleet.record
        for i in range(0, c.hosts, 1000):  # every host is known to the control plane
            answer([Heartbeat(host=name, version=old) for name in names[i : i + 1000]])
        release = toy_release("1.1").order("http://files.invalid/sim").release
        task = Task(
            "sim",
            release,
            TaskLimits(
                lease_s=c.lease_s, max_attempts=c.max_attempts, retry_backoff_s=c.retry_backoff_s
            ),
            plan=c.plan,
        )
        self.plane.commands.publish(task)
        members = self.store.members(task.id)
        by_wave: dict[int, list[int]] = {}
        index = {name: i for i, name in enumerate(names)}
        for name, wave in sorted(members.items()):  # a store may list them in any order
            by_wave.setdefault(wave, []).append(index[name])
        woken: set[int] = set()
        wave_start: dict[int, float] = {}
        wave_settled: dict[int, float] = {}

        paced = c.pacing is not None
        park = c.park_waiting and not paced
        # the wait each host was on when the rollout was published (no rollout: a pacing hbs
        # asked for idle_s)
        before = c.pacing.idle_s if c.pacing is not None else c.interval_s

        def wake(wave: int) -> None:
            if wave in woken:
                return
            woken.add(wave)
            wave_start[wave] = self.now
            if paced and wave:
                return  # its hosts have been beating since the start
            for h in range(c.hosts) if paced else by_wave.get(wave, []):
                # it was heartbeating all along, with nothing to decide; from now on it counts
                observe(Heartbeat(host=names[h], version=version[h]), self.now)
                self._at(self.now + rng.random() * before, _BEAT, h)

        wake(0)
        self._at(c.tick_s, _TICK, -1)
        for h in range(c.hosts):
            if rng.random() < c.vanish_fraction:
                self._at(rng.random() * c.max_virtual_s / 50, _VANISH, h)

        # locals for the loop below: it runs millions of times
        events, heappush, heappop, random = self._events, heapq.heappush, heapq.heappop, rng.random
        interval, low, spread = c.interval_s, 1.0 - c.jitter, 2.0 * c.jitter
        idle: dict[int, Heartbeat] = {}

        def idle_beat(h: int) -> Heartbeat:
            beat = idle.get(h)
            if beat is None or beat.version is not version[h]:
                beat = idle[h] = Heartbeat(host=names[h], version=version[h])
            return beat

        parked: list[int] = []  # hosts refused for want of a slot, waiting for one to free
        confirmed: list[int] = []  # hosts that confirmed and stopped beating
        coming: set[int] = set()  # unparked hosts whose heartbeat has not happened yet
        last_status = ("active", 0)
        observed_at = 0.0
        lost_window = 3.0 * c.lease_s

        def unpark(count: int, *, everyone: bool = False) -> None:
            if not everyone:
                count -= len(coming)  # slots already promised to hosts on their way
            for _ in range(min(count, len(parked))):
                i = int(random() * len(parked))
                h2 = parked[i]
                parked[i] = parked[-1]
                parked.pop()
                if vanished[h2]:
                    continue  # gone: it would not heartbeat again
                coming.add(h2)
                observe(idle_beat(h2), self.now)
                self._at(self.now + rng.expovariate((len(parked) + 1) / interval), _BEAT, h2)

        status, halt_reason = "timeout", ""
        while events:
            when, _, kind, h = heappop(events)
            if when > c.max_virtual_s:
                break
            self.now = when
            if kind == _TICK:
                self.plane.tick()
                self._free = None
                counters = self.store.rollout(task.id, self.now)
                if (counters.status, counters.wave) != last_status:
                    last_status = (counters.status, counters.wave)
                    unpark(len(parked), everyone=True)  # a new wave or status: all try again
                elif parked:
                    unpark(self._free_slots(task))
                if self.now - observed_at > lost_window / 2:
                    observed_at = self.now
                    parked[:] = [h2 for h2 in parked if not vanished[h2]]
                    for h2 in parked:  # they were heartbeating all along
                        observe(idle_beat(h2), self.now)
                    # so were the hosts that confirmed, with nothing new to say
                    confirmed[:] = [h2 for h2 in confirmed if not vanished[h2]]
                    self.plane.fleet.heard([names[h2] for h2 in confirmed], self.now)
                if counters.wave_done_at is not None:  # the wave settled; its bake began
                    wave_settled.setdefault(counters.wave, counters.wave_done_at)
                if counters.status in ("complete", "halted", "aborted"):
                    status, halt_reason = counters.status, counters.halt_reason
                    break
                wake(counters.wave)
                self._at(self.now + c.tick_s, _TICK, -1)
                continue
            if kind == _VANISH:
                vanished[h] = True
                vanished_at[h] = self.now
                remaining.pop(h, None)
                continue
            if kind == _BEAT:
                coming.discard(h)  # whatever happens next, this promised heartbeat is over
            if vanished[h]:
                continue
            if kind == _STEP:
                rates = _share(c.server_bandwidth_bps, {d: bandwidth[d] for d in remaining})
                peak = max(peak, sum(rates.values()))
                for d, rate in rates.items():
                    remaining[d] -= rate * c.step_s
                    if remaining[d] > 0:
                        continue
                    del remaining[d]
                    if vanished[d]:
                        continue
                    if fails[d]:
                        phase[d], failures[d] = _FAILED, failures[d] + 1
                    else:
                        phase[d] = _RESTARTING
                        self._at(self.now + c.install_s + c.restart_s, _RESTARTED, d)
                stepping = bool(remaining)
                if stepping:
                    self._at(self.now + c.step_s, _STEP, -1)
                continue
            # heartbeats (the hot path: most are hosts waiting for a slot); with batch_s, the
            # ones that follow within it are answered together, as hbs's batcher does
            batch = [(when, h, kind)]
            if c.batch_s:
                last, hosts_in = when + c.batch_s, {h}
                while events and events[0][2] in (_BEAT, _RESTARTED) and events[0][0] <= last:
                    if events[0][3] in hosts_in:
                        break  # a host's second heartbeat waits for the next batch
                    w2, _, k2, h2 = heappop(events)
                    if k2 == _BEAT:
                        coming.discard(h2)
                    if not vanished[h2]:
                        batch.append((w2, h2, k2))
                        hosts_in.add(h2)
                self.now = batch[-1][0]
            phases, outgoing = [], []
            for _, h2, k2 in batch:
                if k2 == _RESTARTED:  # its first heartbeat as the new version, on trial
                    version[h2], phase[h2] = new, _TRIAL
                    p = _TRIAL
                else:
                    p = phase[h2]
                    if p == _TRIAL:  # the heartbeat after its trial one confirms
                        p = phase[h2] = _DONE
                phases.append(p)
                outgoing.append(
                    idle_beat(h2)
                    if p == _IDLE
                    else self._heartbeat(h2, names, version, phase, failures)
                )
            replies = answer(outgoing)
            beats += len(batch)
            # what this batch took and freed is in the store now: the free slots are read
            # again once (when one may have freed), or lose the orders given
            if self._free is not None:
                if any(p in (_DONE, _FAILED) for p in phases):
                    self._free = None
                else:
                    self._free = max(0, self._free - sum(r.task is not None for r in replies))
            if park and parked:
                unpark(self._free_slots(task))  # a host that confirmed may have freed a slot
            for (when, h, _), p, reply in zip(batch, phases, replies, strict=True):
                order = reply.task
                if p == _TRIAL:  # its confirming heartbeat comes after confirm_s
                    self._at(when + c.confirm_s, _BEAT, h)
                    continue
                if p == _DONE and not paced:
                    confirmed.append(h)
                    continue  # confirmed: its later heartbeats change nothing
                if order is not None and p in (_IDLE, _FAILED):
                    phase[h] = _DOWNLOADING
                    remaining[h] = float(c.artifact_bytes)
                    if not stepping:
                        stepping = True
                        self._at(self.now + c.step_s, _STEP, -1)
                elif (
                    park
                    and p == _IDLE
                    and order is None
                    and members.get(names[h], 99) <= last_status[1]
                    and self._free_slots(task) == 0
                ):
                    parked.append(h)
                    continue
                self._seq = seq = self._seq + 1
                wait = reply.next_beat_s
                if wait is None:
                    wait = interval * (low + spread * random())
                else:  # as the library's agent obeys
                    wait = paced_interval(wait, interval, None)
                heappush(events, (when + wait, seq, _BEAT, h))

        counters = self.store.rollout(task.id, self.now)
        if paced:
            sent = float(beats)
        else:  # what fixed intervals send, simulated or not
            alive = sum(vanished_at.get(h, self.now) for h in range(c.hosts))
            sent = alive / c.interval_s
        return SimResult(
            status=status,
            duration_s=self.now,
            peak_bandwidth_bps=peak,
            waves=[
                (w.name, wave_start.get(k, float("nan")), wave_settled.get(k))
                for k, w in enumerate(c.plan.waves)
            ],
            done=counters.done,
            failed=counters.failed,
            failures=counters.failures,
            heartbeats=beats,
            wall_s=time.perf_counter() - started,
            halt_reason=halt_reason,
            sent=sent,
            hosts=c.hosts,
        )

    def _heartbeat(
        self, h: int, names: list[str], version: list[Any], phase: list[int], failures: list[int]
    ) -> Heartbeat:
        p = phase[h]
        if p == _FAILED:
            beat = Heartbeat(
                host=names[h],
                version=version[h],
                state=UpgradeState.FAILED,
                error="simulated failure",
                task_id="sim",
                failed_version=parse_version("1.1"),
                failures=failures[h],
            )
        elif p == _DOWNLOADING:
            beat = Heartbeat(host=names[h], version=version[h], state=UpgradeState.DOWNLOADING)
        elif p == _RESTARTING:
            beat = Heartbeat(host=names[h], version=version[h], state=UpgradeState.RESTARTING)
        elif p == _TRIAL:
            beat = Heartbeat(
                host=names[h], version=version[h], state=UpgradeState.CONFIRMING, confirmed=False
            )
        else:
            beat = Heartbeat(host=names[h], version=version[h])
        return beat


def _share(capacity: float, caps: dict[int, float]) -> dict[int, float]:
    """Water-filling: each download gets at most its cap; what is left is shared equally."""
    if not caps:
        return {}
    fair = capacity / len(caps)
    if min(caps.values()) >= fair:  # the usual case in a big wave: the server is the bottleneck
        return dict.fromkeys(caps, fair)
    rates: dict[int, float] = {}
    left, n = capacity, len(caps)
    for i, (d, cap) in enumerate(sorted(caps.items(), key=lambda kv: kv[1])):
        rate = min(cap, left / (n - i))
        rates[d] = rate
        left -= rate
    return rates
