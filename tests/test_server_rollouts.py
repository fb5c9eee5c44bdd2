"""Staged rollouts in the control plane, on every store, with a virtual clock."""

from __future__ import annotations

import datetime
import threading
import zoneinfo
from pathlib import Path

import pytest

from selfupgrade import Heartbeat, UpgradeState, parse_version
from selfupgrade.models import Release
from selfupgrade.server import ControlPlane, FieldError, MemoryStore, PlaneConfig, SqliteStore
from selfupgrade.server.plan import Plan, Window, assign_waves
from selfupgrade.server.rollouts import rollout_from_json
from selfupgrade.server.tasks import Task, TaskLimits

from .server_helpers import beat, send, task

THREE_WAVES = {
    "waves": [
        {"name": "canary", "hosts": 1, "max_in_flight": 1, "bake_s": 5},
        {"name": "quarter", "percent": 25, "max_in_flight": 2, "bake_s": 5},
        {"name": "all", "percent": 100, "max_in_flight": 5},
    ]
}
HOSTS = [f"h{i:02d}" for i in range(20)]


class Clock:
    def __init__(self) -> None:
        # a Wednesday, 03:00 in Shanghai
        self.now = datetime.datetime(
            2026, 11, 25, 3, 0, tzinfo=zoneinfo.ZoneInfo("Asia/Shanghai")
        ).timestamp()

    def __call__(self) -> float:
        return self.now


def rollout(plan: dict, version: str = "1.1", **limits) -> Task:  # type: ignore[no-untyped-def, type-arg]
    base = task(version)
    settings = {"lease_s": 30, "max_attempts": 3, "retry_backoff_s": 10, **limits}
    return Task("r1", base.release, TaskLimits(**settings), plan=Plan.from_json(plan))


def fleet_plane(store, clock: Clock, labels=None) -> ControlPlane:  # type: ignore[no-untyped-def]
    plane = ControlPlane(store, PlaneConfig(task_cache_s=0), clock=clock)
    for h in HOSTS:
        send(
            plane, Heartbeat(host=h, version=parse_version("1.0"), labels=(labels or {}).get(h, {}))
        )
    return plane


def admitted_now(plane: ControlPlane, hosts=HOSTS) -> set[str]:  # type: ignore[no-untyped-def]
    return {h for h in hosts if send(plane, beat(h)) is not None}


