"""The real, unmodified Go falcon-agent against a real hbs process (issue 10).

Built from the upstream source by its own build.sh (see ``tests/falcon_go.py``), five agents
under a real supervisord, a real artifact server on 127.0.0.1, hbs speaking the falcon
JSON-RPC protocol; published with the article's ``POST /agent/upgrade``.
"""

from __future__ import annotations

import hashlib
import signal
import socket
import sqlite3
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from selfupgrade.testing import ArtifactServer, Fault

from .falcon_go import GoFleet, SystemdGoFleet, build_agents
from .fleet import Hbs, Sampler, wait_until

pytestmark = pytest.mark.real

OLD, NEW = "6.1.0", "6.1.1"


@pytest.fixture(params=["supervisord", "systemd"])
def go_fleet(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    """Makes the fleet under supervisord (``autorestart=true``), or under a real systemd with
    the seed's ``Restart=always`` (issue 14)."""
    if request.param == "supervisord":
        return GoFleet
    systemd = request.getfixturevalue("systemd")
    return lambda *args: SystemdGoFleet(*args, systemd)


def live_leases(db: Path, task_id: str | None = None):  # type: ignore[no-untyped-def]
    """A probe for the Sampler: live leases in the store, of ``task_id`` or of every rollout."""
    where, args = ("task_id = ? AND ", (task_id,)) if task_id is not None else ("", ())

    def probe() -> int:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            (n,) = conn.execute(
                f"SELECT COUNT(*) FROM leases WHERE {where}until > ?",
                (*args, time.time()),
            ).fetchone()
        return int(n)

    return probe


def serve_new(
    artifact_server: ArtifactServer, new: bytes, fault: Fault | None = None
) -> dict[str, str]:
    """Serve ``new`` as ``bin_6.1.1`` and return the article's publish body for it."""
    artifact_server.add(f"open-falcon/bin_{NEW}", new, fault=fault)
    return {
        "wgeturl": artifact_server.url("open-falcon"),
        "version": NEW,
        "binfile_md5": hashlib.md5(new).hexdigest(),
    }


@pytest.mark.parametrize("pace_rarely_s", [0, 30], ids=["fixed", "paced"])
def test_real_agents_upgrade_never_more_than_the_queue_at_once(
    tmp_path: Path, artifact_server: ArtifactServer, go_fleet: Any, pace_rarely_s: int
) -> None:
    """Also with hbs pacing check-ins (issue 15, point 4): the Go agent's JSON-RPC replies
    carry no pace, so its heartbeats and its upgrade are the same."""
    binaries = build_agents(OLD, NEW)
    new = binaries[NEW].read_bytes()
    body = serve_new(artifact_server, new)
    db = tmp_path / "hbs.db"
    with Hbs(
        f"sqlite:{db}",
        tmp_path / "hbs.log",
        rpc=True,
        queue=2,
        lease_s=60,
        pace_rarely_s=pace_rarely_s,
    ) as hbs:
        assert hbs.rpc_port is not None
        with go_fleet(tmp_path, 5, binaries[OLD], hbs.rpc_port) as fleet:
            wait_until("5 agents on 6.1.0", lambda: on_old(hbs), explain=hbs.log)
            reply = hbs.publish(body)
            assert reply.status_code == 200, reply.text
            task_id = reply.json()["data"]["task_id"]
            started = time.monotonic()
            with Sampler(live_leases(db, task_id)) as held:
                wait_until(
                    "5 agents on 6.1.1",
                    lambda: (
                        sorted(hbs.versions().values()) == [NEW] * 5
                        and hbs.status()["counters"]["done"] == 5
                    ),
                    timeout_s=120,
                    explain=hbs.log,
                )
            took = time.monotonic() - started
            downloads = [r for r in artifact_server.requests if r.path.endswith(f"bin_{NEW}")]
            starts = {name: fleet.starts(name) for name in fleet.names}
            print(
                f"5 real agents on {NEW} in {took:.1f} s; slots held at most {held.peak} "
                f"(limit 2, {held.samples} samples); downloads at once at most "
                f"{artifact_server.peak_active}; downloads {len(downloads)}; starts {starts}"
            )
            assert held.samples > 50 and 0 < held.peak <= 2, held.peak
            assert artifact_server.peak_active <= 2
            assert all(fleet.program(name) == new for name in fleet.names)
            assert len(downloads) == 5 + 1  # one per agent, and hbs's check before the publish
            assert all(n == 2 for n in starts.values()), starts  # one restart each


def orders_logged(hbs: Hbs, name: str) -> int:
    return hbs.log().count(f"ordered {name} to install")


def on_old(hbs: Hbs, n: int = 5) -> bool:
    return sorted(hbs.versions().values()) == [OLD] * n


def test_a_wrong_md5_is_a_failed_attempt_ordered_once_then_the_rollout_halts(
    tmp_path: Path, artifact_server: ArtifactServer, go_fleet: Any
) -> None:
    """(b) Each agent restores its backup and reports 6.1.0 again from the same process: hbs
    sees a failed attempt, orders it again only after the back-off, gives up after
    max_attempts, and the rollout halts at its budget. The artifact check is turned off: it
    would refuse this publish."""
    binaries = build_agents(OLD, NEW)
    body = serve_new(artifact_server, binaries[NEW].read_bytes())
    db = tmp_path / "hbs.db"
    limits = {"queue": 2, "lease_s": 60, "max_attempts": 2, "retry_backoff_s": 2}
    # 5 agents x 2 attempts: the tenth failed attempt is the one over the budget
    with Hbs(
        f"sqlite:{db}",
        tmp_path / "hbs.log",
        rpc=True,
        failure_limit=10,
        no_artifact_check=True,
        **limits,
    ) as hbs:
        assert hbs.rpc_port is not None
        with go_fleet(tmp_path, 5, binaries[OLD], hbs.rpc_port) as fleet:
            wait_until("5 agents on 6.1.0", lambda: on_old(hbs), explain=hbs.log)
            reply = hbs.publish({**body, "binfile_md5": "0" * 32})
            assert reply.status_code == 200, reply.text
            task_id = reply.json()["data"]["task_id"]
            started = time.monotonic()
            with Sampler(live_leases(db, task_id)) as held:
                wait_until(
                    "the rollout to halt",
                    lambda: hbs.status()["counters"]["status"] == "halted",
                    timeout_s=300,
                    explain=hbs.log,
                )
            took = time.monotonic() - started
            counters = hbs.status()["counters"]
            orders = {n: fleet.orders(n) for n in fleet.names}
            logged = {n: orders_logged(hbs, n) for n in fleet.names}
            starts = {n: fleet.starts(n) for n in fleet.names}
            downloads = [r for r in artifact_server.requests if r.path.endswith(f"bin_{NEW}")]
            print(
                f"wrong md5: halted in {took:.1f} s; orders taken {orders}, logged {logged}; "
                f"downloads {len(downloads)}; starts {starts}; slots held at most {held.peak}; "
                f"halt reason: {counters['halt_reason']}"
            )
            assert orders == dict.fromkeys(fleet.names, 2), orders  # max_attempts each
            assert logged == orders
            assert len(downloads) == 10  # once per attempt
            assert starts == dict.fromkeys(fleet.names, 1)  # no agent restarted
            assert all(fleet.program(n) == binaries[OLD].read_bytes() for n in fleet.names)
            assert counters["failures"] == 10 and counters["failed"] == 5
            assert (
                "reported 6.1.0 again after the order without restarting"
                in (counters["halt_reason"])
            )
            assert 0 < held.peak <= 2
            assert "were not checked (the artifact check is off)" in hbs.log()
            seed_view = httpx.get(f"{hbs.url}/agentversions", timeout=5).json()
            assert seed_view == {"msg": "success", "data": dict.fromkeys(fleet.names, OLD)}


def test_config_only_and_both_files_tasks_complete_with_one_restart_each(
    tmp_path: Path, artifact_server: ArtifactServer, go_fleet: Any
) -> None:
    """(c) ``type`` 1 (config) and ``type`` 2 (both): the unmodified agent reports no config
    digest; a new process after the order completes it. One restart per agent per task."""
    binaries = build_agents(OLD, NEW)
    db = tmp_path / "hbs.db"
    with Hbs(f"sqlite:{db}", tmp_path / "hbs.log", rpc=True, queue=2, lease_s=60) as hbs:
        assert hbs.rpc_port is not None
        with go_fleet(tmp_path, 5, binaries[OLD], hbs.rpc_port) as fleet:
            wait_until("5 agents on 6.1.0", lambda: on_old(hbs), explain=hbs.log)
            wgeturl = artifact_server.url("open-falcon")
            figures = []
            for kind, version in ((1, OLD), (2, NEW)):
                cfg = fleet.config(debug=kind == 2, marker=f"type {kind}")
                artifact_server.add(f"open-falcon/cfg_{version}", cfg)
                body = {
                    "type": kind,
                    "wgeturl": wgeturl,
                    "version": version,
                    "cfgfile_md5": hashlib.md5(cfg).hexdigest(),
                }
                if kind == 2:
                    new = binaries[NEW].read_bytes()
                    artifact_server.add(f"open-falcon/bin_{NEW}", new)
                    body["binfile_md5"] = hashlib.md5(new).hexdigest()
                before = {n: fleet.starts(n) for n in fleet.names}
                started = time.monotonic()
                reply = hbs.publish(body)
                assert reply.status_code == 200, reply.text
                wait_until(
                    f"type {kind} to complete",
                    lambda: hbs.status()["counters"]["done"] == 5,
                    timeout_s=180,
                    explain=hbs.log,
                )
                took = time.monotonic() - started
                time.sleep(5)  # two more heartbeats: no agent restarts again
                restarts = {n: fleet.starts(n) - before[n] for n in fleet.names}
                figures.append(f"type {kind}: done in {took:.1f} s, restarts {restarts}")
                assert restarts == dict.fromkeys(fleet.names, 1), restarts
                assert all((fleet.home(n) / "cfg.json").read_bytes() == cfg for n in fleet.names)
                assert hbs.status()["counters"]["failures"] == 0
            assert sorted(hbs.versions().values()) == [NEW] * 5
            print("; ".join(figures))


def test_no_order_for_bytes_that_are_not_there(
    tmp_path: Path, artifact_server: ArtifactServer
) -> None:
    """(d) A publish whose artifact is unreachable, missing or of another md5 is refused
    with a 4xx naming the URL, and no agent is ordered; an artifact server that stops during
    a rollout pauses (re-check) or halts (silent hosts) it within budget + limit hosts."""
    binaries = build_agents(OLD, NEW)
    new = binaries[NEW].read_bytes()
    md5 = hashlib.md5(new).hexdigest()
    db = tmp_path / "hbs.db"
    with Hbs(
        f"sqlite:{db}",
        tmp_path / "hbs.log",
        rpc=True,
        queue=1,
        lease_s=60,
        failure_limit=1,
        artifact_recheck_s=2,
    ) as hbs:
        assert hbs.rpc_port is not None
        with GoFleet(tmp_path, 5, binaries[OLD], hbs.rpc_port) as fleet:
            wait_until("5 agents on 6.1.0", lambda: on_old(hbs), explain=hbs.log)
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                closed = f"http://127.0.0.1:{s.getsockname()[1]}/open-falcon"
            artifact_server.add(f"open-falcon/bin_{NEW}", new)
            wgeturl = artifact_server.url("open-falcon")
            refused = {
                "unreachable": ({"wgeturl": closed, "binfile_md5": md5}, "could not be fetched"),
                "404": ({"wgeturl": artifact_server.url("nothing"), "binfile_md5": md5}, "404"),
                "wrong md5": ({"wgeturl": wgeturl, "binfile_md5": "0" * 32}, "the release says"),
            }
            for what, (body, expected) in refused.items():
                reply = hbs.publish({**body, "version": NEW})
                error = reply.json()["error"]
                print(f"{what}: {reply.status_code} {error}")
                assert reply.status_code == 400, (what, reply.text)
                assert body["wgeturl"] in error and expected in error
            assert hbs.status()["task"] is None
            time.sleep(5)  # two heartbeats of every agent: nothing to order
            assert "ordered" not in hbs.log()
            assert all(fleet.orders(n) == 0 for n in fleet.names)

            reply = hbs.publish({"wgeturl": wgeturl, "version": NEW, "binfile_md5": md5})
            assert reply.status_code == 200, reply.text
            wait_until("a first agent on 6.1.1", lambda: hbs.status()["counters"]["done"] >= 1)
            artifact_server.stop()
            stopped = time.monotonic()
            wait_until(
                "the rollout to pause or halt",
                lambda: hbs.status()["counters"]["status"] in ("paused", "halted"),
                timeout_s=120,
                explain=hbs.log,
            )
            took = time.monotonic() - stopped
            counters = hbs.status()["counters"]
            time.sleep(5)  # two heartbeats: nothing more is ordered once it stopped
            ordered = {n: fleet.orders(n) for n in fleet.names}
            upgraded = [n for n in fleet.names if fleet.program(n) == new]
            touched = [n for n in fleet.names if ordered[n] and n not in upgraded]
            print(
                f"artifact server stopped: {counters['status']} after {took:.1f} s "
                f"({counters['halt_reason']}); upgraded {len(upgraded)}, touched after the "
                f"stop {touched}, orders {ordered}"
            )
            assert len(touched) <= 1 + 1  # failure limit + queue
            assert counters["halt_reason"]
            if counters["status"] == "paused":
                assert "artifact check failed" in counters["halt_reason"]
                assert wgeturl in counters["halt_reason"]


def test_hosts_bricked_by_a_vanished_artifact_server_halt_the_rollout_by_their_silence(
    tmp_path: Path, artifact_server: ArtifactServer
) -> None:
    """(d, without the re-check) An agent ordered while the artifact server is down panics
    and is left with an empty program: it never reports again. hbs counts it failed after
    its silence grace (3 x 5 s + restart_grace_s), and the failure limit halts the rollout."""
    binaries = build_agents(OLD, NEW)
    new = binaries[NEW].read_bytes()
    body = serve_new(artifact_server, new)
    db = tmp_path / "hbs.db"
    with Hbs(
        f"sqlite:{db}",
        tmp_path / "hbs.log",
        rpc=True,
        queue=2,
        lease_s=180,
        failure_limit=1,
        restart_grace_s=10,
        artifact_recheck_s=3600,  # only the hosts' silence can stop it
    ) as hbs:
        assert hbs.rpc_port is not None
        with GoFleet(tmp_path, 5, binaries[OLD], hbs.rpc_port) as fleet:
            wait_until("5 agents on 6.1.0", lambda: on_old(hbs), explain=hbs.log)
            assert hbs.publish(body).status_code == 200
            wait_until("a first agent on 6.1.1", lambda: hbs.status()["counters"]["done"] >= 1)
            artifact_server.stop()
            stopped = time.monotonic()
            wait_until(
                "the rollout to halt",
                lambda: hbs.status()["counters"]["status"] == "halted",
                timeout_s=150,
                explain=hbs.log,
            )
            took = time.monotonic() - stopped
            counters = hbs.status()["counters"]
            time.sleep(5)  # two heartbeats: nothing more is ordered once it halted
            ordered = {n: fleet.orders(n) for n in fleet.names}
            upgraded = [n for n in fleet.names if fleet.program(n) == new]
            bricked = [
                n for n in fleet.names if fleet.program(n) not in (new, binaries[OLD].read_bytes())
            ]
            touched = [n for n in fleet.names if ordered[n] and n not in upgraded]
            print(
                f"artifact server gone, no re-check: halted {took:.1f} s after the stop "
                f"({counters['halt_reason']}); silent {counters['silent']}; upgraded "
                f"{len(upgraded)}, bricked {bricked}, touched after the stop {touched}"
            )
            assert 1 <= len(touched) <= 1 + 2  # failure limit + queue
            assert set(bricked) <= set(touched)
            assert "silent since the order" in counters["halt_reason"]
            assert counters["silent"] >= 1
            assert hbs.log().count("silent since the order") >= 1


def test_cancel_and_publish_again_at_once_keeps_the_limit(
    tmp_path: Path, artifact_server: ArtifactServer
) -> None:
    """(e) DELETE, then the same publish again, while two agents are mid-download: the hosts
    still upgrading for the cancelled rollout count against the new one's limit."""
    binaries = build_agents(OLD, NEW)
    new = binaries[NEW].read_bytes()
    # about 5 s a download, more than two of the agents' 2 s intervals: every agent beats while
    # two download, and could be ordered
    body = serve_new(artifact_server, new, Fault(trickle_bytes_per_s=2_000_000))
    db = tmp_path / "hbs.db"
    with Hbs(
        f"sqlite:{db}",
        tmp_path / "hbs.log",
        rpc=True,
        queue=2,
        lease_s=60,
        restart_grace_s=10,
        no_artifact_check=True,  # its own download would count among the concurrent ones
    ) as hbs:
        assert hbs.rpc_port is not None
        with GoFleet(tmp_path, 5, binaries[OLD], hbs.rpc_port) as fleet:
            wait_until("5 agents on 6.1.0", lambda: on_old(hbs), explain=hbs.log)
            started = time.monotonic()
            with Sampler(live_leases(db)) as held:
                assert hbs.publish(body).status_code == 200
                wait_until("two agents mid-download", lambda: artifact_server.active >= 2)
                cancelled = httpx.delete(f"{hbs.url}/agent/upgrade", timeout=10)
                assert cancelled.status_code == 200, cancelled.text
                again = hbs.publish(body)
                assert again.status_code == 200, again.text
                wait_until(
                    "5 agents on 6.1.1",
                    lambda: sorted(hbs.versions().values()) == [NEW] * 5,
                    timeout_s=240,
                    explain=hbs.log,
                )
            took = time.monotonic() - started
            downloads = [r for r in artifact_server.requests if r.path.endswith(f"bin_{NEW}")]
            starts = {n: fleet.starts(n) for n in fleet.names}
            print(
                f"cancel + publish mid-download: 5 on {NEW} in {took:.1f} s; downloads at "
                f"once at most {artifact_server.peak_active}; leases at most {held.peak} "
                f"({held.samples} samples); downloads {len(downloads)}; starts {starts}"
            )
            orders = {n: orders_logged(hbs, n) for n in fleet.names}
            print(f"orders sent by hbs over both rollouts: {orders}")
            # a host still downloading for the cancelled rollout is not ordered by the new one
            assert orders == dict.fromkeys(fleet.names, 1), orders
            assert artifact_server.peak_active <= 2
            assert held.samples > 50 and 0 < held.peak <= 2
            assert len(downloads) == 5  # nobody downloaded twice
            assert starts == dict.fromkeys(fleet.names, 2)


def test_hbs_killed_and_restarted_mid_rollout_carries_on_within_the_limit(
    tmp_path: Path, artifact_server: ArtifactServer
) -> None:
    """(f) SIGKILL of hbs during the rollout, a restart on the same store: it completes,
    never more than the queue at once, one restart per agent."""
    binaries = build_agents(OLD, NEW)
    new = binaries[NEW].read_bytes()
    body = serve_new(artifact_server, new, Fault(trickle_bytes_per_s=5_000_000))
    db = tmp_path / "hbs.db"
    with Hbs(
        f"sqlite:{db}",
        tmp_path / "hbs.log",
        rpc=True,
        queue=2,
        lease_s=60,
        no_artifact_check=True,  # its own download would count among the concurrent ones
    ) as hbs:
        assert hbs.rpc_port is not None
        with GoFleet(tmp_path, 5, binaries[OLD], hbs.rpc_port) as fleet:
            wait_until("5 agents on 6.1.0", lambda: on_old(hbs), explain=hbs.log)
            started = time.monotonic()
            with Sampler(live_leases(db)) as held:
                assert hbs.publish(body).status_code == 200
                wait_until("two agents mid-download", lambda: artifact_server.active >= 2)
                hbs.stop(signal.SIGKILL)
                time.sleep(1)
                hbs.start()
                wait_until(
                    "5 agents on 6.1.1",
                    lambda: (
                        sorted(hbs.versions().values()) == [NEW] * 5
                        and hbs.status()["counters"]["done"] == 5
                    ),
                    timeout_s=240,
                    explain=hbs.log,
                )
            took = time.monotonic() - started
            starts = {n: fleet.starts(n) for n in fleet.names}
            downloads = [r for r in artifact_server.requests if r.path.endswith(f"bin_{NEW}")]
            print(
                f"hbs SIGKILLed mid-download: 5 on {NEW} in {took:.1f} s; leases at most "
                f"{held.peak}; downloads at once at most {artifact_server.peak_active}; "
                f"downloads {len(downloads)}; starts {starts}"
            )
            assert 0 < held.peak <= 2 and artifact_server.peak_active <= 2
            assert starts == dict.fromkeys(fleet.names, 2)
