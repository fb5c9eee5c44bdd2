"""Issue 16, point 3: a network that misbehaves, between agents and hbs and between hbs and
Redis (selfupgrade.testing.FaultProxy on 127.0.0.1; nothing leaves loopback).

30 real example falcon agents under a real supervisord beat to a real hbs process through two
proxies (half the agents through each) that add 200 ms each way and reset 5% of connections;
hbs keeps its state in a real redis-server through a third proxy. In the middle of the
rollout one agent proxy is partitioned for 30 s, later the Redis proxy for 10 s. The store is
sampled directly (not through the proxy) for the slots held.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
import redis

from examples.falcon_agent.build import build
from selfupgrade.testing import ArtifactServer, FaultProxy, RedisServer

from .fleet import AGENT_CFG, NEW, OLD, Fleet, Hbs, Sampler, serve_release, wait_until

pytestmark = pytest.mark.real

AGENTS = 30
LIMIT = 6


def test_the_proxy_delays_resets_and_partitions(artifact_server: ArtifactServer) -> None:
    data = b"x" * 200_000
    artifact_server.add("f", data)
    port = int(artifact_server.base_url.rsplit(":", 1)[1])
    with FaultProxy(("127.0.0.1", port), latency_s=0.2) as proxy:
        start = time.monotonic()
        reply = httpx.get(f"http://{proxy.address}/f", timeout=10, trust_env=False)
        took = time.monotonic() - start
        assert reply.content == data and took >= 0.4  # the request and its answer, 0.2 s each
        proxy.partition(True)
        with pytest.raises(httpx.TimeoutException):
            httpx.get(f"http://{proxy.address}/f", timeout=1, trust_env=False)
        proxy.partition(False)
        assert httpx.get(f"http://{proxy.address}/f", timeout=10, trust_env=False).content == data
    with FaultProxy(("127.0.0.1", port), reset_fraction=1.0, seed=1) as proxy:
        for _ in range(5):
            with pytest.raises(httpx.TransportError):
                httpx.get(f"http://{proxy.address}/f", timeout=10, trust_env=False)
        assert proxy.stats.resets == 5
    with pytest.raises(ValueError, match="loopback"):
        FaultProxy(("10.0.0.1", 80))
    print(f"0.2 s each way: a 200 kB GET took {took:.2f} s; 5 of 5 reset")


@pytest.mark.timeout(420)
def test_a_rollout_through_latency_resets_and_partitions_completes_within_its_limit(
    tmp_path: Path, artifact_server: ArtifactServer
) -> None:
    new = build(NEW, config=AGENT_CFG)
    old = build(OLD, config=AGENT_CFG)
    wgeturl = serve_release(artifact_server, new)
    with RedisServer() as store, FaultProxy(("127.0.0.1", store.port)) as to_redis:
        direct = redis.Redis.from_url(store.url)
        with Hbs(
            f"redis://127.0.0.1:{to_redis.port}/0",
            tmp_path / "hbs.log",
            queue=LIMIT,
            lease_s=10,
        ) as hbs:
            port = hbs.port
            faults = {"latency_s": 0.2, "reset_fraction": 0.05}
            with (
                FaultProxy(("127.0.0.1", port), seed=1, **faults) as cut_off,  # type: ignore[arg-type]
                FaultProxy(("127.0.0.1", port), seed=2, **faults) as steady,  # type: ignore[arg-type]
                Fleet(
                    tmp_path, AGENTS, [f"http://{cut_off.address}", f"http://{steady.address}"],
                    old=old,
                ) as fleet,
            ):  # fmt: skip
                wait_until(
                    f"{AGENTS} agents on {OLD}",
                    lambda: list(hbs.versions().values()).count(OLD) == AGENTS,
                    timeout_s=120,
                    explain=hbs.log,
                )
                published = time.monotonic()
                reply = hbs.publish(
                    {"wgeturl": wgeturl, "version": NEW, "binfile_md5": new.bin_md5}
                )
                assert reply.status_code == 200, reply.text
                task_id = reply.json()["data"]["task_id"]
                key = f"{{selfupgrade}}:task:{task_id}:leases"
                with Sampler(lambda: int(direct.zcard(key))) as held:
                    done = lambda: hbs.status()["counters"]["done"]  # noqa: E731
                    wait_until("5 hosts done", lambda: done() >= 5, timeout_s=120, explain=hbs.log)
                    cut_off.partition(True)
                    time.sleep(30)
                    cut_off.partition(False)
                    at_heal = done()
                    wait_until("18 done", lambda: done() >= 18, timeout_s=120, explain=hbs.log)
                    before = hbs.status()["counters"]
                    to_redis.partition(True)
                    time.sleep(10)
                    to_redis.partition(False)
                    after = hbs.status()["counters"]
                    wait_until(
                        "the rollout to complete",
                        lambda: hbs.status()["counters"]["status"] == "complete",
                        timeout_s=180,
                        explain=hbs.log,
                    )
                took = time.monotonic() - published
                counters = hbs.status()["counters"]
                detail = httpx.get(
                    f"{hbs.url}/selfupgrade/v1/rollouts/{task_id}", timeout=10
                ).json()
                programs = {name: fleet.program(name) for name in fleet.names}
                leftovers = [
                    p.name
                    for name in fleet.names
                    for p in (fleet.home(name) / "opt").iterdir()
                    if ".su-" in p.name and not p.name.endswith(".bak")  # the backup stays
                ]
            stats = {"cut off": cut_off.stats, "steady": steady.stats, "redis": to_redis.stats}
    print(
        f"{AGENTS} agents, limit {LIMIT}: peak held {held.peak} in {held.samples} samples; "
        f"done {counters['done']}, failures {counters['failures']}; {at_heal} done when the "
        f"30 s partition ended; rollout {took:.0f} s; across the 10 s Redis partition: "
        f"{before['status']}, failures {before['failures']} -> {after['status']}, failures "
        f"{after['failures']}; proxies {stats}"
    )
    assert after["status"] == "active" and after["failures"] == before["failures"], after
    assert held.samples > 100
    assert held.peak <= LIMIT, f"the store saw {held.peak} slots held at once (limit {LIMIT})"
    assert cut_off.stats.resets > 0 and steady.stats.resets > 0
    assert leftovers == [], leftovers
    assert all(p in (old.program, new.program) for p in programs.values())
    upgraded = [n for n, p in programs.items() if p == new.program]
    failed = {f["host"]: f["reason"] for f in detail["failures_list"] if f["gave_up"]}
    assert len(upgraded) + len(failed) == AGENTS, (upgraded, failed)
    assert all(failed.values()), failed
    assert counters["done"] == len(upgraded)