# ---- plans ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("plan", "field"),
    [
        ({}, "plan.waves"),
        ({"waves": []}, "plan.waves"),
        ({"waves": [{"name": "x"}]}, "plan.waves[0]"),
        ({"waves": [{"hosts": 1, "percent": 5}]}, "plan.waves[0]"),
        ({"waves": [{"percent": 150}]}, "plan.waves[0].percent"),
        ({"waves": [{"percent": 50}, {"percent": 20}]}, "plan.waves[1].percent"),
        ({"waves": [{"hosts": 0}]}, "plan.waves[0].hosts"),
        ({"waves": [{"percent": 100, "max_in_flight": 0}]}, "plan.waves[0].max_in_flight"),
        ({"waves": [{"percent": 100, "bake_s": -1}]}, "plan.waves[0].bake_s"),
        ({"waves": [{"percent": 100, "max_failure_ratio": 2}]}, "plan.waves[0].max_failure_ratio"),
        ({"waves": [{"percent": 100, "colour": "red"}]}, "plan.waves[0].colour"),
        ({"waves": [{"percent": 100}], "selector": {"dc": 1}}, "plan.selector"),
        (
            {
                "waves": [{"percent": 100}],
                "window": {"days": ["xyz"], "start": "01:00", "end": "02:00"},
            },
            "plan.window.days",
        ),
        (
            {
                "waves": [{"percent": 100}],
                "window": {"days": ["mon"], "start": "1:00", "end": "02:00"},
            },
            "plan.window.start",
        ),
        (
            {
                "waves": [{"percent": 100}],
                "window": {"days": ["mon"], "start": "01:00", "end": "02:00", "tz": "Mars/Base"},
            },
            "plan.window.tz",
        ),
        ({"waves": [{"percent": 100}], "extra": 1}, "plan.extra"),
    ],
)
def test_invalid_plans_name_the_field(plan: dict, field: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(FieldError) as info:
        Plan.from_json(plan)
    assert info.value.field == field


def test_waves_are_cumulative_and_hosts_chosen_by_a_stable_hash() -> None:
    plan = Plan.from_json(THREE_WAVES)
    assert plan.sizes(20) == [1, 5, 20]
    assert plan.sizes(2) == [1, 1, 2]
    first = assign_waves(plan, HOSTS, "r1")
    assert assign_waves(plan, reversed(HOSTS), "r1") == first  # same choice, any order
    assert sorted(first.values()).count(0) == 1 and sorted(first.values()).count(1) == 4
    canaries = {
        next(h for h, w in assign_waves(plan, HOSTS, f"r{i}").items() if w == 0) for i in range(10)
    }
    assert len(canaries) > 3  # different rollouts pick different canaries


def test_maintenance_window() -> None:
    w = Plan.from_json(
        {
            "waves": [{"percent": 100}],
            "window": {"days": ["wed"], "start": "02:00", "end": "05:00", "tz": "Asia/Shanghai"},
        }
    ).window
    assert w is not None
    sh = zoneinfo.ZoneInfo("Asia/Shanghai")
    at = lambda d, h, m=0: datetime.datetime(2026, 11, d, h, m, tzinfo=sh).timestamp()  # noqa: E731
    assert w.is_open(at(25, 3))  # Wednesday 03:00
    assert not w.is_open(at(25, 5))  # end is exclusive
    assert not w.is_open(at(26, 3))  # Thursday
    night = Window(("sat",), "22:00", "02:00", "UTC")
    utc = datetime.timezone.utc
    assert night.is_open(datetime.datetime(2026, 11, 28, 23, tzinfo=utc).timestamp())  # Saturday
    assert night.is_open(datetime.datetime(2026, 11, 29, 1, tzinfo=utc).timestamp())  # into Sunday
    assert not night.is_open(datetime.datetime(2026, 11, 29, 3, tzinfo=utc).timestamp())


# ---- waves in action ---------------------------------------------------------------------


def confirm(plane: ControlPlane, hosts) -> None:  # type: ignore[no-untyped-def]
    for h in hosts:
        send(plane, beat(h, "1.1"))


def test_waves_are_promoted_only_after_confirmation_and_bake(store) -> None:  # type: ignore[no-untyped-def]
    clock = Clock()
    plane = fleet_plane(store, clock)
    r = plane.commands.publish(rollout(THREE_WAVES))
    members = store.members(r.id)
    by_wave = {k: sorted(h for h, w in members.items() if w == k) for k in range(3)}
    assert [len(by_wave[k]) for k in range(3)] == [1, 4, 15]
    assert r.previous_version == "1.0"

    assert admitted_now(plane) == set(by_wave[0])
    waiting = [h for h in HOSTS if h not in by_wave[0]]
    plane.tick()
    assert admitted_now(plane, waiting) == set()  # the canary has not confirmed yet
    send(plane, beat(by_wave[0][0], "1.1", UpgradeState.CONFIRMING, confirmed=False))
    plane.tick()
    assert admitted_now(plane, waiting) == set()  # on trial is not confirmed
    confirm(plane, by_wave[0])
    plane.tick()  # settled: baking starts
    clock.now += 4
    plane.tick()
    assert admitted_now(plane, waiting) == set()  # still baking
    clock.now += 1
    plane.tick()  # baked: wave 2
    second = admitted_now(plane, waiting)
    assert len(second) == 2 and second <= set(by_wave[1])  # its own limit of 2
    confirm(plane, second)
    assert len(admitted_now(plane, [h for h in waiting if h not in second])) == 2
    confirm(plane, by_wave[1])
    plane.tick()
    clock.now += 5
    plane.tick()
    third = admitted_now(plane, by_wave[2])
    assert len(third) == 5 and third <= set(by_wave[2])
    confirm(plane, by_wave[2])
    plane.tick()
    plane.tick()
    c = store.rollout(r.id, clock.now)
    assert c.status == "complete" and c.done == 20
    assert [w.done for w in c.waves] == [1, 4, 15]


def test_a_failed_canary_halts_the_rollout(store) -> None:  # type: ignore[no-untyped-def]
    clock = Clock()
    plane = fleet_plane(store, clock)
    r = plane.commands.publish(rollout(THREE_WAVES))
    canary = admitted_now(plane).pop()
    send(
        plane,
        beat(
            canary,
            "1.0",
            UpgradeState.ROLLED_BACK,
            failed_version="1.1",
            failures=1,
            error="1.1 crashed at start",
        ),
    )
    c = store.rollout(r.id, clock.now)
    assert c.status == "halted"
    assert (
        "wave 1 (canary) exceeded its failure budget: 1 failed attempt(s), 0 allowed"
        in c.halt_reason
    )
    assert f"{canary}: 1.1 crashed at start" in c.halt_reason
    clock.now += 1000
    plane.tick()
    assert admitted_now(plane) == set()
    assert {p.host for p in store.all_progress(r.id)} == {canary}  # nobody else was touched
    assert store.rollout(r.id, clock.now).wave == 0


def test_the_budget_of_a_later_wave(store) -> None:  # type: ignore[no-untyped-def]
    clock = Clock()
    plan = {
        "waves": [
            {"name": "canary", "hosts": 1, "max_failures": 1},
            {"name": "rest", "percent": 100, "max_in_flight": 4, "max_failure_ratio": 0.1},
        ]
    }
    plane = fleet_plane(store, clock)
    r = plane.commands.publish(rollout(plan, max_attempts=1))
    canary = admitted_now(plane).pop()
    send(plane, beat(canary, state=UpgradeState.FAILED, task_id="r1", failures=1))
    plane.tick()
    plane.tick()  # one failure is within the canary's budget; the wave settled: promoted
    assert store.rollout(r.id, clock.now).wave == 1
    batch = admitted_now(plane, [h for h in HOSTS if h != canary])
    assert len(batch) == 4
    for h in sorted(batch)[:2]:
        send(plane, beat(h, state=UpgradeState.FAILED, task_id="r1", failures=1))
    c = store.rollout(r.id, clock.now)
    assert (
        c.status == "halted" and "wave 2 (rest)" in c.halt_reason and "1 allowed" in c.halt_reason
    )


def test_pause_then_resume_continues(store) -> None:  # type: ignore[no-untyped-def]
    clock = Clock()
    plane = fleet_plane(store, clock)
    r = plane.commands.publish(rollout({"waves": [{"percent": 100, "max_in_flight": 3}]}))
    first = admitted_now(plane)
    assert plane.commands.control(r.id, "pause")
    assert not plane.commands.control(r.id, "pause")  # already paused
    confirm(plane, first)
    rest = [h for h in HOSTS if h not in first]
    assert admitted_now(plane, rest) == set()
    assert plane.commands.control(r.id, "resume")
    assert len(admitted_now(plane, rest)) == 3
    assert store.rollout(r.id, clock.now).done == 3


def test_abort_admits_nobody_and_orders_nobody_again(store) -> None:  # type: ignore[no-untyped-def]
    clock = Clock()
    plane = fleet_plane(store, clock)
    r = plane.commands.publish(rollout({"waves": [{"percent": 100, "max_in_flight": 3}]}))
    first = admitted_now(plane)
    assert len(first) == 3
    assert plane.commands.control(r.id, "abort", "bad idea")
    c = store.rollout(r.id, clock.now)
    # the hosts mid-upgrade keep their slots until their leases end
    assert (c.status, c.in_flight, c.halt_reason) == ("aborted", 3, "bad idea")
    assert admitted_now(plane) == set()
    assert not plane.commands.control(r.id, "resume")
    clock.now += r.limits.lease_s + 1
    plane.tick()  # the leases of hosts no longer admitted are dropped
    assert store.rollout(r.id, clock.now).in_flight == 0
    assert store.due(r.id, clock.now) == []


def test_a_closed_window_admits_nobody(store) -> None:  # type: ignore[no-untyped-def]
    clock = Clock()  # Wednesday 03:00 in Shanghai
    plane = fleet_plane(store, clock)
    closed = {
        "waves": [{"percent": 100, "max_in_flight": 5}],
        "window": {"days": ["sat", "sun"], "start": "02:00", "end": "05:00", "tz": "Asia/Shanghai"},
    }
    plane.commands.publish(rollout(closed))
    assert admitted_now(plane) == set()
    opened = {**closed, "window": {**closed["window"], "days": ["wed"]}}
    plane.commands.publish(rollout(opened, "1.2"))
    assert len(admitted_now(plane)) == 5


def test_targeting_by_labels_and_late_joiners(store) -> None:  # type: ignore[no-untyped-def]
    clock = Clock()
    labels = {h: {"dc": "bj" if i % 2 else "sh"} for i, h in enumerate(HOSTS)}
    plane = fleet_plane(store, clock, labels)
    r = plane.commands.publish(
        rollout({"waves": [{"percent": 100, "max_in_flight": 20}], "selector": {"dc": "bj"}})
    )
    assert set(store.members(r.id)) == {h for h in HOSTS if labels[h]["dc"] == "bj"}
    got = {
        h
        for h in HOSTS
        if send(plane, Heartbeat(host=h, version=parse_version("1.0"), labels=labels[h]))
        is not None
    }
    assert got == set(store.members(r.id))
    late = Heartbeat(host="new-bj", version=parse_version("1.0"), labels={"dc": "bj"})
    assert send(plane, late) is None  # first heard from after the publish: on probation
    clock.now += TaskLimits().probation_s
    assert send(plane, late) is not None
    assert (
        send(plane, Heartbeat(host="new-sh", version=parse_version("1.0"), labels={"dc": "sh"}))
        is None
    )


def test_a_silent_member_holds_its_wave_until_lost_a_late_joiner_too(store) -> None:  # type: ignore[no-untyped-def]
    """A member that stops heartbeating before it settles holds its wave up for
    ``lost_after_leases`` (3) leases of silence; then the wave settles without it (found
    within half a lease more). A host that joined after the housekeeping first listed the
    wave is counted as well."""
    clock = Clock()
    plane = fleet_plane(store, clock)
    wave = {"percent": 100, "max_in_flight": 30, "max_failure_ratio": 0.5}
    r = plane.commands.publish(rollout({"waves": [wave]}, probation_s=0))
    plane.tick()  # the housekeeping has listed the wave's 20 members
    clock.now += 5
    assert admitted_now(plane) == set(HOSTS)
    assert send(plane, beat("late")) is not None  # joined: the wave has 21 members
    confirm(plane, HOSTS)
    plane.tick()
    silent_from = clock.now
    while clock.now - silent_from < 85:  # "late" is silent, the others go on heartbeating
        clock.now += 5
        confirm(plane, HOSTS)
        plane.tick()
        assert store.rollout(r.id, clock.now).status == "active", clock.now - silent_from
    for _ in range(8):  # lost after three 30 s leases, found by a scan every half lease
        clock.now += 5
        confirm(plane, HOSTS)
        plane.tick()
    c = store.rollout(r.id, clock.now)
    assert c.status == "complete" and c.done == 20 and c.waves[0].members == 21


class CountingStore(MemoryStore):
    """A memory store that counts what the housekeeping reads of a rollout's hosts."""

    def __init__(self) -> None:
        super().__init__()
        self.hosts_read = self.member_lists = self.progress_lists = 0

    def read(self, task_id, hosts):  # type: ignore[no-untyped-def]
        self.hosts_read += len(hosts)
        return super().read(task_id, hosts)

    def members(self, task_id):  # type: ignore[no-untyped-def]
        self.member_lists += 1
        return super().members(task_id)

    def all_progress(self, task_id):  # type: ignore[no-untyped-def]
        self.progress_lists += 1
        return super().all_progress(task_id)


def test_looking_for_lost_hosts_reads_the_silent_ones_not_the_wave() -> None:
    """With 2,000 members of which 3 fell silent, 20 minutes of housekeeping (a tick every
    15 s, a scan for lost hosts every half lease) list the members once and read the
    progress of the silent hosts only, never every member's."""
    clock = Clock()
    store = CountingStore()
    plane = ControlPlane(store, PlaneConfig(task_cache_s=0), clock=clock)
    hosts = [f"m{i:04d}" for i in range(2000)]
    plane.answer([beat(h) for h in hosts])
    r = plane.commands.publish(rollout({"waves": [{"percent": 100, "max_in_flight": 10}]}))
    talking = hosts[3:]  # hosts[:3] are silent from the start
    start = clock.now
    store.hosts_read = heartbeat_reads = 0
    for step in range(1, 81):
        clock.now = start + 15 * step
        if step % 4 == 0:
            plane.answer([beat(h) for h in talking])
            heartbeat_reads += len(talking)
        plane.tick()
    assert store.rollout(r.id, clock.now).status == "active"
    assert store.member_lists == 1 and store.progress_lists == 0
    housekeeping_reads = store.hosts_read - heartbeat_reads
    # fewer hosts read in 80 ticks than one reading of the wave would be
    assert 3 <= housekeeping_reads < len(hosts), housekeeping_reads


def test_fleet_rollback_targets_upgraded_hosts_and_bad_versions_are_refused(store) -> None:  # type: ignore[no-untyped-def]
    clock = Clock()
    plane = fleet_plane(store, clock)
    r = plane.commands.publish(rollout({"waves": [{"percent": 100, "max_in_flight": 4}]}))
    upgraded = admitted_now(plane)
    confirm(plane, upgraded)
    back = plane.commands.rollback(r.id, mark_bad=True)
    assert store.rollout(r.id, clock.now).status == "aborted"
    assert back.kind == "rollback" and str(back.version) == "1.0"
    assert set(store.members(back.id)) == upgraded
    order = send(plane, beat(sorted(upgraded)[0], "1.1"))
    assert order is not None and order.rollback and order.release.artifacts == ()
    assert send(plane, beat("h19" if "h19" not in upgraded else "h18", "1.0")) is None
    with pytest.raises(FieldError, match="marked bad"):
        plane.commands.publish(rollout({"waves": [{"percent": 100}]}))
    for h in upgraded:
        send(plane, beat(h, "1.0"))
    assert store.rollout(back.id, clock.now).done == len(upgraded)


def test_a_version_marked_bad_is_bad_however_it_is_spelt(store) -> None:  # type: ignore[no-untyped-def]
    plane = fleet_plane(store, Clock())
    plane.commands.mark_bad("1.1.0", "crashes at start")
    assert plane.commands.mark_bad("2.0", "x") == {"1.1.0": "crashes at start", "2.0": "x"}
    with pytest.raises(FieldError, match=r"1\.1 is marked bad: crashes at start"):
        plane.commands.publish(rollout({"waves": [{"percent": 100}]}, version="1.1"))
    with pytest.raises(FieldError, match=r"2\.0\.0 is marked bad"):
        plane.commands.publish(rollout({"waves": [{"percent": 100}]}, version="2.0.0"))


def test_a_restarted_plane_keeps_waves_and_members(tmp_path: Path) -> None:
    clock = Clock()
    store = SqliteStore(tmp_path / "hbs.db")
    plane = fleet_plane(store, clock)
    r = plane.commands.publish(rollout(THREE_WAVES))
    canary = admitted_now(plane)
    confirm(plane, canary)
    plane.tick()
    clock.now += 5
    plane.tick()
    members = store.members(r.id)
    store.close()
    again = SqliteStore(tmp_path / "hbs.db")
    plane2 = ControlPlane(again, PlaneConfig(task_cache_s=0), clock=clock)
    assert again.members(r.id) == members
    c = again.rollout(r.id, clock.now)
    assert (c.wave, c.done, c.status) == (1, 1, "active")
    assert len(admitted_now(plane2)) == 2
    again.close()


def test_rollout_requests_are_validated() -> None:
    limits = TaskLimits()
    ok = rollout_from_json(
        {
            "wgeturl": "http://127.0.0.1/f",
            "version": "2.0",
            "binfile_md5": "0" * 32,
            "plan": THREE_WAVES,
        },
        limits,
        0,
    )
    assert ok.seed is not None and ok.plan is not None and len(ok.plan.waves) == 3
    for body, field in (
        (
            {"plan": THREE_WAVES, "release": {"version": "2.0", "artifacts": {}}},
            "release.artifacts",
        ),
        (
            {
                "release": {
                    "version": "2.0",
                    "artifacts": {"bin": {"url": "file:///x", "digest": "md5:" + "0" * 32}},
                },
                "plan": THREE_WAVES,
            },
            "release",
        ),
        ({"wgeturl": "http://h/f", "version": "2.0", "binfile_md5": "0" * 32}, "plan"),
        ({"plan": THREE_WAVES, "limits": {"lease_s": -1}}, "limits"),
        ({"plan": THREE_WAVES, "bogus": 1}, "bogus"),
    ):
        with pytest.raises(FieldError) as info:
            rollout_from_json(body, limits, 0)
        assert info.value.field.startswith(field), (body, info.value.field)
    rollback_release = Release(parse_version("1.0"), ())
    assert rollback_release.artifacts == ()


def test_a_staged_rollout_needs_known_hosts() -> None:
    plane = ControlPlane(MemoryStore(), PlaneConfig(task_cache_s=0), clock=Clock())
    with pytest.raises(FieldError, match="no host that matches the plan has sent a heartbeat"):
        plane.commands.publish(rollout(THREE_WAVES))
    plane.commands.publish(
        rollout({"waves": [{"percent": 100}]})
    )  # one wave: hosts join as they come


def test_heartbeats_are_answered_while_a_rollout_is_being_published(tmp_path: Path) -> None:
    """Publishing (which for a large fleet means storing hundreds of thousands of members)
    runs off the event loop: a heartbeat sent meanwhile is answered, over real HTTP."""
    import httpx

    from selfupgrade.testing import HbsServer

    def wire(host: str) -> dict[str, object]:
        return Heartbeat(host, parse_version("1.0"), UpgradeState.IDLE).to_wire()

    with HbsServer(tmp_path / "hbs") as hbs, httpx.Client(timeout=10, trust_env=False) as client:
        for host in ("a", "b"):
            assert client.post(hbs.heartbeat_url, json=wire(host)).json() == {"order": None}
        assert hbs.store is not None
        storing, answered = threading.Event(), threading.Event()
        write = hbs.store.publish

        def slow_publish(task, members, counters) -> None:  # type: ignore[no-untyped-def]
            storing.set()
            answered.wait(timeout=30)  # held until the heartbeat below was answered
            write(task, members, counters)

        hbs.store.publish = slow_publish  # type: ignore[method-assign]
        body = {"wgeturl": "http://127.0.0.1:9/f", "version": "1.1", "binfile_md5": "0" * 32}
        publishing = threading.Thread(target=hbs.publish, args=(body,))
        publishing.start()
        try:
            assert storing.wait(timeout=10)
            reply = client.post(hbs.heartbeat_url, json=wire("c"))  # times out if blocked
            assert reply.status_code == 200 and reply.json() == {"order": None}
        finally:
            answered.set()
            publishing.join(timeout=30)
        assert client.post(hbs.heartbeat_url, json=wire("a")).json()["order"] is not None
