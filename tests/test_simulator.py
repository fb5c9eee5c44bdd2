"""The fleet simulator: it drives the real control plane, so its rollouts obey the real rules."""

from __future__ import annotations

import math

import pytest

from selfupgrade.server.plan import Plan
from selfupgrade.testing.simulator import FleetSimulator, SimConfig, three_waves

SMALL = SimConfig(
    hosts=3000, plan=three_waves(300, bake_s=120), vanish_fraction=0.002, fail_fraction=0.002
)


def test_the_same_seed_gives_the_same_rollout() -> None:
    a, b = FleetSimulator(SMALL).run(), FleetSimulator(SMALL).run()
    assert (a.duration_s, a.done, a.failures, a.heartbeats) == (
        b.duration_s,
        b.done,
        b.failures,
        b.heartbeats,
    )
    c = FleetSimulator(SimConfig(**{**SMALL.__dict__, "seed": 2})).run()
    assert (c.waves, c.heartbeats) != (a.waves, a.heartbeats)


def test_waves_follow_each_other_after_their_bake() -> None:
    r = FleetSimulator(SMALL).run()
    assert r.status == "complete"
    assert r.done + r.failed + round(SMALL.hosts * SMALL.vanish_fraction * 3) >= SMALL.hosts * 0.99
    for (_, start, settled), (_, next_start, _) in zip(r.waves, r.waves[1:], strict=False):
        assert settled is not None
        assert next_start >= settled + 120 - SMALL.tick_s  # the bake, give or take a tick
        assert next_start - start > 0


def test_the_download_peak_never_exceeds_the_servers_capacity() -> None:
    r = FleetSimulator(SMALL).run()
    assert 0 < r.peak_bandwidth_bps <= SMALL.server_bandwidth_bps * (1 + 1e-9)
    narrow = FleetSimulator(SimConfig(**{**SMALL.__dict__, "server_bandwidth_bps": 50e6})).run()
    assert narrow.peak_bandwidth_bps <= 50e6 * (1 + 1e-9)
    assert narrow.duration_s > r.duration_s  # a thinner pipe takes longer


def test_a_failing_canary_halts_the_simulated_rollout() -> None:
    plan = Plan.from_json(
        {
            "waves": [
                {"name": "canary", "hosts": 1},
                {"name": "all", "percent": 100, "max_in_flight": 100},
            ]
        }
    )
    r = FleetSimulator(SimConfig(hosts=500, plan=plan, fail_fraction=1.0, max_attempts=1)).run()
    assert r.status == "halted" and "wave 1 (canary)" in r.halt_reason
    assert r.done == 0 and r.failures == 1


@pytest.mark.parametrize("hosts", [5000])
def test_parking_waiting_hosts_does_not_change_the_outcome(hosts: int) -> None:
    """Parking is an optimisation; with it, timings agree with simulating every heartbeat."""
    config = SimConfig(hosts=hosts, plan=three_waves(500, bake_s=60))
    exact = FleetSimulator(SimConfig(**{**config.__dict__, "park_waiting": False})).run()
    parked = FleetSimulator(config).run()
    assert parked.status == exact.status == "complete"
    assert math.isclose(parked.duration_s, exact.duration_s, rel_tol=0.10)
    assert abs(parked.done - exact.done) <= hosts * 0.001
    assert parked.heartbeats < exact.heartbeats
