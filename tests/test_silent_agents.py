"""Agents that report nothing but their version (unmodified falcon agents): what hbs infers.

The rules (``judge_silent_agent``, ``silence_grace``), the listener's process tracking, the
artifact check against a real artifact server, the re-check that pauses a rollout, and slots
shared with a cancelled rollout. The same behaviours against the real Go agent are in
``tests/test_e2e_falcon_go.py``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from dataclasses import replace

import pytest

from selfupgrade import Artifact, Digest, Release, Role, parse_version
from selfupgrade import UpgradeState as S
from selfupgrade.server import Action, ControlPlane, MemoryStore, PlaneConfig, decide
from selfupgrade.server.artifacts import ArtifactCheck, ArtifactUnavailable
from selfupgrade.server.falcon_rpc import ProcessTracker, serve_falcon_rpc
from selfupgrade.server.rules import silence_grace
from selfupgrade.server.tasks import FieldError, HostProgress
from selfupgrade.testing import ArtifactServer, Fault

from .server_helpers import beat, progress, send, task


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def legacy(host: str = "h", version: str = "1.0", *, process: str = "L/1", **kw):  # type: ignore[no-untyped-def]
    return replace(beat(host, version, **kw), reports_state=False, process=process)


def ordered(**kw) -> HostProgress:  # type: ignore[no-untyped-def]
    kw.setdefault("admitted_at", 990.0)
    return HostProgress("h", "admitted", lease_until=2000.0, process="L/1", **kw)


CONFIG_ONLY = (Role.CFG,)


@pytest.mark.parametrize(
    ("b", "p", "roles", "action"),
    [
        # the process that got the order, old version, no download: once may have crossed it
        (legacy(), ordered(), (Role.BIN,), Action.WAIT),
        (legacy(), ordered(idle_beats=1), (Role.BIN,), Action.FAIL),
        (legacy(state=S.DOWNLOADING), ordered(idle_beats=1), (Role.BIN,), Action.RENEW),
        # still downloading a lease after the order (lease_s 30; ordered at 900): failed
        (legacy(state=S.DOWNLOADING), ordered(admitted_at=900.0), (Role.BIN,), Action.FAIL),
        # a new process: the new version is done; the old one did not come up
        (legacy("h", "1.1", process="L/2"), ordered(), (Role.BIN,), Action.COMPLETE),
        (legacy(process="L/2"), ordered(), (Role.BIN,), Action.FAIL),
        (legacy(process="L/2"), ordered(), CONFIG_ONLY, Action.COMPLETE),
        (legacy(), ordered(idle_beats=1), CONFIG_ONLY, Action.FAIL),
        # another listener (hbs restarted): cannot tell, the order goes out once more
        (legacy(process="M/1"), ordered(idle_beats=1), (Role.BIN,), Action.RESEND),
        # a config-only result cannot be checked again: done stays done
        (legacy(process="L/3"), HostProgress("h", "done"), CONFIG_ONLY, Action.NOTHING),
        # an agent that reports its state gets the order again while idle
        (beat("h"), ordered(idle_beats=5), (Role.BIN,), Action.RESEND),
    ],
)
def test_what_an_unmodified_agents_heartbeat_means(b, p, roles, action) -> None:  # type: ignore[no-untyped-def]
    assert decide(task(roles=roles), b, p, 1000.0).action == action


def test_the_reasons_say_what_hbs_saw() -> None:
    t = task()
    assert decide(t, legacy(), ordered(idle_beats=1), 1000.0).reason == (
        "reported 1.0 again after the order without restarting: the agent rolled back "
        "(md5 mismatch, download error)"
    )
    assert "restarted after the order but still reports 1.0" in (
        decide(t, legacy(process="L/2"), ordered(), 1000.0).reason
    )


def test_the_silence_grace_comes_from_the_interval_and_the_restart() -> None:
    t = task(lease_s=180)
    assert silence_grace(t, 5.0) == 3 * 5 + 30
    assert silence_grace(t, 0.1) == 3 * 1 + 30  # a floor of one second per beat
    assert silence_grace(t, 60.0) == 180  # never more than the lease
    assert silence_grace(t, None) == 180  # unknown interval: the lease


def test_an_order_goes_once_to_an_unmodified_agent_and_a_rollback_fails_the_attempt() -> None:
    clock = Clock()
    plane = ControlPlane(MemoryStore(), PlaneConfig(task_cache_s=0), clock=clock)
    plane.commands.publish(task(limit=1, attempts=2, backoff_s=10))
    answers = []
    for _ in range(3):  # the order, an idle beat (it may have crossed), a second idle beat
        answers.append(send(plane, legacy()) is not None)
        clock.now += 5
    assert answers == [True, False, False]
    p = progress(plane._store, "t1", "h")
    assert p.state == "backoff" and p.attempts == 1  # ordered, then twice idle: failed
    assert "rolled back" in p.reason
    clock.now += 10
    assert send(plane, legacy()) is not None  # the second attempt, after the back-off
    assert send(plane, legacy()) is None  # not re-sent
    assert send(plane, legacy()) is None
    assert progress(plane._store, "t1", "h").state == "failed"


def test_a_host_silent_after_its_order_fails_after_its_grace_not_the_lease() -> None:
    clock = Clock()
    store = MemoryStore()
    plane = ControlPlane(store, PlaneConfig(task_cache_s=0), clock=clock)
    for _ in range(3):  # three beats 5 s apart: an interval of 5 s
        plane.answer([legacy()])
        clock.now += 5
    plane.commands.publish(task(limit=1, lease_s=180))
    assert send(plane, legacy()) is not None
    for _ in range(3 * 5 + 30 + 1):  # 46 s, hbs ticking every second: well before 180
        clock.now += 1
        plane.tick()
    p = progress(store, "t1", "h")
    assert (p.state, p.reason) == ("backoff", "silent since the order: no heartbeat within 45 s")
    assert store.rollout("t1", clock.now).silent == 1


# ---- the listener: which process is talking ------------------------------------------------


def test_a_probe_then_a_new_connection_is_a_new_process_and_a_reconnect_is_not() -> None:
    t = [0.0]
    tracker = ProcessTracker(clock=lambda: t[0])
    first, second, third = object(), object(), object()
    a = tracker.process("h", "10.0.0.1", first)
    t[0] = 5
    assert tracker.process("h", "10.0.0.1", first) == a  # same connection
    t[0] = 10
    assert tracker.process("h", "10.0.0.1", second) == a  # a reconnect, no probe
    t[0] = 11
    tracker.probe("10.0.0.1")  # the agent restarted: its start-up probe
    t[0] = 11.1
    b = tracker.process("h", "10.0.0.1", third)
    assert b != a and b.split("/")[0] == a.split("/")[0]
    assert ProcessTracker().process("h", "10.0.0.1", third).split("/")[0] != a.split("/")[0]


def test_the_listener_tells_a_restart_from_a_reconnect_over_tcp() -> None:
    """Real sockets on 127.0.0.1, the frames an unmodified agent sends."""
    store = MemoryStore()
    plane = ControlPlane(store, PlaneConfig(task_cache_s=0))
    seen: list[str] = []
    real_answer = plane.answer

    def answer(beats):  # type: ignore[no-untyped-def]
        seen.extend(b.process for b in beats)
        assert all(not b.reports_state for b in beats)
        return real_answer(beats)

    plane.answer = answer  # type: ignore[method-assign]

    async def scenario() -> None:
        server = await serve_falcon_rpc(plane, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]

        async def report(writer, reader, call_id: int) -> None:  # type: ignore[no-untyped-def]
            params = {"Hostname": "n0-000-001", "AgentVersion": "6.1.0", "InUpgrading": False}
            frame = {"method": "Agent.ReportStatus", "params": [params], "id": call_id}
            writer.write(json.dumps(frame).encode() + b"\n")
            await writer.drain()
            assert json.loads(await reader.readline())["result"]["code"] == 0

        async def connection():  # type: ignore[no-untyped-def]
            return await asyncio.open_connection("127.0.0.1", port)

        reader, writer = await connection()
        await report(writer, reader, 0)
        await report(writer, reader, 1)
        writer.close()
        reader, writer = await connection()  # a reconnect: no probe
        await report(writer, reader, 0)
        writer.close()
        _, probe = await connection()  # a start: the probe, closed without a word
        probe.close()
        await asyncio.sleep(0.2)
        reader, writer = await connection()
        await report(writer, reader, 0)
        writer.close()
        server.close()
        await server.wait_closed()

    asyncio.run(scenario())
    assert seen[0] == seen[1] == seen[2] != seen[3]


# ---- the artifact check, against a real artifact server -------------------------------------


def release_of(server: ArtifactServer, data: bytes, *, md5: str | None = None, size=None):  # type: ignore[no-untyped-def]
    server.add("bin_1.1", data)
    digest = Digest("md5", md5 or hashlib.md5(data).hexdigest())
    return Release(
        parse_version("1.1"), (Artifact(Role.BIN, server.url("bin_1.1"), digest, size=size),)
    )


def test_the_artifact_check_passes_the_right_bytes(artifact_server: ArtifactServer) -> None:
    ArtifactCheck().check(release_of(artifact_server, b"x" * 100_000))


@pytest.mark.parametrize(
    ("setup", "expected"),
    [
        ("404", "answered HTTP 404, not 200"),
        ("wrong md5", "md5 is "),
        ("too large", "more than 1000 bytes"),
        ("wrong size", "100000 bytes, the release says 99"),
        ("slow", "not fetched within 0.5 s"),
        ("unreachable", "could not be fetched: ConnectError"),
    ],
)
def test_the_artifact_check_refuses_naming_the_url_and_what_it_got(
    artifact_server: ArtifactServer, setup: str, expected: str
) -> None:
    data = b"x" * 100_000
    check = ArtifactCheck(deadline_s=0.5)
    if setup == "404":
        release = release_of(artifact_server, data)
        artifact_server.remove("bin_1.1")
    elif setup == "wrong md5":
        release = release_of(artifact_server, data, md5="0" * 32)
    elif setup == "too large":
        release, check = release_of(artifact_server, data), ArtifactCheck(max_bytes=1000)
    elif setup == "wrong size":
        release = release_of(artifact_server, data, size=99)
        expected = "more than 99 bytes (the release's size)"
    elif setup == "slow":
        release = release_of(artifact_server, data)
        artifact_server.set_fault("bin_1.1", Fault(trickle_bytes_per_s=20_000))
    else:
        release = release_of(artifact_server, data)
        artifact_server.stop()
    with pytest.raises(ArtifactUnavailable) as caught:
        check.check(release)
    assert caught.value.url in str(caught.value) and expected in str(caught.value)


def test_a_refused_publish_publishes_nothing(artifact_server: ArtifactServer) -> None:
    store = MemoryStore()
    plane = ControlPlane(store, PlaneConfig(task_cache_s=0, artifact_check=ArtifactCheck()))
    body = {"wgeturl": artifact_server.url("gone"), "version": "1.1", "binfile_md5": "0" * 32}
    with pytest.raises(FieldError) as caught:
        plane.commands.publish_seed(body)
    assert caught.value.field == "wgeturl" and "answered HTTP 404" in str(caught.value)
    url = artifact_server.url("gone/bin_1.1")
    rollout = {
        "release": {
            "version": "1.1",
            "artifacts": {"bin": {"url": url, "digest": "md5:" + "0" * 32}},
        },
        "plan": {"waves": [{"percent": 100}]},
    }
    with pytest.raises(FieldError) as caught:
        plane.commands.publish_rollout(rollout)
    assert caught.value.field == "release" and url in str(caught.value)
    assert store.active_id() is None and store.tasks() == []


def test_with_the_check_off_each_publish_says_so(caplog: pytest.LogCaptureFixture) -> None:
    plane = ControlPlane(MemoryStore(), PlaneConfig(task_cache_s=0))
    with caplog.at_level(logging.WARNING, "selfupgrade.server"):
        plane.commands.publish(task())
        plane.commands.publish(task("1.2", task_id="t2"))
    assert caplog.text.count("were not checked (the artifact check is off)") == 2


def test_a_failed_recheck_pauses_the_rollout_with_the_reason(
    artifact_server: ArtifactServer,
) -> None:
    clock = Clock()
    store = MemoryStore()
    config = PlaneConfig(task_cache_s=0, artifact_check=ArtifactCheck(), artifact_recheck_s=30)
    plane = ControlPlane(store, config, clock=clock)
    release = release_of(artifact_server, b"program")
    send(plane, beat("a"))
    send(plane, beat("b"))
    plane.commands.publish(replace(task(limit=1), release=release))
    assert send(plane, beat("a")) is not None
    plane.tick()
    clock.now += 10
    artifact_server.remove("bin_1.1")
    plane.tick()  # not due yet
    assert store.rollout("t1", clock.now).status == "active"
    clock.now += 30
    plane.tick()
    r = store.rollout("t1", clock.now)
    assert r.status == "paused"
    assert "artifact check failed" in r.halt_reason and "answered HTTP 404" in r.halt_reason
    assert send(plane, beat("b")) is None  # nobody is ordered


# ---- cancel keeps the limit -----------------------------------------------------------------


def test_a_host_done_with_the_cancelled_rollout_gives_its_slot_back_when_it_reports() -> None:
    clock = Clock()
    store = MemoryStore()
    plane = ControlPlane(store, PlaneConfig(task_cache_s=0), clock=clock)
    plane.commands.publish(task(limit=1, lease_s=60))
    assert send(plane, beat("a"))
    plane.commands.cancel()
    plane.commands.publish(task("1.2", limit=1, task_id="t2"))
    assert send(plane, beat("b")) is None  # a's slot still counts
    assert send(plane, beat("a", state=S.DOWNLOADING)) is None  # still at it
    assert store.rollout("t1", clock.now).in_flight == 1
    clock.now += 1  # past the plane's "every slot is held" memo
    assert send(plane, beat("a", "1.1")) is not None  # done with t1: its slot moves to t2
    assert store.rollout("t1", clock.now).in_flight == 0
    assert store.rollout("t2", clock.now).in_flight == 1


# ---- silence behind a network partition ------------------------------------------------------


def _fleet_on_old(clock: Clock, plane: ControlPlane, hosts: list[str]) -> None:
    for _ in range(3):  # three beats 5 s apart: an interval of 5 s for each
        plane.answer([legacy(h, process=f"{h}/1") for h in hosts])
        clock.now += 5


@pytest.mark.parametrize("cut_off", [0, 4])
def test_slot_holders_silent_alone_fail_and_silent_with_others_keep_their_slot(
    cut_off: int, caplog: pytest.LogCaptureFixture
) -> None:
    """Ten hosts, three slots. The three ordered go silent. Alone (the seven others beat on:
    bricked by their order), each fails its attempt after its grace. With four slotless
    hosts silent too (a network partition), their leases are renewed instead, the slots
    stay held (no fourth host is ordered) and nothing fails; when the partition heals they
    finish."""
    clock = Clock()
    store = MemoryStore()
    plane = ControlPlane(store, PlaneConfig(task_cache_s=0), clock=clock)
    hosts = [f"h{i}" for i in range(10)]
    _fleet_on_old(clock, plane, hosts)
    plane.commands.publish(task(limit=3, lease_s=180))
    ordered_hosts = [h for h in hosts if send(plane, legacy(h, process=f"{h}/1")) is not None]
    assert len(ordered_hosts) == 3
    others = [h for h in hosts if h not in ordered_hosts]
    beating = others[cut_off:]  # the first cut_off of them are silent from now on
    for _ in range(60):  # 60 s: past the grace (3 x 5 + 30 = 45 s), hbs ticking every second
        clock.now += 1
        if int(clock.now) % 5 == 0:
            orders = [plane.answer([legacy(h, process=f"{h}/1")])[0].order for h in beating]
            assert all(o is None for o in orders) or cut_off == 0
        plane.tick()
    states = {h: progress(store, "t1", h).state for h in ordered_hosts}  # type: ignore[union-attr]
    failures = store.rollout("t1", clock.now).failures
    print(f"{cut_off} slotless hosts silent too: {states}, failures {failures}")
    if cut_off == 0:
        assert set(states.values()) == {"backoff"} and failures >= 3  # then others' turn
        return
    assert set(states.values()) == {"admitted"} and failures == 0
    assert "a network partition?" in caplog.text
    for h in ordered_hosts:  # the partition heals: each restarted into 1.1
        plane.answer([legacy(h, "1.1", process=f"{h}/2")])
    assert all(progress(store, "t1", h).state == "done" for h in ordered_hosts)  # type: ignore[union-attr]
