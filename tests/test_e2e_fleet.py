"""End to end: a real hbs process, real falcon agents under a real supervisord, real Redis.

Each test builds falcon-agent 6.0.0 and 6.0.1 as real artifacts, serves them from a real HTTP
server on 127.0.0.1, and drives the rollout through hbs's HTTP API, as an operator would.
Slot limits are checked by sampling the store itself (the SQLite file read-only, or Redis)
in a tight loop while the rollout runs, independently of what hbs reports.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
import redis

from examples.falcon_agent.build import build
from examples.fleet import agent_env
from selfupgrade.guard import guard_command
from selfupgrade.testing import ArtifactServer, Fault, Supervisord

from .fleet import AGENT_CFG, NEW, OLD, Fleet, Hbs, Sampler, serve_release, wait_until

pytestmark = pytest.mark.real


ADMITTED_HOSTS = (
    "SELECT host FROM progress WHERE task_id = ? AND json_extract(body, '$.state') = 'admitted'"
)


def sqlite_holders(db_path: Path, task_id: str):  # type: ignore[no-untyped-def]
    """A probe counting hosts that hold a slot, read from the SQLite file itself."""

    def probe() -> int:
        with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5) as db:
            row = db.execute(
                "SELECT count(*) FROM progress WHERE task_id = ? "
                "AND json_extract(body, '$.state') = 'admitted'",
                (task_id,),
            ).fetchone()
        return int(row[0])

    return probe


def redis_holders(url: str, task_id: str):  # type: ignore[no-untyped-def]
    client = redis.Redis.from_url(url)
    return lambda: int(client.zcard(f"{{selfupgrade}}:task:{task_id}:leases"))


def ever_admitted(db_path: Path, task_id: str) -> set[str]:
    """Hosts that were ever given a slot in the task (every admission writes a row)."""
    with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True) as c:
        rows = c.execute("SELECT host FROM progress WHERE task_id = ?", (task_id,))
        return {h for (h,) in rows}


def all_on(hbs: Hbs, version: str, n: int) -> bool:
    return list(hbs.versions().values()).count(version) == n


def test_fleet_converges_without_exceeding_the_limit(
    tmp_path: Path, artifact_server: ArtifactServer
) -> None:
    new = build(NEW, config=AGENT_CFG)
    wgeturl = serve_release(artifact_server, new)
    db = tmp_path / "hbs.db"
    with (
        Hbs(f"sqlite:{db}", tmp_path / "hbs.log", queue=3) as hbs,
        Fleet(tmp_path, 8, [hbs.url]) as fleet,
    ):
        wait_until("8 agents on 6.0.0", lambda: all_on(hbs, OLD, 8), explain=hbs.log)
        reply = hbs.publish({"wgeturl": wgeturl, "version": NEW, "binfile_md5": new.bin_md5})
        assert reply.status_code == 200, reply.text
        task_id = reply.json()["data"]["task_id"]
        with (
            Sampler(sqlite_holders(db, task_id)) as held,
            Sampler(lambda: hbs.status()["counters"]["in_flight"]) as shown,
        ):
            wait_until(
                "convergence", lambda: hbs.status()["counters"]["done"] == 8, explain=hbs.log
            )
        assert held.samples > 20 and shown.samples > 5
        assert held.peak == 3, f"the store saw {held.peak} slots held at once (limit 3)"
        assert shown.peak <= 3
        assert all_on(hbs, NEW, 8)
        assert all(fleet.program(name) == new.program for name in fleet.names)
        status = hbs.status()["counters"]
        assert (status["failures"], status["in_flight"]) == (0, 0)


def test_two_replicas_on_redis_share_the_limit(
    tmp_path: Path, artifact_server: ArtifactServer, redis_url: str
) -> None:
    new = build(NEW, config=AGENT_CFG)
    wgeturl = serve_release(artifact_server, new)
    with (
        Hbs(redis_url, tmp_path / "a.log", queue=3) as a,
        Hbs(redis_url, tmp_path / "b.log", queue=3) as b,
        Fleet(tmp_path, 10, [a.url, b.url]) as fleet,
    ):
        wait_until("10 agents on 6.0.0", lambda: all_on(a, OLD, 10) and all_on(b, OLD, 10))
        reply = a.publish({"wgeturl": wgeturl, "version": NEW, "binfile_md5": new.bin_md5})
        task_id = reply.json()["data"]["task_id"]
        with Sampler(redis_holders(redis_url, task_id)) as held:
            wait_until(
                "convergence",
                lambda: b.status()["counters"]["done"] == 10,
                explain=lambda: a.log() + b.log(),
            )
        assert held.samples > 100
        assert held.peak == 3, f"Redis saw {held.peak} slots held at once (limit 3)"
        assert b.status()["task"]["id"] == task_id  # published on a, seen by b
        assert all(fleet.program(name) == new.program for name in fleet.names)
        admitted_by = {"a": a.log().count("ordered agent-"), "b": b.log().count("ordered agent-")}
        assert admitted_by["a"] > 0 and admitted_by["b"] > 0, admitted_by


def test_an_agent_killed_mid_download_frees_its_slot_after_its_lease(
    tmp_path: Path, artifact_server: ArtifactServer
) -> None:
    new = build(NEW, config=AGENT_CFG)
    wgeturl = serve_release(artifact_server, new, bin=Fault(trickle_bytes_per_s=400))  # ~25 s
    db = tmp_path / "hbs.db"
    lease_s = 4.0
    with (
        # the check would fetch the trickled artifact too, for as long as an agent
        Hbs(
            f"sqlite:{db}", tmp_path / "hbs.log", queue=2, lease_s=lease_s, no_artifact_check=True
        ) as hbs,
        Fleet(tmp_path, 4, [hbs.url], autorestart=False) as fleet,
    ):
        wait_until("4 agents on 6.0.0", lambda: all_on(hbs, OLD, 4))
        task_id = hbs.publish(
            {"wgeturl": wgeturl, "version": NEW, "binfile_md5": new.bin_md5}
        ).json()["data"]["task_id"]
        probe = sqlite_holders(db, task_id)
        wait_until(
            "two agents downloading",
            lambda: probe() == 2 and hbs.status()["states"].get("downloading") == 2,
            30,
        )

        def admitted() -> set[str]:
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as c:
                return {h for (h,) in c.execute(ADMITTED_HOSTS, (task_id,))}

        victim = sorted(admitted())[0]
        pid = fleet.pid(victim)
        os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        time.sleep(lease_s / 2)
        assert victim in admitted(), "the slot must be held while the lease runs"
        wait_until("the victim's lease to run out", lambda: victim not in admitted(), lease_s + 5)
        freed_after = time.monotonic() - killed_at
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as c:
            body = json.loads(
                c.execute(
                    "SELECT body FROM progress WHERE task_id = ? AND host = ?", (task_id, victim)
                ).fetchone()[0]
            )
        assert body["state"] == "backoff" and body["reason"].startswith(
            "silent for 4 s since its last heartbeat"
        )
        assert lease_s - 1 <= freed_after <= lease_s + 4
        wait_until("another host to take the slot", lambda: probe() == 2, 10)
        assert victim not in admitted()


@pytest.mark.parametrize("store", ["sqlite", "redis"])
def test_hbs_restarted_mid_rollout_carries_on(
    tmp_path: Path, artifact_server: ArtifactServer, request: pytest.FixtureRequest, store: str
) -> None:
    new = build(NEW, config=AGENT_CFG)
    wgeturl = serve_release(artifact_server, new)
    db = tmp_path / "hbs.db"
    url = f"sqlite:{db}" if store == "sqlite" else request.getfixturevalue("redis_url")
    hbs = Hbs(url, tmp_path / "hbs.log", queue=2, lease_s=10)
    with hbs, Fleet(tmp_path, 6, [hbs.url]) as fleet:
        wait_until("6 agents on 6.0.0", lambda: all_on(hbs, OLD, 6))
        task_id = hbs.publish(
            {"wgeturl": wgeturl, "version": NEW, "binfile_md5": new.bin_md5}
        ).json()["data"]["task_id"]
        probe = sqlite_holders(db, task_id) if store == "sqlite" else redis_holders(url, task_id)
        with Sampler(probe) as held:
            wait_until("two hosts done", lambda: hbs.status()["counters"]["done"] >= 2)
            hbs.stop(signal.SIGKILL)
            time.sleep(1.0)  # agents beat into a closed port meanwhile
            hbs.start()
            status = hbs.status()
            assert status["task"]["id"] == task_id
            assert status["counters"]["done"] >= 2
            wait_until(
                "convergence after the restart",
                lambda: hbs.status()["counters"]["done"] == 6,
                explain=hbs.log,
            )
        assert held.peak <= 2
        assert all(fleet.program(n) == new.program for n in fleet.names)
        assert hbs.status()["counters"]["failures"] == 0


def test_a_wrong_md5_fails_cleanly_and_halts_at_the_failure_limit(
    tmp_path: Path, artifact_server: ArtifactServer
) -> None:
    new = build(NEW, config=AGENT_CFG)
    wgeturl = serve_release(artifact_server, new)
    wrong = hashlib.md5(b"not the agent").hexdigest()
    db = tmp_path / "hbs.db"
    with (
        # the artifact check would refuse the wrong md5: this is the agents' defence
        Hbs(
            f"sqlite:{db}", tmp_path / "hbs.log", queue=2, failure_limit=3, no_artifact_check=True
        ) as hbs,
        Fleet(tmp_path, 6, [hbs.url]) as fleet,
    ):
        wait_until("6 agents on 6.0.0", lambda: all_on(hbs, OLD, 6))
        pids = {n: fleet.pid(n) for n in fleet.names}
        reply = hbs.publish({"wgeturl": wgeturl, "version": NEW, "binfile_md5": wrong})
        assert reply.status_code == 200
        task_id = reply.json()["data"]["task_id"]
        wait_until(
            "the task to halt", lambda: hbs.status()["counters"]["status"] == "halted", 60, hbs.log
        )
        assert "budget: 3 failed attempt(s), 2 allowed" in hbs.status()["counters"]["halt_reason"]
        wait_until("hosts in flight to finish", lambda: hbs.status()["counters"]["in_flight"] == 0)
        admitted = ever_admitted(db, task_id)
        time.sleep(3)  # well past the retry back-off: nobody else is admitted
        assert ever_admitted(db, task_id) == admitted
        assert len(admitted) <= 4  # two rounds of the queue of 2, then the halt
        assert 3 <= hbs.status()["counters"]["failures"] <= 4  # one in flight may fail late
        assert all_on(hbs, OLD, 6)
        assert all(fleet.program(n) == fleet.old.program for n in fleet.names)
        assert {n: fleet.pid(n) for n in fleet.names} == pids  # no agent restarted
        assert hbs.log().count("md5 mismatch") >= 3
        assert not list(tmp_path.glob("hosts/*/opt/.*.new"))


ARTICLE = [  # the article's commands, as written (only the port and the placeholders change)
    """curl -X POST   http://127.0.0.1:6031/agent/upgrade -d '{"wgeturl":"http://${your_cdn_addr}/file/open-falcon","version":"6.0.1","binfile_md5":"35ac8534c0b31237e844ef8ee2bb9b9e"}'""",
    """curl -X GET  http://127.0.0.1:6031/agent/upgrade/nowargs""",
    """curl -s http://localhost:6031/agentversions |python -m "json.tool\"""",
    """curl http://127.0.0.1:6031/agentversions""",
    """curl -X DELETE  http://127.0.0.1:6031/agent/upgrade""",
]


