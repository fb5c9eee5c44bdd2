"""Issue 15, point 4: server-paced check-ins. The rule (selfupgrade.server.pacing) case by
case, the plane's replies, the lost rule for hosts that beat rarely, the reply on the wire
of a real hbs and the library's agent obeying it within its bounds, and the simulator's
fleet-wide comparison with fixed intervals (bench/simulator.py has the 100,000-host one)."""

from __future__ import annotations

import logging
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from selfupgrade import HttpTransport, UpdaterConfig
from selfupgrade.policy import paced_interval
from selfupgrade.server import ControlPlane, MemoryStore, PlaneConfig
from selfupgrade.server.pacing import Pacer, Pacing
from selfupgrade.server.rules import Action, is_lost
from selfupgrade.server.tasks import HostProgress, HostRead, HostState, RolloutState
from selfupgrade.testing.simulator import FleetSimulator, SimConfig, three_waves

from .fleet import Hbs
from .server_helpers import beat, task

PACING = Pacing(rarely_s=600.0, idle_s=200.0, jitter=0.2, headroom=4.0, window_s=300.0)


def state(wave: int = 0, *, members: tuple[int, ...] = (10, 10), **kw: Any) -> RolloutState:
    counters = {f"w{k}:members": n for k, n in enumerate(members)}
    counters.update(kw.pop("counters", {}))
    return RolloutState(wave=wave, counters=counters, **kw)


def pacer_with_turnover(per_s: float) -> Pacer:
    pacer = Pacer(PACING)
    pacer.observe("t1", state(counters={"done": 0}), 0.0)
    pacer.observe("t1", state(counters={"done": int(per_s * 100)}), 100.0)
    return pacer


def test_hosts_with_nothing_to_do_soon_are_asked_to_beat_rarely_spread_by_the_jitter() -> None:
    pacer = Pacer(PACING)
    waiting = HostRead("h", None, 1)
    done = HostRead("h", HostProgress("h", HostState.DONE), 0)
    for rollout, read, action, wait in (
        (None, None, Action.NOTHING, 200.0),  # no rollout: idle_s
        (state(status="paused"), waiting, Action.NOTHING, 200.0),
        (state(status="complete"), done, Action.NOTHING, 200.0),
        (state(members=(1, 1, 10)), HostRead("h", None, 2), Action.NOTHING, 600.0),  # wave 3
        (state(), done, Action.NOTHING, 600.0),  # done: rarely_s
        (state(), waiting, Action.COMPLETE, 600.0),  # done with this heartbeat
    ):
        low = pacer.advise(rollout, read, action, False, 0.0)
        high = pacer.advise(rollout, read, action, False, 0.999999)
        assert (low, high) == (wait * 0.8, wait * 1.2), (rollout, read, action)


def test_a_host_working_on_an_order_or_failing_one_keeps_its_own_pace() -> None:
    pacer = pacer_with_turnover(1.0)
    member = HostRead("h", None, 0)
    assert pacer.advise(state(), member, Action.ADMIT, True, 0.5) is None  # ordered now
    for action in (Action.RENEW, Action.RESEND, Action.WAIT, Action.FAIL):
        assert pacer.advise(state(), member, action, False, 0.5) is None, action


def test_hosts_waiting_for_a_slot_come_back_headroom_times_faster_than_slots_free() -> None:
    member = HostRead("h", None, 0)
    full = state(members=(1000, 10), in_flight=100, counters={"w0:done": 100})
    # unknown rate (no host of this wave finished yet): the host's own pace
    assert Pacer(PACING).advise(full, member, Action.ADMIT, False, 0.5) is None
    # 800 waiting, 2 slots free per second, headroom 4: 100 s, spread ±20%
    pacer = pacer_with_turnover(2.0)
    assert pacer.turnover() == pytest.approx(2.0)
    assert pacer.advise(full, member, Action.ADMIT, False, 0.5) == pytest.approx(100.0)
    assert pacer.advise(full, member, Action.NOTHING, False, 0.0) == pytest.approx(80.0)
    # a long queue is capped at rarely_s; a short one is the host's own pace
    long = state(members=(100_000, 10), in_flight=100)
    assert pacer.advise(long, member, Action.ADMIT, False, 0.5) == 600.0
    short = state(members=(105, 10), in_flight=100)
    assert pacer.advise(short, member, Action.ADMIT, False, 0.5) is None


