"""The rollout core and the stores: decisions, atomic admission, leases, back-off, halting."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from selfupgrade import UpgradeState as S
from selfupgrade.models import Role
from selfupgrade.server import (
    Action,
    ControlPlane,
    MemoryStore,
    PlaneConfig,
    SqliteStore,
    StoreError,
    decide,
)
from selfupgrade.server.tasks import HostProgress

from .server_helpers import CFG, beat, progress, send, task


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def plane_with(store, clock: Clock | None = None) -> ControlPlane:  # type: ignore[no-untyped-def]
    # These tests jump the clock between housekeeping ticks; a real hbs ticks every second
    # (a longer gap means it could not hear: tests/test_store_outage.py).
    config = PlaneConfig(task_cache_s=0, deaf_after_s=1e9)
    return ControlPlane(store, config, clock=clock or Clock())


# ---- decide(): the table ----------------------------------------------------------------


def admitted(**kw) -> HostProgress:  # type: ignore[no-untyped-def]
    return HostProgress("h", "admitted", lease_until=kw.pop("lease_until", 2000.0), **kw)


@pytest.mark.parametrize(
    ("b", "progress", "action"),
    [
        (beat("h"), None, Action.ADMIT),
        (beat("h", "1.1"), None, Action.COMPLETE),
        (beat("h", "1.1"), HostProgress("h", "done"), Action.NOTHING),
        (beat("h", "1.1", S.CONFIRMING, confirmed=False), admitted(), Action.RENEW),
        (beat("h", "1.1", S.CONFIRMING, confirmed=False), None, Action.NOTHING),
        (beat("h", "2.0"), None, Action.NOTHING),  # newer, no downgrade
        (beat("h"), HostProgress("h", "failed", attempts=3), Action.NOTHING),
        (beat("h"), HostProgress("h", "backoff", next_try_at=1500.0), Action.NOTHING),
        (beat("h"), HostProgress("h", "backoff", next_try_at=999.0), Action.ADMIT),
        (beat("h", state=S.DOWNLOADING), admitted(), Action.RENEW),
        (beat("h"), admitted(), Action.RESEND),
        # a host that speaks is judged on what it says, even past its lease
        (beat("h"), admitted(lease_until=1000.0), Action.RESEND),
        (beat("h", state=S.FAILED, task_id="t1", failures=1), admitted(), Action.FAIL),
        (
            beat("h", state=S.FAILED, task_id="t1", failures=1),
            admitted(failures_at_admit=1),
            Action.RESEND,
        ),
        (
            beat("h", state=S.ROLLED_BACK, failed_version="1.1", failures=2),
            admitted(failures_at_admit=1),
            Action.FAIL,
        ),
        (beat("h", state=S.FAILED, failed_version="0.9", failures=5), admitted(), Action.RESEND),
    ],
)
def test_decision_table(b, progress, action) -> None:  # type: ignore[no-untyped-def]
    assert decide(task(), b, progress, 1000.0).action == action


def test_downgrade_only_when_allowed() -> None:
    assert decide(task(allow_downgrade=True), beat("h", "2.0"), None, 0).action == Action.ADMIT


def test_config_only_task_is_done_by_digest() -> None:
    t = task(roles=(Role.CFG,))
    assert decide(t, beat("h", "1.0", cfg=b"old"), None, 0).action == Action.ADMIT
    assert decide(t, beat("h", "1.0", cfg=CFG), None, 0).action == Action.COMPLETE
    assert decide(t, beat("h", "1.0"), None, 0).action == Action.ADMIT


# ---- stores ----------------------------------------------------------------------------


def test_admission_stops_at_the_limit_and_resumes_when_hosts_finish(store) -> None:  # type: ignore[no-untyped-def]
    plane = plane_with(store)
    plane.commands.publish(task(limit=2))
    got = {h: send(plane, beat(h)) is not None for h in ("a", "b", "c")}
    assert got == {"a": True, "b": True, "c": False}
    assert send(plane, beat("a")) is not None  # idle but admitted: resent
    send(plane, beat("a", "1.1"))  # a is done
    assert send(plane, beat("c")) is not None
    counters = store.rollout("t1", 1000.0)
    assert (counters.in_flight, counters.done) == (2, 1)


def test_a_lost_host_releases_only_its_own_slot(store) -> None:  # type: ignore[no-untyped-def]
    clock = Clock()
    plane = plane_with(store, clock)
    plane.commands.publish(task(limit=2, lease_s=30, backoff_s=10))
    assert send(plane, beat("lost"))
    clock.now += 20
    assert send(plane, beat("busy"))
    clock.now += 11  # lost's lease is over; busy's is not
    assert send(plane, beat("new")) is None  # not free before its failure is counted
    plane.tick()  # housekeeping fails the attempt whose lease ran out
    assert send(plane, beat("new")) is not None
    assert send(plane, beat("other")) is None  # busy still holds its slot
    lost = progress(store, "t1", "lost")
    assert lost.state == "backoff" and lost.attempts == 1
    assert lost.reason == "silent since the order: no heartbeat within 30 s"
    assert store.rollout("t1", clock.now).silent == 1
    assert progress(store, "t1", "busy").state == "admitted"


def test_failures_back_off_then_give_up(store) -> None:  # type: ignore[no-untyped-def]
    clock = Clock()
    plane = plane_with(store, clock)
    plane.commands.publish(task(limit=1, attempts=2, backoff_s=10))
    assert send(plane, beat("h"))
    send(plane, beat("h", state=S.FAILED, task_id="t1", failures=1, error="md5 mismatch"))
    p = progress(store, "t1", "h")
    assert (p.state, p.attempts, p.next_try_at, p.reason) == ("backoff", 1, 1010.0, "md5 mismatch")
    assert send(plane, beat("h", state=S.FAILED, task_id="t1", failures=1)) is None
    clock.now += 10
    assert send(plane, beat("h", state=S.FAILED, task_id="t1", failures=1))
    send(plane, beat("h", state=S.FAILED, task_id="t1", failures=2))
    assert progress(store, "t1", "h").state == "failed"
    clock.now += 1000
    assert send(plane, beat("h")) is None
    c = store.rollout("t1", clock.now)
    assert (c.failed, c.failures, c.in_flight) == (1, 2, 0)


def test_the_status_lists_failed_hosts_with_their_reasons(store) -> None:  # type: ignore[no-untyped-def]
    """Issue 13, point 5: the status gave a count; the reason was only in the logs."""
    plane = plane_with(store)
    plane.commands.publish(task(limit=2, attempts=1))
    assert send(plane, beat("a")) and send(plane, beat("b"))
    send(plane, beat("a", state=S.FAILED, task_id="t1", failures=1, error="md5 mismatch"))
    failures = plane.views.status()["failures"]
    assert failures == [{"host": "a", "attempts": 1, "reason": "md5 mismatch", "gave_up": True}]


def test_the_task_halts_at_the_failure_limit(store) -> None:  # type: ignore[no-untyped-def]
    plane = plane_with(store)
    plane.commands.publish(task(limit=5, failure_limit=2))
    for h in ("a", "b", "c"):
        assert send(plane, beat(h))
    for h in ("a", "b"):
        send(plane, beat(h, state=S.FAILED, task_id="t1", failures=1))
    c = store.rollout("t1", 1000.0)
    assert c.status == "halted"
    assert "exceeded its failure budget: 2 failed attempt(s), 1 allowed" in c.halt_reason
    assert send(plane, beat("d")) is None
    assert send(plane, beat("c")) is None  # no resend after a halt
    send(plane, beat("c", "1.1"))
    assert store.rollout("t1", 1000.0).done == 1  # hosts already on their way may finish


def test_cancel_stops_admission_and_keeps_the_slots_of_hosts_still_upgrading(
    store,
) -> None:  # type: ignore[no-untyped-def]
    clock = Clock()
    plane = plane_with(store, clock)
    plane.commands.publish(task(limit=3, lease_s=30))
    for h in "abc":
        send(plane, beat(h))
    assert plane.commands.cancel() is not None
    assert store.active_id() is None
    assert store.rollout("t1", clock.now).in_flight == 3  # they may still be downloading
    assert {progress(store, "t1", h).state for h in "abc"} == {"backoff"}
    assert send(plane, beat("d")) is None
    # a rollout published now counts them: 3 slots of 3 are taken until their leases end
    plane.commands.publish(task("1.2", limit=3, task_id="t2"))
    assert store.task("t2").shares_slots_with == ("t1",)
    assert send(plane, beat("d")) is None
    assert send(plane, beat("a")) is None  # still upgrading for t1: not ordered again
    clock.now += 31
    assert store.rollout("t1", clock.now).in_flight == 0
    assert send(plane, beat("d")) is not None


def test_publishing_a_new_task_cancels_the_old(store) -> None:  # type: ignore[no-untyped-def]
    clock = Clock()
    plane = plane_with(store, clock)
    plane.commands.publish(task(limit=1, lease_s=30))
    send(plane, beat("a"))
    plane.commands.publish(task("1.2", limit=1, task_id="t2"))
    assert store.rollout("t1", clock.now).status == "cancelled"
    assert send(plane, beat("b")) is None  # a is still upgrading for t1: its slot counts
    clock.now += 31
    assert send(plane, beat("b")) is not None  # t1's lease is over


def test_sqlite_store_survives_a_restart(tmp_path: Path) -> None:
    clock = Clock()
    store = SqliteStore(tmp_path / "hbs.db")
    plane = plane_with(store, clock)
    plane.commands.publish(task(limit=2, attempts=3))
    send(plane, beat("a"))
    send(plane, beat("b"))
    send(plane, beat("b", state=S.FAILED, task_id="t1", failures=1))
    send(plane, beat("c", "1.1"))
    plane.fleet.flush()
    store.close()

    again = SqliteStore(tmp_path / "hbs.db")
    plane2 = plane_with(again, clock)
    assert again.task(again.active_id() or "") == task(limit=2, attempts=3)
    assert progress(again, "t1", "a").state == "admitted"
    assert progress(again, "t1", "b").state == "backoff"
    c = again.rollout("t1", clock.now)
    assert (c.in_flight, c.done, c.failures) == (1, 1, 1)
    assert plane2.views.versions() == {"a": "1.0", "b": "1.0", "c": "1.1"}
    assert send(plane2, beat("d")) is not None
    assert send(plane2, beat("e")) is None  # a and d hold the two slots
    again.close()


def test_one_sqlite_file_serves_one_process(tmp_path: Path) -> None:
    first = SqliteStore(tmp_path / "hbs.db")
    with pytest.raises(StoreError, match="another hbs process uses"):
        SqliteStore(tmp_path / "hbs.db")
    first.close()
    SqliteStore(tmp_path / "hbs.db").close()


def test_a_failing_store_fails_closed(tmp_path: Path) -> None:
    class Broken(MemoryStore):
        def commit(self, *a, **k):  # type: ignore[no-untyped-def]
            raise StoreError("redis is down")

    plane = plane_with(Broken())
    plane.commands.publish(task())
    assert send(plane, beat("a")) is None


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"wgeturl": "file:///etc", "version": "1.1", "binfile_md5": "0" * 32}, "wgeturl"),
        (
            {"wgeturl": "http://${your_cdn_addr}/f", "version": "1.1", "binfile_md5": "0" * 32},
            "wgeturl",
        ),
        ({"wgeturl": "http://h/f", "version": "1.1\x00", "binfile_md5": "0" * 32}, "version"),
        (
            {"wgeturl": "http://h/f", "version": "1.1", "type": 1, "binfile_md5": "0" * 32},
            "cfgfile_md5",
        ),
        ({"wgeturl": "http://h/f", "version": "1.1", "type": True}, "type"),
        ({"wgeturl": "http://h/f", "version": "1.1", "binfile_md5": 5}, "binfile_md5"),
        ({"version": "1.1"}, "wgeturl"),
        ([], "body"),
    ],
)
def test_seed_bodies_are_validated_field_by_field(body: object, field: str) -> None:
    from selfupgrade.server import FieldError, task_from_seed
    from selfupgrade.server.tasks import TaskLimits

    with pytest.raises(FieldError) as info:
        task_from_seed(body, limits=TaskLimits(), now=0)
    assert info.value.field == field


# ---- the fleet view's writes, and large rollouts ------------------------------------------


class RecordingStore(MemoryStore):
    """Records when each host's view is written (the persistence hook SQLite overrides)."""

    def __init__(self, clock: Clock) -> None:
        super().__init__()
        self.clock = clock
        self.writes: list[tuple[float, str]] = []

    def save_hosts(self, seen) -> None:  # type: ignore[no-untyped-def]
        batch = list(seen)
        self.writes.extend((self.clock.now, s.host) for s in batch)
        super().save_hosts(batch)


