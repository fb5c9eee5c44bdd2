"""Staged rollouts end to end: real hbs, real falcon agents under supervisord, real Chromium.

Wave order is checked by sampling the SQLite store itself (read-only) every few milliseconds:
when each host was first seen holding a slot and first seen done. The dashboard is loaded in a
real headless Chromium during a real rollout, and ``selfupgrade rollout watch`` runs as a real
process against hbs.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from examples.falcon_agent.build import build
from selfupgrade.testing import ArtifactServer

from .fleet import AGENT_CFG, NEW, OLD, Fleet, Hbs, serve_release, wait_until

pytestmark = pytest.mark.real

ROOT = Path(__file__).resolve().parent.parent
THREE_WAVES = {
    "waves": [
        {"name": "canary", "hosts": 1, "max_in_flight": 1, "bake_s": 1},
        {"name": "quarter", "percent": 25, "max_in_flight": 2, "bake_s": 1},
        {"name": "all", "percent": 100, "max_in_flight": 5},
    ]
}


class StoreWatcher:
    """Reads the progress table every few ms: first time each host held a slot, and was done."""

    def __init__(self, db: Path, rollout_id: str) -> None:
        self.db, self.id = db, rollout_id
        self.admitted: dict[str, float] = {}
        self.done: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            try:
                with sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=5) as c:
                    rows = c.execute(
                        "SELECT host, json_extract(body, '$.state') FROM progress "
                        "WHERE task_id = ?",
                        (self.id,),
                    ).fetchall()
            except sqlite3.Error:
                continue
            for host, state in rows:
                self.admitted.setdefault(host, now)
                if state == "done":
                    self.done.setdefault(host, now)
            time.sleep(0.005)

    def __enter__(self) -> StoreWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("SELFUPGRADE_REQUIRE_CHROMIUM") == "1":
            pytest.fail("chromium is required (SELFUPGRADE_REQUIRE_CHROMIUM=1) but not installed")
        pytest.skip("chromium is not installed (Debian: apt-get install chromium)")
    return path


def browse(
    url: str, tmp: Path, screenshot: Path | None = None, *, flags: tuple[str, ...] = ()
) -> str:
    """Load ``url`` in headless Chromium (with ``flags`` too), let its scripts run, and return
    the DOM."""
    args = [
        chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp / 'chrome'}",
        "--virtual-time-budget=4000",
        "--window-size=1280,900",
        *flags,
    ]
    if screenshot is not None:
        done = subprocess.run(
            [*args, f"--screenshot={screenshot}", url], capture_output=True, timeout=60
        )
        assert screenshot.exists(), done.stderr.decode(errors="replace")[-2000:]
    done = subprocess.run([*args, "--dump-dom", url], capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    return done.stdout.decode()


def rollout_cli(hbs: Hbs, *args: str) -> list[str]:
    """``selfupgrade rollout --server <hbs> <args>``."""
    return [sys.executable, "-m", "selfupgrade", "rollout", "--server", hbs.url, *args]


def watch_cli(hbs: Hbs, rollout_id: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        rollout_cli(hbs, "watch", rollout_id, "--interval-s", "0.5"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def by_wave(detail: dict) -> dict[int, list[str]]:  # type: ignore[type-arg]
    out: dict[int, list[str]] = {}
    for host, info in detail["hosts"].items():
        out.setdefault(info["wave"], []).append(host)
    return out


def test_three_waves_over_twenty_agents_go_wave_by_wave(
    tmp_path: Path, artifact_server: ArtifactServer
) -> None:
    new = build(NEW, config=AGENT_CFG)
    wgeturl = serve_release(artifact_server, new)
    db = tmp_path / "hbs.db"
    with Hbs(f"sqlite:{db}", tmp_path / "hbs.log") as hbs, Fleet(tmp_path, 20, [hbs.url]) as fleet:
        wait_until("20 agents on 6.0.0", lambda: list(hbs.versions().values()).count(OLD) == 20)
        body = {"wgeturl": wgeturl, "version": NEW, "binfile_md5": new.bin_md5, "plan": THREE_WAVES}
        detail = hbs.start_rollout(body)
        rid = detail["task"]["id"]
        waves = by_wave(detail)
        assert [len(waves[k]) for k in range(3)] == [1, 4, 15]
        cli = watch_cli(hbs, rid)
        try:
            with StoreWatcher(db, rid) as seen:
                wait_until("the third wave", lambda: hbs.rollout(rid)["wave"] == 2, 120, hbs.log)
                shot = tmp_path / "dashboard.png"
                dom = browse(f"{hbs.url}/", tmp_path, screenshot=shot)
                wait_until(
                    "completion", lambda: hbs.rollout(rid)["status"] == "complete", 120, hbs.log
                )
            out, err = cli.communicate(timeout=30)
        finally:
            if cli.poll() is None:
                cli.kill()
                cli.wait()
        for k in (0, 1):
            last_done = max(seen.done[h] for h in waves[k])
            first_next = min(seen.admitted[h] for h in waves[k + 1])
            assert first_next >= last_done + 1.0 - 0.2, (k, first_next - last_done)
        assert all(fleet.program(n) == new.program for n in fleet.names)
        # the dashboard, during the third wave
        assert 'id="rollout-status">active<' in dom
        assert "Wave 1: canary · complete" in dom and "Wave 2: quarter · complete" in dom
        assert "Wave 3: all · running" in dom
        assert ">6.0.0</td>" in dom and ">6.0.1</td>" in dom
        if os.environ.get("SELFUPGRADE_SCREENSHOT_DIR"):
            shutil.copy(shot, Path(os.environ["SELFUPGRADE_SCREENSHOT_DIR"]) / "dashboard.png")
        # the CLI watched it to the end
        assert cli.returncode == 0, err
        assert "COMPLETE" in out and "wave 3 all" in out and "confirmed 15" in out


def test_a_release_that_crashes_at_start_halts_at_the_canary(
    tmp_path: Path, artifact_server: ArtifactServer
) -> None:
    bad = build(NEW, config=AGENT_CFG, crash_at_start=True)
    wgeturl = serve_release(artifact_server, bad)
    db = tmp_path / "hbs.db"
    with Hbs(f"sqlite:{db}", tmp_path / "hbs.log") as hbs, Fleet(tmp_path, 8, [hbs.url]) as fleet:
        wait_until("8 agents on 6.0.0", lambda: list(hbs.versions().values()).count(OLD) == 8)
        pids = {n: fleet.pid(n) for n in fleet.names}
        rid = hbs.start_rollout(
            {"wgeturl": wgeturl, "version": NEW, "binfile_md5": bad.bin_md5, "plan": THREE_WAVES}
        )["task"]["id"]
        cli = watch_cli(hbs, rid)
        try:
            wait_until("the halt", lambda: hbs.rollout(rid)["status"] == "halted", 90, hbs.log)
            out, err = cli.communicate(timeout=30)
        finally:
            if cli.poll() is None:
                cli.kill()
                cli.wait()
        detail = hbs.rollout(rid)
        canary = by_wave(detail)[0][0]
        assert "wave 1 (canary) exceeded its failure budget" in detail["halt_reason"]
        assert "did not" in detail["halt_reason"] or "started" in detail["halt_reason"]
        time.sleep(2)
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as c:
            touched = {
                h for (h,) in c.execute("SELECT host FROM progress WHERE task_id = ?", (rid,))
            }
        assert touched == {canary}
        assert all(fleet.program(n) == fleet.old.program for n in fleet.names)  # canary rolled back
        assert {n: fleet.pid(n) for n in fleet.names if n != canary} == {
            n: p for n, p in pids.items() if n != canary
        }
        assert hbs.versions()[canary] == OLD
        assert cli.returncode == 2 and "HALTED" in out, err
        dom = browse(f"{hbs.url}/", tmp_path)
        assert 'id="rollout-status">halted<' in dom and "exceeded its failure budget" in dom
        assert canary in dom  # in the failures table, with its reason


def test_a_release_failing_its_health_check_halts_where_the_budget_is_exceeded(
    tmp_path: Path, artifact_server: ArtifactServer
) -> None:
    quick = {**AGENT_CFG, "confirm_timeout_s": 3}
    bad = build(NEW, config=quick, unhealthy=True)
    wgeturl = serve_release(artifact_server, bad)
    plan = {
        "waves": [
            {"name": "canary", "hosts": 1, "max_failures": 1},
            {"name": "quarter", "percent": 25, "max_in_flight": 2, "max_failures": 0},
            {"name": "all", "percent": 100, "max_in_flight": 5},
        ]
    }
    with (
        Hbs(f"sqlite:{tmp_path / 'hbs.db'}", tmp_path / "hbs.log", max_attempts=1) as hbs,
        Fleet(tmp_path, 8, [hbs.url], old=build(OLD, config=quick)) as fleet,
    ):
        wait_until("8 agents on 6.0.0", lambda: list(hbs.versions().values()).count(OLD) == 8)
        rid = hbs.start_rollout(
            {"wgeturl": wgeturl, "version": NEW, "binfile_md5": bad.bin_md5, "plan": plan}
        )["task"]["id"]
        wait_until("the halt", lambda: hbs.rollout(rid)["status"] == "halted", 120, hbs.log)
        detail = hbs.rollout(rid)
        assert detail["wave"] == 1
        assert "wave 2 (quarter) exceeded its failure budget" in detail["halt_reason"]
        assert "did not confirm its health" in detail["halt_reason"]
        assert detail["waves"][0]["failures"] == 1
        third = detail["waves"][2]
        assert third["members"] == 6 and third["states"]["pending"] == 6  # untouched
        wait_until("hosts back on 6.0.0", lambda: list(hbs.versions().values()).count(OLD) == 8, 60)
        assert all(fleet.program(n) == fleet.old.program for n in fleet.names)


def test_pause_then_resume_continues_where_it_was(
    tmp_path: Path, artifact_server: ArtifactServer
) -> None:
    new = build(NEW, config=AGENT_CFG)
    wgeturl = serve_release(artifact_server, new)
    db = tmp_path / "hbs.db"
    plan = {"waves": [{"name": "all", "percent": 100, "max_in_flight": 2}]}
    with Hbs(f"sqlite:{db}", tmp_path / "hbs.log") as hbs, Fleet(tmp_path, 8, [hbs.url]) as fleet:
        wait_until("8 agents on 6.0.0", lambda: list(hbs.versions().values()).count(OLD) == 8)
        rid = hbs.start_rollout(
            {"wgeturl": wgeturl, "version": NEW, "binfile_md5": new.bin_md5, "plan": plan}
        )["task"]["id"]
        with StoreWatcher(db, rid) as seen:
            wait_until("two hosts admitted", lambda: len(seen.admitted) >= 2)
            assert hbs.act(rid, "pause", {"reason": "lunch"}).json()["status"] == "paused"
            wait_until("in-flight hosts to finish", lambda: hbs.rollout(rid)["in_flight"] == 0, 60)
            before = set(seen.admitted)
            time.sleep(3)
            assert set(seen.admitted) == before, "nobody is admitted while paused"
            assert hbs.rollout(rid)["done"] == len(before)
            assert hbs.act(rid, "resume").json()["status"] == "active"
            wait_until("completion", lambda: hbs.rollout(rid)["status"] == "complete", 120, hbs.log)
        assert all(fleet.program(n) == new.program for n in fleet.names)


def test_fleet_rollback_returns_every_upgraded_host(
    tmp_path: Path, artifact_server: ArtifactServer
) -> None:
    new = build(NEW, config=AGENT_CFG)
    wgeturl = serve_release(artifact_server, new)
    plan = {"waves": [{"name": "all", "percent": 100, "max_in_flight": 3}]}
    with (
        Hbs(f"sqlite:{tmp_path / 'hbs.db'}", tmp_path / "hbs.log") as hbs,
        Fleet(tmp_path, 6, [hbs.url]) as fleet,
    ):
        wait_until("6 agents on 6.0.0", lambda: list(hbs.versions().values()).count(OLD) == 6)
        rid = hbs.start_rollout(
            {"wgeturl": wgeturl, "version": NEW, "binfile_md5": new.bin_md5, "plan": plan}
        )["task"]["id"]
        wait_until("completion", lambda: hbs.rollout(rid)["status"] == "complete", 120, hbs.log)
        artifact_server.remove(f"file/open-falcon/bin_{NEW}")  # the rollback must not need them
        reply = hbs.act(rid, "rollback", {"mark_bad": True})
        assert reply.status_code == 201, reply.text
        back = reply.json()
        assert back["task"]["kind"] == "rollback" and back["members"] == 6
        wait_until(
            "the rollback",
            lambda: hbs.rollout(back["task"]["id"])["status"] == "complete",
            120,
            hbs.log,
        )
        assert list(hbs.versions().values()).count(OLD) == 6
        assert all(fleet.program(n) == fleet.old.program for n in fleet.names)
        assert hbs.rollout(rid)["status"] == "aborted"
        refused = hbs.publish({"wgeturl": wgeturl, "version": NEW, "binfile_md5": new.bin_md5})
        assert refused.status_code == 400 and "marked bad" in refused.json()["error"]


def test_a_closed_maintenance_window_admits_nobody(
    tmp_path: Path, artifact_server: ArtifactServer
) -> None:
    new = build(NEW, config=AGENT_CFG)
    wgeturl = serve_release(artifact_server, new)
    today = datetime.datetime.now(datetime.timezone.utc).strftime("%a").lower()
    other_days = [d for d in ("mon", "tue", "wed", "thu", "fri", "sat", "sun") if d != today]
    plan = {
        "waves": [{"name": "all", "percent": 100, "max_in_flight": 5}],
        "window": {"days": other_days, "start": "00:00", "end": "23:59", "tz": "UTC"},
    }
    db = tmp_path / "hbs.db"
    with Hbs(f"sqlite:{db}", tmp_path / "hbs.log") as hbs, Fleet(tmp_path, 4, [hbs.url]):
        wait_until("4 agents on 6.0.0", lambda: list(hbs.versions().values()).count(OLD) == 4)
        rid = hbs.start_rollout(
            {"wgeturl": wgeturl, "version": NEW, "binfile_md5": new.bin_md5, "plan": plan}
        )["task"]["id"]
        time.sleep(4)  # eight heartbeats of each agent
        detail = hbs.rollout(rid)
        assert detail["window_open"] is False
        assert detail["in_flight"] == 0 and detail["done"] == 0
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as c:
            assert (
                c.execute("SELECT count(*) FROM progress WHERE task_id = ?", (rid,)).fetchone()[0]
                == 0
            )
        assert list(hbs.versions().values()).count(OLD) == 4
        assert (
            json.loads(
                subprocess.run(
                    rollout_cli(hbs, "status", rid, "--json"),
                    capture_output=True,
                    text=True,
                    timeout=30,
                ).stdout
            )["window_open"]
            is False
        )