def test_the_articles_curl_commands_work(tmp_path: Path, artifact_server: ArtifactServer) -> None:
    new = build(NEW, config=AGENT_CFG)
    wgeturl = serve_release(artifact_server, new)
    cdn = wgeturl.removeprefix("http://").removesuffix("/file/open-falcon")

    def run(command: str) -> str:
        command = command.replace(":6031/", f":{hbs.port}/").replace("${your_cdn_addr}", cdn)
        command = command.replace("35ac8534c0b31237e844ef8ee2bb9b9e", new.bin_md5)
        done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        return done.stdout

    with (
        Hbs(f"sqlite:{tmp_path / 'hbs.db'}", tmp_path / "hbs.log", queue=1) as hbs,
        Fleet(tmp_path, 3, [hbs.url]),
    ):
        wait_until("3 agents on 6.0.0", lambda: all_on(hbs, OLD, 3))
        published = json.loads(run(ARTICLE[0]))
        assert published["msg"] == "success"
        expected = {
            "type": 0,
            "wgeturl": f"http://{cdn}/file/open-falcon",
            "version": "6.0.1",
            "binfile_md5": new.bin_md5,
            "cfgfile_md5": "",
        }
        assert {k: published["data"][k] for k in expected} == expected
        assert json.loads(run(ARTICLE[1])) == {"msg": "success", "data": expected}
        wait_until("convergence", lambda: hbs.status()["counters"]["done"] == 3, explain=hbs.log)
        pretty = run(ARTICLE[2])
        assert json.loads(pretty)["data"] == {"agent-01": NEW, "agent-02": NEW, "agent-03": NEW}
        assert "\n    " in pretty  # json.tool indented it
        assert json.loads(run(ARTICLE[3]))["data"]["agent-02"] == NEW
        cancelled = json.loads(run(ARTICLE[4]))
        assert cancelled["msg"] == "success"
        assert json.loads(run(ARTICLE[1]))["data"]["version"] == ""