def test_unchanged_heartbeats_are_written_once_per_seen_save_s_spread_over_it() -> None:
    clock = Clock()
    store = RecordingStore(clock)
    plane = ControlPlane(store, PlaneConfig(seen_save_s=300), clock=clock)
    hosts = [f"h{i:04d}" for i in range(2000)]
    start = clock.now
    for second in range(30 * 60):  # 30 minutes; each host beats once a minute, at its second
        clock.now = start + second
        for host in hosts[second % 60 :: 60]:
            send(plane, beat(host))
        plane.fleet.flush()
    per_host = {h: 0 for h in hosts}
    per_minute: dict[int, int] = {}
    for at, host in store.writes:
        per_host[host] += 1
        per_minute[int(at - start) // 60] = per_minute.get(int(at - start) // 60, 0) + 1
    # the first heartbeat, then one per 5-minute period of the host's: 6 or 7 in 30 minutes
    assert set(per_host.values()) <= {6, 7}, sorted(set(per_host.values()))
    # spread: about 2000 / 5 a minute, never the whole fleet in the minute after a period ends
    assert per_minute[0] == 2000
    assert max(n for minute, n in per_minute.items() if minute) < 700, per_minute
    # news is written at the next flush, whatever the period
    clock.now += 1
    send(plane, beat("h0001", "1.1"))
    plane.fleet.flush()
    assert store.writes[-1] == (clock.now, "h0001")


def test_members_of_a_rollout_whose_row_never_came_are_dropped_at_load(tmp_path: Path) -> None:
    """A large rollout's 25,000 members read back after a restart; members written for a
    rollout whose own row never came (hbs stopped in between) are dropped at load."""
    clock = Clock()
    store = SqliteStore(tmp_path / "hbs.db")
    members = {f"h{i:05d}": 0 for i in range(25_000)}
    t = task(limit=2, attempts=3)
    plane = plane_with(store, clock)
    plane.commands.publish(t, members)
    send(plane, beat("h00007"))
    store.close()
    # as if hbs had died between a rollout's members and its row
    with sqlite3.connect(tmp_path / "hbs.db") as db:
        db.executemany(
            "INSERT INTO members (task_id, host, wave) VALUES ('orphan', ?, 0)", [("x",), ("y",)]
        )

    again = SqliteStore(tmp_path / "hbs.db")
    assert again.task(again.active_id() or "") == t
    assert again.members(t.id) == members
    assert progress(again, t.id, "h00007").state == "admitted"
    rows = again._db.execute("SELECT COUNT(*) FROM members WHERE task_id = 'orphan'").fetchone()
    assert rows == (0,)
    again.close()