def test_the_rate_counts_from_the_first_finished_host_and_starts_again_with_each_wave() -> None:
    pacer = Pacer(PACING)
    for now, done in ((0, 0), (20, 0), (40, 0), (60, 200), (80, 200), (100, 400)):
        pacer.observe("t1", state(counters={"done": done}), float(now))
    assert pacer.turnover() == pytest.approx(400 / 60)  # from 40 s, not from the wave's start
    pacer.observe("t1", state(counters={"done": 430}), 101.0)  # too soon: not a sample
    assert pacer.turnover() == pytest.approx(400 / 60)
    for now in range(120, 460, 20):  # the window moves on: 300 s without a finished host
        pacer.observe("t1", state(counters={"done": 430}), float(now))
    assert pacer.turnover() == 0.0
    pacer.observe("t1", state(counters={"done": 530}), 480.0)
    assert pacer.turnover() == pytest.approx(100 / 40)  # from the last sample before it
    pacer.observe("t1", state(1, counters={"done": 530}), 500.0)
    assert pacer.turnover() == 0.0  # a new wave: not known yet


def test_hosts_of_the_next_wave_meet_its_start() -> None:
    nxt = HostRead("h", None, 1)
    pacer = pacer_with_turnover(2.0)
    # the current wave bakes until 1000 + 300: come at 1300 at the earliest, at most 20% later
    baking = state(wave_done_at=1000.0)
    early = pacer.advise(baking, nxt, Action.NOTHING, False, 0.0, bake_s=300.0, now=1100.0)
    late = pacer.advise(baking, nxt, Action.NOTHING, False, 0.999, bake_s=300.0, now=1100.0)
    assert early == pytest.approx(200.0) and late == pytest.approx(240.0, abs=0.1)
    # still going: 10 waiting and 5 upgrading at 2 per second, then a 300 s bake: half
    going = state(members=(20, 10), in_flight=5, counters={"w0:done": 5})
    assert pacer.turnover() == pytest.approx(2.0)
    wait = pacer.advise(going, nxt, Action.NOTHING, False, 0.5, bake_s=300.0, now=0.0)
    assert wait == pytest.approx(((10 + 5) / 2.0 + 300.0) / 2, abs=0.1)
    # not known yet: half the bake, at least
    fresh = Pacer(PACING).advise(going, nxt, Action.NOTHING, False, 0.5, bake_s=300.0, now=0.0)
    assert fresh == pytest.approx(150.0)


