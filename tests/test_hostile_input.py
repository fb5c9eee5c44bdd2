"""Issue 11, point 6: the smaller attacks, each reproduced against a real hbs process.

Deeply nested JSON, non-finite numbers, log forgery through a heartbeat's error, template
placeholders in URLs, the store lock through other names of the file, an empty store file,
tokens on the command line, and SIGTERM's shutdown.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import time
from pathlib import Path

import httpx
import pytest

from selfupgrade import Heartbeat, UpgradeState, parse_version
from selfupgrade.errors import UnsafeURL
from selfupgrade.models import check_url
from selfupgrade.server import SqliteStore, StoreError

from .fleet import Hbs, wait_until

SEED = {"wgeturl": "http://127.0.0.1:9/f", "version": "1.1", "binfile_md5": "0" * 32}


def beat(host: str, **extra: object) -> dict[str, object]:
    return {**Heartbeat(host, parse_version("1.0"), UpgradeState.IDLE).to_wire(), **extra}


def test_deep_json_and_non_finite_numbers_get_400_and_change_nothing(tmp_path: Path) -> None:
    with Hbs(f"sqlite:{tmp_path / 'hbs.db'}", tmp_path / "hbs.log", no_artifact_check=True) as hbs:
        deep = b"[" * 1000 + b"]" * 1000
        for path in ("/selfupgrade/v1/heartbeat", "/agent/upgrade", "/selfupgrade/v1/rollouts"):
            reply = httpx.post(f"{hbs.url}{path}", content=deep, timeout=10)
            print(f"{path}, 1000 nested arrays: {reply.status_code} {reply.json()['error']}")
            assert reply.status_code == 400 and "nested too deeply" in reply.json()["error"]
        rollout = {
            "release": {
                "version": "1.1",
                "artifacts": {"bin": {"url": "http://127.0.0.1:9/b", "digest": "md5:" + "0" * 32}},
            },
            "plan": {"waves": [{"percent": 100}]},
        }
        for number in ("NaN", "Infinity", "1e999"):
            text = json.dumps({**rollout, "limits": {"lease_s": 1}}).replace(
                '"lease_s": 1', f'"lease_s": {number}'
            )
            reply = httpx.post(f"{hbs.url}/selfupgrade/v1/rollouts", content=text, timeout=10)
            print(f"limits.lease_s = {number}: {reply.status_code} {reply.json()['error']}")
            assert reply.status_code == 400, reply.text
        assert httpx.get(f"{hbs.url}/selfupgrade/v1/status", timeout=10).status_code == 200
        assert hbs.status()["task"] is None  # nothing was published
        assert "Traceback" not in hbs.log()


def test_a_heartbeats_error_cannot_forge_a_log_line_or_reverse_text(tmp_path: Path) -> None:
    forged = (
        "md5 mismatch\n2026-12-01 00:00:00,000 hbs INFO selfupgrade.server: h2 finished "
        "\x1b[2J\u202eevil"
    )
    with Hbs(
        f"sqlite:{tmp_path / 'hbs.db'}", tmp_path / "hbs.log", no_artifact_check=True, queue=1
    ) as hbs:
        url = f"{hbs.url}/selfupgrade/v1/heartbeat"
        assert httpx.post(url, json=beat("h1")).json() == {"order": None}
        assert hbs.publish(SEED).status_code == 200
        wait_until("an order", lambda: httpx.post(url, json=beat("h1")).json()["order"])
        failure = beat("h1", state="failed", error=forged, failed_version="1.1", failures=1)
        httpx.post(url, json=failure)
        wait_until("the failure logged", lambda: "h1 failed an attempt" in hbs.log())
        log = hbs.log()
        line = next(x for x in log.splitlines() if "h1 failed an attempt" in x)
        print(f"logged: {line}")
        assert "\n2026-12-01 00:00:00,000 hbs INFO" not in log  # no forged line
        assert "\x1b" not in log and "\u202e" not in log
        assert "md5 mismatch\\n2026-12-01" in line and "\\x1b[2J" in line and "\\u202e" in line
        task_id = hbs.status()["task"]["id"]
        detail = httpx.get(f"{hbs.url}/selfupgrade/v1/rollouts/{task_id}").json()
        (shown,) = [f["reason"] for f in detail["failures_list"] if f["host"] == "h1"]
        assert "\u202e" not in shown and "\n" not in shown and "\x1b" not in shown
        assert shown.startswith("md5 mismatch\\n2026-12-01") and "\\u202eevil" in shown


def test_placeholders_in_a_url_are_refused(tmp_path: Path) -> None:
    with pytest.raises(UnsafeURL, match="placeholder"):
        check_url("http://files.example/{version}/agent")
    with Hbs(f"sqlite:{tmp_path / 'hbs.db'}", tmp_path / "hbs.log", no_artifact_check=True) as hbs:
        reply = hbs.publish({**SEED, "wgeturl": "http://files.example/{version}"})
        assert reply.status_code == 400 and "placeholder" in reply.json()["error"], reply.text


def test_the_store_is_locked_under_every_name_of_its_file(tmp_path: Path) -> None:
    db = tmp_path / "hbs.db"
    (tmp_path / "link.db").symlink_to(db)
    with Hbs(f"sqlite:{db}", tmp_path / "a.log") as hbs:
        assert hbs.proc is not None
        os.link(db, tmp_path / "hard.db")
        for other in ("link.db", "hard.db"):
            second = Hbs(f"sqlite:{tmp_path / other}", tmp_path / f"{other}.log")
            with pytest.raises(RuntimeError, match="hbs did not start"):
                second.start()
            second.stop()
            print(f"{other}: {second.log().strip().splitlines()[-1]}")
            assert "another hbs process uses" in second.log()


def test_an_empty_store_file_is_refused(tmp_path: Path) -> None:
    empty = tmp_path / "hbs.db"
    empty.write_bytes(b"")
    with pytest.raises(StoreError, match="empty file, not an hbs store"):
        SqliteStore(empty)
    assert empty.stat().st_size == 0  # left as it was
    SqliteStore(tmp_path / "new.db").close()  # a missing file is a new store


def test_tokens_come_from_a_file_or_the_environment_and_the_command_line_is_warned_of(
    tmp_path: Path,
) -> None:
    token_file = tmp_path / "admin.token"
    token_file.write_text("s3cret-from-file\n")
    with Hbs(
        f"sqlite:{tmp_path / 'a.db'}",
        tmp_path / "a.log",
        no_artifact_check=True,
        admin_token_file=token_file,
    ) as hbs:
        assert hbs.proc is not None
        assert "s3cret" not in Path(f"/proc/{hbs.proc.pid}/cmdline").read_text()
        assert hbs.publish(SEED).status_code == 401
        good = httpx.post(
            f"{hbs.url}/agent/upgrade",
            content=json.dumps(SEED),
            headers={"Authorization": "Bearer s3cret-from-file"},
        )
        assert good.status_code == 200, good.text
    with Hbs(
        f"sqlite:{tmp_path / 'b.db'}", tmp_path / "b.log", no_artifact_check=True, admin_token="t"
    ) as hbs:
        assert "--admin-token is readable by every local user" in hbs.log()


def test_sigterm_runs_hbss_own_shutdown(tmp_path: Path) -> None:
    db = tmp_path / "hbs.db"
    hbs = Hbs(f"sqlite:{db}", tmp_path / "hbs.log", rpc=True).start()
    try:
        assert hbs.proc is not None
        assert httpx.post(f"{hbs.url}/selfupgrade/v1/heartbeat", json=beat("h")).status_code == 200
        assert (tmp_path / "hbs.db-wal").exists()
        started = time.monotonic()
        hbs.proc.send_signal(signal.SIGTERM)
        code = hbs.proc.wait(30)
        took = time.monotonic() - started
    finally:
        hbs.stop()
    print(
        f"SIGTERM: exit {code} after {took:.2f} s; WAL left: {(tmp_path / 'hbs.db-wal').exists()}"
    )
    assert code == 0
    assert "hbs stopped" in hbs.log()
    assert not (tmp_path / "hbs.db-wal").exists()  # the store was closed (WAL checkpointed)
    with sqlite3.connect(db) as conn:  # and the heartbeat was flushed before it
        assert conn.execute("SELECT COUNT(*) FROM hosts").fetchone() == (1,)


def test_five_thousand_fake_versions_give_twenty_one_series(tmp_path: Path) -> None:
    """Issue 11, point 3: hosts reporting any version cannot grow the scrape without bound
    (the new-name limit per address, another defence, is off: all come from 127.0.0.1)."""
    with Hbs(f"sqlite:{tmp_path / 'hbs.db'}", tmp_path / "hbs.log", new_hosts_per_source=0) as hbs:
        client = httpx.Client(timeout=30, trust_env=False)
        url = f"{hbs.url}/selfupgrade/v1/heartbeat"
        for i in range(30):  # 30 real hosts on 6.0.0
            client.post(url, json=beat(f"real-{i}", version="6.0.0"))
        for i in range(5000):
            wire = {**beat(f"fake-{i}"), "version": f"9.{i}"}
            client.post(url, json=wire)
        text = client.get(f"{hbs.url}/metrics").text
        series = [x for x in text.splitlines() if x.startswith("selfupgrade_hosts{")]
        print(f"5,030 hosts on 5,001 versions: {len(series)} selfupgrade_hosts series")
        assert len(series) == 21
        assert 'selfupgrade_hosts{version="6.0.0"} 30.0' in series
        assert 'selfupgrade_hosts{version="other"} 4981.0' in series


def test_the_sqlite_wal_is_cut_back_while_hbs_runs(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from selfupgrade.server.stores import sqlite as sqlite_store
    from selfupgrade.server.tasks import HostSeen

    monkeypatch.setattr(sqlite_store, "_WAL_LIMIT_BYTES", 1 << 20)
    store = SqliteStore(tmp_path / "hbs.db")
    wal = tmp_path / "hbs.db-wal"
    try:
        now = time.time()
        for r in range(3):
            store.save_hosts(
                HostSeen(f"fake-{r}-{i}" + "x" * 100, "1.0", "idle", now, "e" * 200, {})
                for i in range(5000)
            )
        grown = wal.stat().st_size
        time.sleep(1.5)  # the checkpoint thread runs every second
        store.save_hosts([HostSeen("one", "1.0", "idle", now, None, {})])
        time.sleep(1.5)
        store.save_hosts([HostSeen("two", "1.0", "idle", now, None, {})])
        after = wal.stat().st_size
    finally:
        store.close()
    print(f"WAL {grown / 2**20:.1f} MB after a burst, {after / 2**20:.2f} MB once checkpointed")
    assert grown > 2 << 20
    assert after <= 1 << 20


def test_made_up_host_names_cannot_grow_the_fleet_view_past_its_cap(tmp_path: Path) -> None:
    """Issue 11, point 3: 3,000 made-up names against hbs with max_hosts 1,000 (the
    new-name limit per address, another defence, is off)."""
    with Hbs(
        f"sqlite:{tmp_path / 'hbs.db'}",
        tmp_path / "hbs.log",
        max_hosts=1000,
        new_hosts_per_source=0,
    ) as hbs:
        client = httpx.Client(timeout=30, trust_env=False)
        url = f"{hbs.url}/selfupgrade/v1/heartbeat"
        for i in range(30):
            assert client.post(url, json=beat(f"real-{i}")).status_code == 200
        for i in range(3000):
            client.post(url, json=beat(f"fake-{i}"))
        again = [client.post(url, json=beat(f"real-{i}")).status_code for i in range(30)]
        known = client.get(f"{hbs.url}/agentversions").json()["data"]
        print(f"30 real + 3,000 made-up names, max_hosts 1,000: {len(known)} hosts kept")
        assert again == [200] * 30
        assert all(f"real-{i}" in known for i in range(30))
        assert len(known) <= 1000 + 64  # at most one batch over
        assert "holds max_hosts=1000 hosts" in hbs.log()
