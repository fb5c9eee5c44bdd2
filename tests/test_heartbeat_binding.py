"""Issue 11, point 2: heartbeats without per-host tokens cannot speak for hosts they are not.

Each attack of the issue is run against a real hbs process over real HTTP (and JSON-RPC) on
127.0.0.1. The fleet's hosts beat from 127.0.0.1; the attacker from other loopback addresses
(127.0.0.2, 127.0.0.3), as a machine elsewhere would: on the same machine an attacker could
also take 127.0.0.1, which a real remote host's address is not.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

from selfupgrade import Heartbeat, UpgradeState, parse_version
from selfupgrade.server import ControlPlane, MemoryStore, PlaneConfig
from selfupgrade.server.hbs import DEFAULTS

from .fleet import Hbs, wait_until
from .server_helpers import rpc_report

SEED = {"wgeturl": "http://127.0.0.1:9/f", "version": "1.1", "binfile_md5": "0" * 32}
HEARTBEAT = "/selfupgrade/v1/heartbeat"


def beat(host: str, version: str = "1.0", **extra: Any) -> dict[str, Any]:
    return {**Heartbeat(host, parse_version(version), UpgradeState.IDLE).to_wire(), **extra}


def failed(host: str, task_id: str, n: int) -> dict[str, Any]:
    """The report of a failed attempt at 1.1."""
    return beat(
        host, state="failed", task_id=task_id, failed_version="1.1", failures=n, error="boom"
    )


def client_from(address: str) -> httpx.Client:
    """An HTTP client whose connections come from ``address`` (a loopback address)."""
    return httpx.Client(
        transport=httpx.HTTPTransport(local_address=address), timeout=30, trust_env=False
    )


def publish(hbs: Hbs) -> str:
    reply = httpx.post(f"{hbs.url}/agent/upgrade", json=SEED, timeout=10)
    assert reply.status_code == 200, reply.text
    return str(reply.json()["data"]["task_id"])


def host_state(hbs: Hbs, task_id: str, host: str) -> str | None:
    entry = hbs.rollout(task_id)["hosts"].get(host)
    return str(entry["state"]) if entry is not None else None


def test_a_host_name_is_bound_to_the_address_it_was_first_heard_from(tmp_path: Path) -> None:
    """The issue's fake ``confirmed`` (a host counted done, never upgraded) and three fake
    failure reports (hbs gave up on the host): refused from another address; the host is
    upgraded; an operator re-binds a host that moved; the binding outlives a restart."""
    db = f"sqlite:{tmp_path / 'hbs.db'}"
    flags = {"no_artifact_check": True, "queue": 1}
    real, attacker = client_from("127.0.0.1"), client_from("127.0.0.2")
    with Hbs(db, tmp_path / "hbs.log", **flags) as hbs:
        url = f"{hbs.url}{HEARTBEAT}"
        assert real.post(url, json=beat("h1")).status_code == 200
        task_id = publish(hbs)
        forged = [
            attacker.post(url, json=beat("h1", "1.1", task_id=task_id)),
            *(attacker.post(url, json=failed("h1", task_id, n)) for n in (1, 2, 3)),
        ]
        print("forged beats for h1 from 127.0.0.2:", [r.status_code for r in forged])
        print("  ", forged[0].json()["error"])
        assert [r.status_code for r in forged] == [403] * 4
        assert "bound to the address it was first heard from" in forged[0].json()["error"]
        assert host_state(hbs, task_id, "h1") in (None, "pending")
        order = real.post(url, json=beat("h1")).json()["order"]
        assert order is not None and order["version"] == "1.1"  # the real h1 is upgraded
        assert real.post(url, json=beat("h1", "1.1", task_id=task_id)).status_code == 200
        wait_until("h1 confirmed", lambda: host_state(hbs, task_id, "h1") == "confirmed", 10)
        assert "refused a heartbeat for h1 from 127.0.0.2" in hbs.log()

        # h1 moved to 127.0.0.2: the operator re-binds it
        reply = httpx.post(f"{hbs.url}/selfupgrade/v1/hosts/h1/rebind", timeout=10)
        assert reply.status_code == 200, reply.text
        assert attacker.post(url, json=beat("h1", "1.1")).status_code == 200
        assert real.post(url, json=beat("h1", "1.1")).status_code == 403
        gone = httpx.post(f"{hbs.url}/selfupgrade/v1/hosts/nobody/rebind", timeout=10)
        assert gone.status_code == 404
    with Hbs(db, tmp_path / "hbs2.log", **flags) as hbs:  # the binding was stored
        url = f"{hbs.url}{HEARTBEAT}"
        assert real.post(url, json=beat("h1", "1.1")).status_code == 403
        assert attacker.post(url, json=beat("h1", "1.1")).status_code == 200


def test_made_up_names_can_neither_halt_a_rollout_nor_hold_its_slots(tmp_path: Path) -> None:
    """The issue's 4,002 requests (fake hosts join the last wave, then fail: the rollout
    halted in 1.2 s) and 5 fake hosts reporting ``downloading`` (they held all 5 slots)."""
    with Hbs(
        f"sqlite:{tmp_path / 'hbs.db'}", tmp_path / "hbs.log", no_artifact_check=True, queue=5
    ) as hbs:
        url = f"{hbs.url}{HEARTBEAT}"
        real = client_from("127.0.0.1")
        for i in range(10):
            assert real.post(url, json=beat(f"real-{i}")).status_code == 200
        task_id = publish(hbs)

        attacker = client_from("127.0.0.2")
        codes: dict[int, int] = {}
        orders = 0
        started = time.monotonic()
        for i in range(2001):
            for wire in (beat(f"fake-{i}"), failed(f"fake-{i}", task_id, 1)):
                reply = attacker.post(url, json=wire)
                codes[reply.status_code] = codes.get(reply.status_code, 0) + 1
                orders += reply.status_code == 200 and reply.json()["order"] is not None
        took = time.monotonic() - started
        hogs = client_from("127.0.0.3")
        for i in range(5):
            wire = beat(f"hog-{i}", state="downloading", task_id=task_id)
            for _ in range(2):
                reply = hogs.post(url, json=wire)
                assert reply.status_code == 200 and reply.json()["order"] is None

        status = hbs.status()["counters"]
        real_orders = sum(
            real.post(url, json=beat(f"real-{i}")).json()["order"] is not None for i in range(10)
        )
        known = hbs.versions()
        fakes_kept = sum(h.startswith("fake-") for h in known)
        print(
            f"4,002 forged requests in {took:.1f} s: {codes}; orders to fakes {orders}; "
            f"fake names kept {fakes_kept}; status {status['status']}, "
            f"failed {status['failed']}; real hosts ordered {real_orders} of 10"
        )
        assert orders == 0
        # new_hosts_per_source, and what the bucket refilled while the flood ran
        burst, window_s = DEFAULTS["new_hosts_per_source"], DEFAULTS["new_hosts_window_s"]
        assert burst <= fakes_kept <= burst + int(took * burst / window_s) + 1
        assert set(codes) <= {200, 403} and codes[200] <= 2 * fakes_kept
        assert status["status"] == "active"
        assert status["failed"] == 0 and status["failures"] == 0
        assert real_orders == 5  # every slot went to a real host
        assert "that address named 100 new hosts within 600 s" in hbs.log()


def test_a_host_that_appears_during_a_rollout_joins_it_after_its_probation(
    tmp_path: Path,
) -> None:
    with Hbs(
        f"sqlite:{tmp_path / 'hbs.db'}",
        tmp_path / "hbs.log",
        no_artifact_check=True,
        probation_s=3,
    ) as hbs:
        url = f"{hbs.url}{HEARTBEAT}"
        assert httpx.post(url, json=beat("known"), timeout=10).status_code == 200
        publish(hbs)
        first = httpx.post(url, json=beat("late"), timeout=10).json()["order"]
        started = time.monotonic()

        def ordered() -> bool:
            return httpx.post(url, json=beat("late"), timeout=10).json()["order"] is not None

        wait_until("the late host's order", ordered, 15)
        waited = time.monotonic() - started
        print(f"a host first heard from after the publish: ordered after {waited:.1f} s")
        assert first is None and waited >= 2.5


def test_per_host_tokens_identify_hosts_so_a_host_may_move(tmp_path: Path) -> None:
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps({"agent_tokens": {"h1": "t-h1"}}))
    with Hbs(f"sqlite:{tmp_path / 'hbs.db'}", tmp_path / "hbs.log", config=config, rpc=True) as hbs:
        url = f"{hbs.url}{HEARTBEAT}"
        auth = {"Authorization": "Bearer t-h1"}
        for address in ("127.0.0.1", "127.0.0.2", "127.0.0.1"):
            reply = client_from(address).post(url, json=beat("h1"), headers=auth)
            assert reply.status_code == 200, (address, reply.text)


def test_an_unmodified_agents_rpc_name_is_bound_too(tmp_path: Path) -> None:
    with Hbs(f"sqlite:{tmp_path / 'hbs.db'}", tmp_path / "hbs.log", rpc=True) as hbs:
        assert hbs.rpc_port is not None
        assert rpc_report(hbs.rpc_port, "g1")["result"] == {"code": 0, "Args": None}
        forged = rpc_report(hbs.rpc_port, "g1", source="127.0.0.2")
        print("ReportStatus for g1 from 127.0.0.2:", forged)
        assert forged["result"] == {"code": 1, "Args": None}
        assert rpc_report(hbs.rpc_port, "g1")["result"] == {"code": 0, "Args": None}


# ---- in-process: the rate and the record TTL, on a clock the test moves ------------------


def test_the_new_name_budget_of_an_address_refills_over_its_window() -> None:
    now = [1000.0]
    plane = ControlPlane(
        MemoryStore(),
        PlaneConfig(new_hosts_per_source=3, new_hosts_window_s=30),
        clock=lambda: now[0],
    )

    def refused(host: str, source: str) -> str:
        b = Heartbeat(host, parse_version("1.0"), source=source)
        return plane.answer([b])[0].refused

    assert [refused(f"a{i}", "127.0.0.2") for i in range(3)] == ["", "", ""]
    assert "named 3 new hosts within 30 s" in refused("a3", "127.0.0.2")
    assert refused("b0", "127.0.0.3") == ""  # another address has its own budget
    assert refused("a0", "127.0.0.2") == ""  # a known name is not a new one
    now[0] += 10  # a third of the window: one name
    assert refused("a3", "127.0.0.2") == ""
    assert refused("a4", "127.0.0.2") != ""
    assert refused("a5", "") == ""  # no source (a host proved by its token): no budget


def test_a_host_silent_for_its_ttl_is_forgotten_with_its_binding() -> None:
    now = [1000.0]
    store = MemoryStore()
    plane = ControlPlane(store, PlaneConfig(host_ttl_s=7200), clock=lambda: now[0])

    def answer(host: str, source: str) -> str:
        return plane.answer([Heartbeat(host, parse_version("1.0"), source=source)])[0].refused

    assert answer("old", "127.0.0.1") == "" and answer("fresh", "127.0.0.1") == ""
    plane.tick()
    now[0] += 5000
    assert answer("fresh", "127.0.0.1") == ""
    assert answer("old", "127.0.0.2") != ""  # bound still
    now[0] += 5000  # "old" silent for 10,000 s > 7,200; "fresh" for 5,000
    plane.tick()
    assert set(store.hosts()) == {"fresh"}
    assert plane.fleet.known("old") is None
    assert answer("old", "127.0.0.2") == ""  # a new host now


def test_twenty_thousand_made_up_names_grow_neither_memory_nor_store(tmp_path: Path) -> None:
    """Issue 11, point 3 again (200,000 names grew hbs 45 -> 133 MB and the store to 1.43 GB):
    from one address only ``new_hosts_per_source`` names are kept."""
    db = tmp_path / "hbs.db"

    def store_bytes() -> int:
        return sum(p.stat().st_size for p in tmp_path.glob("hbs.db*"))

    with Hbs(f"sqlite:{db}", tmp_path / "hbs.log") as hbs:
        assert hbs.proc is not None
        proc = psutil.Process(hbs.proc.pid)
        url = f"{hbs.url}{HEARTBEAT}"
        real = client_from("127.0.0.1")
        for i in range(30):
            assert real.post(url, json=beat(f"real-{i}")).status_code == 200
        time.sleep(1.5)  # flushed
        rss_before, store_before = proc.memory_info().rss, store_bytes()
        attacker = client_from("127.0.0.2")
        started = time.monotonic()
        refused = sum(
            attacker.post(url, json=beat(f"fake-{i}-" + "x" * 200, error="e" * 500)).status_code
            == 403
            for i in range(20_000)
        )
        refill = (time.monotonic() - started) / 6  # 100 names per 600 s
        time.sleep(1.5)
        rss_after, store_after = proc.memory_info().rss, store_bytes()
        kept = len(hbs.versions())
        print(
            f"20,000 made-up names from one address: {refused} refused, {kept} hosts kept; "
            f"RSS {rss_before / 2**20:.1f} -> {rss_after / 2**20:.1f} MB, "
            f"store {store_before / 2**10:.0f} -> {store_after / 2**10:.0f} KiB"
        )
        assert kept == 30 + 20_000 - refused
        assert kept <= 130 + refill + 1
        assert rss_after - rss_before < 20 * 2**20
        assert store_after - store_before < 2 * 2**20
