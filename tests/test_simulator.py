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


def test_batched_heartbeats_give_the_same_rollout_within_a_few_percent() -> None:
    """``batch_s`` answers the heartbeats of one simulated second together, as hbs's batcher
    does under load; the rollout it simulates is the same one: over four seeds, the mean
    duration within 5% (one rollout's duration varies by more from seed to seed: 1,060 to
    1,800 s)."""
    ratios = []
    for seed in range(1, 5):
        alone = FleetSimulator(SimConfig(**{**SMALL.__dict__, "seed": seed})).run()
        batched = FleetSimulator(
            SimConfig(**{**SMALL.__dict__, "seed": seed, "batch_s": 1.0})
        ).run()
        print(f"seed {seed}: alone: {alone.summary()}\nbatched: {batched.summary()}")
        assert batched.status == alone.status == "complete"
        assert abs(batched.done - alone.done) <= SMALL.hosts * 0.005
        ratios.append(batched.duration_s / alone.duration_s)
    assert abs(sum(ratios) / len(ratios) - 1) < 0.05, ratios


@pytest.mark.real
def test_the_simulator_drives_the_control_plane_on_a_real_redis(redis_url: str) -> None:
    """The same rollout with its state in a real redis-server (``SimConfig.store``), as
    ``bench/million.py`` runs it for a million hosts: the same outcome as in memory."""
    from selfupgrade.server.stores.redis import RedisStore

    config = SimConfig(**{**SMALL.__dict__, "hosts": 1000, "batch_s": 1.0})
    in_memory = FleetSimulator(config).run()
    on_redis = FleetSimulator(
        SimConfig(**{**config.__dict__, "store": RedisStore(redis_url)})
    ).run()
    print(f"in memory: {in_memory.summary()}\non Redis: {on_redis.summary()}")
    assert on_redis.status == "complete"
    assert (on_redis.done, on_redis.failed) == (in_memory.done, in_memory.failed)
    assert on_redis.duration_s == pytest.approx(in_memory.duration_s, rel=0.05)