def test_a_config_only_task_completes_without_restart_loops(
    tmp_path: Path, artifact_server: ArtifactServer
) -> None:
    new = build(NEW, config={**AGENT_CFG, "labels": {"release": "cfg-only"}})
    wgeturl = serve_release(artifact_server, new)
    with (
        Hbs(f"sqlite:{tmp_path / 'hbs.db'}", tmp_path / "hbs.log", queue=2) as hbs,
        Fleet(tmp_path, 4, [hbs.url]) as fleet,
    ):
        wait_until("4 agents on 6.0.0", lambda: all_on(hbs, OLD, 4))
        before = {n: fleet.pid(n) for n in fleet.names}
        body = {"wgeturl": wgeturl, "version": NEW, "cfgfile_md5": new.cfg_md5, "type": 1}
        assert hbs.publish(body).status_code == 200
        wait_until(
            "every host to report the new config",
            lambda: hbs.status()["counters"]["done"] == 4,
            explain=hbs.log,
        )
        after = {n: fleet.pid(n) for n in fleet.names}
        time.sleep(3)  # several heartbeats: nobody is told to upgrade again
        assert {n: fleet.pid(n) for n in fleet.names} == after
        assert all(after[n] != before[n] for n in fleet.names)  # each restarted exactly once
        for name in fleet.names:
            assert (fleet.home(name) / "opt" / "cfg.json").read_bytes() == new.config
            assert fleet.program(name) == fleet.old.program
        assert all_on(hbs, OLD, 4)  # the program's version did not change
        assert hbs.status()["counters"]["failures"] == 0