@pytest.mark.parametrize(
    "bad",
    [
        {"rarely_s": 0},
        {"rarely_s": math.nan},
        {"idle_s": -1},
        {"headroom": -1},
        {"jitter": 1.0},
        {"window_s": 0},
    ],
)
def test_bad_pacing_settings_are_refused_by_name(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        Pacing(**bad)


def test_the_plane_says_when_to_beat_next_only_when_it_paces() -> None:
    plain = ControlPlane(MemoryStore(), PlaneConfig(task_cache_s=0))
    assert plain.answer([beat("a")])[0].next_beat_s is None
    paced = ControlPlane(
        MemoryStore(), PlaneConfig(task_cache_s=0, pacing=PACING), uniform=lambda: 0.5
    )
    assert paced.answer([beat("a")])[0].next_beat_s == 200.0  # no rollout: idle_s
    paced.commands.publish(task(limit=1))
    first, second = paced.answer([beat("a"), beat("b")])
    assert first.order is not None and first.next_beat_s is None  # ordered: its own pace
    assert second.order is None and second.next_beat_s is None  # waiting, rate not known


def test_a_host_is_lost_only_after_several_of_its_own_intervals() -> None:
    t = task(lease_s=300)  # lost after 3 leases: 900 s of silence
    assert is_lost(t, 0.0, 1000.0, 3)
    assert not is_lost(t, 0.0, 1000.0, 3, interval_s=600.0)  # paced to 600 s: 1800 s
    assert is_lost(t, 0.0, 1900.0, 3, interval_s=600.0)


def test_the_agents_bounds_hold_whatever_the_server_asks() -> None:
    assert paced_interval(600.0, 60.0, None) == 600.0
    assert paced_interval(5.0, 60.0, None) == 60.0  # never faster than its own interval
    assert paced_interval(1e6, 60.0, None) == 900.0  # 15 intervals at most by default
    assert paced_interval(1e6, 60.0, 120.0) == 120.0
    with pytest.raises(ValueError, match="paced_max_s"):
        UpdaterConfig(host="h", interval_s=60.0, paced_max_s=30.0)


@pytest.mark.real
def test_a_real_hbs_paces_and_the_librarys_transport_and_updater_follow(tmp_path: Path) -> None:
    """Real hbs processes (with and without ``--pace-rarely-s``) over real HTTP; the
    library's HttpTransport reads the advice and an Updater's next wait obeys it."""
    from selfupgrade import Layout, TripleInstaller, Updater
    from selfupgrade.testing import TOY_FILES, FakeRestarter

    seen = {}
    for pace in (0, 40):
        with Hbs(
            f"sqlite:{tmp_path / f'{pace}.db'}",
            tmp_path / "hbs.log",
            pace_rarely_s=pace,
            pace_idle_s=40,
        ) as h:
            transport = HttpTransport(f"{h.url}/selfupgrade/v1/heartbeat")
            updater = Updater(
                version="1.0",
                layout=Layout(tmp_path / f"opt{pace}", TOY_FILES),
                transport=transport,
                installer=TripleInstaller(tmp_path / f"state{pace}"),
                restarter=FakeRestarter(),
                config=UpdaterConfig(host="real-1", interval_s=10.0, jitter=0.0),
            )
            raw = httpx.post(
                f"{h.url}/selfupgrade/v1/heartbeat",
                json=beat("real-2").to_wire(),
                timeout=10,
                trust_env=False,
            ).json()
            seen[pace] = (raw, updater.tick(), transport.next_beat_s)
            transport.close()
            said = "check-ins paced (rarely 40s, idle 40s)" if pace else "at the hosts' own pace"
            assert said in h.log()
    raw, wait, asked = seen[0]
    assert raw == {"order": None} and asked is None and wait == 10.0
    raw, wait, asked = seen[40]
    print(f"paced hbs: {raw}; the updater waits {wait} s (asked {asked} s)")
    assert raw["order"] is None and 32.0 <= raw["next_beat_s"] <= 48.0
    assert asked is not None and 32.0 <= asked <= 48.0 and wait == asked


class _Replies(BaseHTTPRequestHandler):
    body = b""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize("value", ["-5", "0", '"soon"', "true", "1e999"])
def test_a_next_beat_s_that_is_not_a_positive_number_is_ignored_with_a_warning(
    value: str, caplog: pytest.LogCaptureFixture
) -> None:
    _Replies.body = f'{{"order": null, "next_beat_s": {value}}}'.encode()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Replies)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        transport = HttpTransport(f"http://127.0.0.1:{server.server_address[1]}/hb")
        with caplog.at_level(logging.WARNING, "selfupgrade"):
            assert transport.heartbeat(beat("h")) is None
        transport.close()
    finally:
        server.shutdown()
        server.server_close()
    assert transport.next_beat_s is None
    assert "next_beat_s" in caplog.text and "not a positive number" in caplog.text


def test_a_paced_fleet_beats_far_less_for_about_the_same_rollout() -> None:
    """10,000 simulated hosts, three waves, the same seed: fixed 60 s against paced."""
    base = SimConfig(hosts=10_000, plan=three_waves(1000, bake_s=300))
    fixed = FleetSimulator(base).run()
    paced = FleetSimulator(SimConfig(**{**base.__dict__, "pacing": Pacing()})).run()
    print(f"fixed: {fixed.summary()}\npaced: {paced.summary()}")
    assert fixed.status == paced.status == "complete"
    assert fixed.per_host_hour == pytest.approx(60.0, rel=0.01)
    assert paced.per_host_hour < fixed.per_host_hour / 3
    assert paced.done >= fixed.done - 20
    # 5% longer at most, and the canary's first check-in after the publish, which comes up
    # to idle_s (+20%) later than at a fixed 60 s
    assert paced.duration_s <= fixed.duration_s * 1.05 + Pacing().idle_s * 1.2
