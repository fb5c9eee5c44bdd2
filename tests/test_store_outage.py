"""A store that stops answering: hbs keeps answering, fails closed, and says so.

A real hbs process on a real redis-server of its own; Redis is frozen with SIGSTOP (it keeps
its connections open and answers nothing, the worst kind of outage), then thawed.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from selfupgrade import Heartbeat, UpgradeState, parse_version
from selfupgrade.testing import RedisServer, find_redis_server

from .fleet import Hbs, wait_until
from .server_helpers import rpc_report

pytestmark = pytest.mark.real


def _timed(fn):  # type: ignore[no-untyped-def]
    started = time.monotonic()
    result = fn()
    return result, time.monotonic() - started


def test_a_frozen_redis_delays_nothing_but_heartbeats_and_those_by_their_deadline(
    tmp_path: Path,
) -> None:
    if find_redis_server() is None:
        if os.environ.get("SELFUPGRADE_REQUIRE_REDIS") == "1":
            pytest.fail("redis-server is required (SELFUPGRADE_REQUIRE_REDIS=1) but not installed")
        pytest.skip("redis-server is not installed (Debian: apt-get install redis-server)")
    client = httpx.Client(timeout=30, trust_env=False)

    def beat(host: str) -> httpx.Response:
        wire = Heartbeat(host, parse_version("1.0"), UpgradeState.IDLE).to_wire()
        return client.post(f"{hbs.url}/selfupgrade/v1/heartbeat", json=wire)

    with (
        RedisServer() as redis,
        Hbs(redis.url, tmp_path / "hbs.log", queue=5, rpc=True, no_artifact_check=True) as hbs,
    ):
        assert redis.pid is not None and hbs.rpc_port is not None
        for host in ("a", "b"):
            assert beat(host).json() == {"order": None}
        body = {"wgeturl": "http://127.0.0.1:9/f", "version": "1.1", "binfile_md5": "0" * 32}
        assert client.post(f"{hbs.url}/agent/upgrade", json=body).status_code == 200
        wait_until("an order", lambda: beat("a").json()["order"] is not None)

        os.kill(redis.pid, signal.SIGSTOP)
        try:
            health, health_s = _timed(lambda: client.get(f"{hbs.url}/health"))
            reply, beat_s = _timed(lambda: beat("c"))
            page, page_s = _timed(lambda: client.get(f"{hbs.url}/"))
            rpc, rpc_s = _timed(lambda: rpc_report(hbs.rpc_port, "d"))
            again, again_s = _timed(lambda: beat("b"))
        finally:
            os.kill(redis.pid, signal.SIGCONT)
        print(
            f"frozen Redis: /health {health_s:.2f} s, heartbeat {beat_s:.2f} s and "
            f"{again_s:.2f} s, JSON-RPC {rpc_s:.2f} s, dashboard {page_s:.3f} s"
        )
        assert health.status_code == 503 and "store unreachable" in health.text
        assert health_s < 1.5, health_s  # hbs gives itself 0.8 s
        # fail closed, within the heartbeat deadline (1 s), on both ports
        assert reply.status_code == 200 and reply.json() == {"order": None}
        assert again.json() == {"order": None}
        assert rpc["result"] == {"code": 0, "Args": None}
        assert max(beat_s, again_s, rpc_s) < 3.0, (beat_s, again_s, rpc_s)
        assert page.status_code == 200 and page_s < 1.0, page_s  # needs no store

        # thawed: everything works again
        wait_until("health", lambda: client.get(f"{hbs.url}/health").status_code == 200)
        wait_until("an order for b", lambda: beat("b").json()["order"] is not None)
        assert "store failed" in hbs.log() or "did not answer" in hbs.log()
    client.close()


def test_an_outage_longer_than_a_lease_fails_no_host(tmp_path: Path) -> None:
    """Redis frozen for 10 s under hosts with a 4 s grace that keep reporting a download: no
    failed attempt, no halt, every host finishes (issue 11, point 5)."""
    if find_redis_server() is None:
        if os.environ.get("SELFUPGRADE_REQUIRE_REDIS") == "1":
            pytest.fail("redis-server is required (SELFUPGRADE_REQUIRE_REDIS=1) but not installed")
        pytest.skip("redis-server is not installed (Debian: apt-get install redis-server)")
    client = httpx.Client(timeout=30, trust_env=False)
    hosts = ["h1", "h2", "h3"]

    def beat(host: str, version: str = "1.0", state: UpgradeState = UpgradeState.IDLE) -> object:
        wire = Heartbeat(host, parse_version(version), state).to_wire()
        try:
            return client.post(f"{hbs.url}/selfupgrade/v1/heartbeat", json=wire).json()["order"]
        except httpx.HTTPError:
            return None

    with (
        RedisServer() as redis,
        Hbs(
            redis.url,
            tmp_path / "hbs.log",
            queue=3,
            lease_s=4,
            restart_grace_s=1,
            failure_limit=1,
            no_artifact_check=True,
        ) as hbs,
    ):
        assert redis.pid is not None
        for _ in range(3):  # hbs learns their interval (0.5 s: a grace of 3 x 1 + 1 = 4 s)
            for h in hosts:
                beat(h)
            time.sleep(0.5)
        body = {"wgeturl": "http://127.0.0.1:9/f", "version": "1.1", "binfile_md5": "0" * 32}
        assert client.post(f"{hbs.url}/agent/upgrade", json=body).status_code == 200
        wait_until("3 orders", lambda: all(beat(h) for h in hosts))

        def downloading_for(seconds: float) -> None:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                for h in hosts:
                    beat(h, state=UpgradeState.DOWNLOADING)
                time.sleep(0.5)

        downloading_for(2)
        os.kill(redis.pid, signal.SIGSTOP)
        try:
            downloading_for(10)  # each answered "no order" at the deadline; the store is frozen
        finally:
            os.kill(redis.pid, signal.SIGCONT)
        downloading_for(3)
        after = hbs.status()["counters"]
        for h in hosts:
            beat(h, "1.1")
        wait_until(
            "the rollout to complete",
            lambda: hbs.status()["counters"]["status"] == "complete",
            explain=hbs.log,
        )
        final = hbs.status()["counters"]
        print(
            f"after a 10 s outage under a 4 s grace: {after['status']}, failures "
            f"{after['failures']}, in flight {after['in_flight']}; then done {final['done']}, "
            f"failures {final['failures']}"
        )
        assert after["status"] == "active" and after["failures"] == 0, hbs.log()
        assert after["in_flight"] == 3
        assert final["failures"] == 0 and final["done"] == 3


def test_a_redis_that_lost_its_data_is_reported_not_shown_as_cancelled(tmp_path: Path) -> None:
    """Redis killed and started again empty on the same port (no persistence, as the test
    Redis runs): hbs warned at start that it would be so, and says loudly what happened."""
    if find_redis_server() is None:
        if os.environ.get("SELFUPGRADE_REQUIRE_REDIS") == "1":
            pytest.fail("redis-server is required (SELFUPGRADE_REQUIRE_REDIS=1) but not installed")
        pytest.skip("redis-server is not installed (Debian: apt-get install redis-server)")
    client = httpx.Client(timeout=30, trust_env=False)
    first = RedisServer().start()
    try:
        with Hbs(first.url, tmp_path / "hbs.log", no_artifact_check=True) as hbs:
            assert "keeps nothing on disk" in hbs.log()
            wire = Heartbeat("h", parse_version("1.0"), UpgradeState.IDLE).to_wire()
            client.post(f"{hbs.url}/selfupgrade/v1/heartbeat", json=wire)
            body = {"wgeturl": "http://127.0.0.1:9/f", "version": "1.1", "binfile_md5": "0" * 32}
            assert client.post(f"{hbs.url}/agent/upgrade", json=body).status_code == 200
            assert hbs.status()["task"] is not None
            port = first.port
            first.stop()  # by PID; it kept nothing
            first = RedisServer(port=port).start()
            wait_until(
                "hbs to notice",
                lambda: hbs.status().get("store_warning", ""),
                timeout_s=30,
                explain=hbs.log,
            )
            status = hbs.status()
            print(f"status: {status['counters']['status']}; warning: {status['store_warning']}")
            assert "the store lost its data" in status["store_warning"]
            assert "the store lost its data" in hbs.log()
            assert status["counters"]["status"] != "cancelled"
    finally:
        first.stop()