def test_agents_speaking_the_falcon_rpc_protocol_upgrade(
    tmp_path: Path, artifact_server: ArtifactServer
) -> None:
    new = build(
        NEW, config={**AGENT_CFG, "heartbeat": {**AGENT_CFG["heartbeat"], "transport": "rpc"}}
    )
    wgeturl = serve_release(artifact_server, new)
    with (
        Hbs(f"sqlite:{tmp_path / 'hbs.db'}", tmp_path / "hbs.log", queue=1, rpc=True) as hbs,
        Fleet(tmp_path, 3, [f"127.0.0.1:{hbs.rpc_port}"], transport="rpc") as fleet,
    ):
        wait_until("3 agents on 6.0.0", lambda: all_on(hbs, OLD, 3), explain=hbs.log)
        assert (
            hbs.publish(
                {"wgeturl": wgeturl, "version": NEW, "binfile_md5": new.bin_md5}
            ).status_code
            == 200
        )
        wait_until(
            "convergence over JSON-RPC",
            lambda: hbs.status()["counters"]["done"] == 3,
            explain=hbs.log,
        )
        assert all(fleet.program(n) == new.program for n in fleet.names)


def test_an_agent_with_release_directories_upgrades_and_keeps_the_old_release(
    tmp_path: Path, artifact_server: ArtifactServer
) -> None:
    """Issue 15, point 3, with the example falcon agent under a real supervisord and a real
    hbs: FALCON_AGENT_RELEASES makes it build releases/6.0.1/ (the new program, a copy of
    the config) and point current at it; 6.0.0 stays on disk, untouched."""
    old = build(OLD, config=AGENT_CFG)
    new = build(NEW, config=AGENT_CFG)
    wgeturl = serve_release(artifact_server, new)
    home = tmp_path / "hosts" / "agent-01"
    root = home / "opt"
    old.install(root / "releases" / OLD)
    (root / "current").symlink_to(f"releases/{OLD}")
    sup = Supervisord(tmp_path / "supervisor")
    with Hbs(f"sqlite:{tmp_path / 'hbs.db'}", tmp_path / "hbs.log") as hbs:
        env = agent_env(home, "agent-01", f"{hbs.url}/selfupgrade/v1/heartbeat", "supervisor")
        current = root / "current"
        command = guard_command(
            home / "state", [str(current / "falcon-agent"), "-c", str(current / "cfg.json")]
        )
        sup.add_program(
            "agent-01", command, env={**env, "FALCON_AGENT_RELEASES": str(root)}, autorestart=True
        )
        with sup:
            wait_until("the agent on 6.0.0", lambda: all_on(hbs, OLD, 1), explain=hbs.log)
            reply = hbs.publish({"wgeturl": wgeturl, "version": NEW, "binfile_md5": new.bin_md5})
            assert reply.status_code == 200, reply.text
            wait_until("done", lambda: hbs.status()["counters"]["done"] == 1, explain=hbs.log)
            log = sup.log("agent-01")
    print(f"current -> {os.readlink(root / 'current')}")
    assert f"current now points to releases/{NEW}" in log, log[-2000:]
    assert os.readlink(root / "current") == f"releases/{NEW}"
    assert (root / "current" / "falcon-agent").read_bytes() == new.program
    assert (root / "releases" / NEW / "cfg.json").read_bytes() == old.config
    assert (root / "releases" / OLD / "falcon-agent").read_bytes() == old.program
    assert json.loads((home / "state" / "state.json").read_text())["layout"]["kind"] == "releases"
