"""The Updater with the shipped fakes: states, back-off, one upgrade at a time, the trial."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

from selfupgrade import (
    ConfirmPolicy,
    Heartbeat,
    Layout,
    Role,
    SelfUpgradeError,
    TripleInstaller,
    Updater,
    UpdaterConfig,
    UpgradeOrder,
    UpgradeState,
)
from selfupgrade.testing import (
    TOY_FILES,
    FakeFetcher,
    FakeRestarter,
    FakeTransport,
    toy_release,
)
from selfupgrade.transport.base import ByteSink

OLD = toy_release("1.0")
NEW = toy_release("1.1")
BASE = "http://127.0.0.1:9/files"


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def files(d: Path) -> dict[Role, bytes]:
    return {r: (d / n).read_bytes() for r, n in TOY_FILES.items()}


def served(release=NEW) -> dict[str, bytes]:  # type: ignore[no-untyped-def]
    return {f"{BASE}/{release.artifact_name(r)}": release.files[r] for r in Role}


def make(
    tmp: Path,
    *,
    version: str = "1.0",
    order=None,  # type: ignore[no-untyped-def]
    fetcher: object | None = None,
    health=None,  # type: ignore[no-untyped-def]
    clock: Clock | None = None,
    confirm: ConfirmPolicy | None = None,
) -> tuple[Updater, FakeTransport, FakeRestarter]:
    transport = FakeTransport(order)
    restarter = FakeRestarter()
    updater = Updater(
        version=version,
        layout=Layout(tmp / "opt", TOY_FILES),
        transport=transport,
        installer=TripleInstaller(tmp / "state"),
        restarter=restarter,
        config=UpdaterConfig(
            host="h1",
            interval_s=0.05,
            labels={"dc": "bj"},
            failure_backoff_s=60,
            confirm=confirm or ConfirmPolicy(max_starts=2, timeout_s=30),
        ),
        fetcher=fetcher or FakeFetcher(served()),  # type: ignore[arg-type]
        health_check=health,
        wall_clock=clock or Clock(),
    )
    return updater, transport, restarter


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    OLD.install(tmp_path / "opt")
    return tmp_path


def wait_idle(updater: Updater) -> None:
    deadline = time.monotonic() + 10
    while updater._busy.locked() and time.monotonic() < deadline:
        time.sleep(0.005)
    assert not updater._busy.locked()


def test_idle_heartbeat_reports_identity_and_file_digests(tmp: Path) -> None:
    updater, transport, _ = make(tmp)
    updater.on_start()
    updater.tick()
    beat = transport.beats[-1]
    assert (beat.host, str(beat.version), beat.state) == ("h1", "1.0", UpgradeState.IDLE)
    assert beat.labels == {"dc": "bj"}
    assert beat.files["cfg"]["sha256"] == OLD.digest(Role.CFG).hex
    assert beat.files["cfg"]["md5"] == OLD.digest(Role.CFG, "md5").hex
    assert "bin" not in beat.files
    assert beat.confirmed


def test_an_order_is_downloaded_installed_and_restarted(tmp: Path) -> None:
    updater, transport, restarter = make(tmp, order=NEW.order(BASE, task_id="t1"))
    updater.on_start()
    updater.tick()
    wait_idle(updater)
    assert restarter.restarts == 1
    assert files(tmp / "opt") == dict(NEW.files)
    assert updater.state == UpgradeState.RESTARTING
    assert transport.beats[-1].state == UpgradeState.RESTARTING  # the last word before leaving
    assert transport.beats[-1].task_id == "t1"
    status = TripleInstaller(tmp / "state").status()
    assert status.pending is not None and status.pending.version == "1.1"


def test_a_bad_digest_fails_reports_and_backs_off(tmp: Path) -> None:
    clock = Clock()
    bad = served()
    bad[f"{BASE}/bin_1.1"] = b"tampered"
    fetcher = FakeFetcher(bad)
    updater, transport, restarter = make(
        tmp, order=NEW.order(BASE, with_sizes=False), fetcher=fetcher, clock=clock
    )
    updater.on_start()
    updater.tick()
    wait_idle(updater)
    assert restarter.restarts == 0
    assert files(tmp / "opt") == dict(OLD.files)
    updater.tick()  # reports the failure, does not retry yet
    beat = transport.beats[-1]
    assert beat.state == UpgradeState.FAILED
    assert (
        beat.error is not None
        and "sha256 mismatch for http://127.0.0.1:9/files/bin_1.1" in beat.error
    )
    assert str(beat.failed_version) == "1.1"
    assert fetcher.fetched == [f"{BASE}/bin_1.1"]
    clock.now += 59
    updater.tick()
    wait_idle(updater)
    assert len(fetcher.fetched) == 1
    clock.now += 2  # past the 60 s back-off
    updater.tick()
    wait_idle(updater)
    assert len(fetcher.fetched) == 2
    assert not list((tmp / "opt").glob(".*.new"))


def test_never_two_upgrades_at_once(tmp: Path) -> None:
    release = threading.Event()

    class Slow(FakeFetcher):
        def fetch(self, url: str, sink: ByteSink, *, deadline: float, max_bytes: int) -> None:
            release.wait(10)
            super().fetch(url, sink, deadline=deadline, max_bytes=max_bytes)

    fetcher = Slow(served())
    updater, transport, restarter = make(tmp, order=NEW.order(BASE), fetcher=fetcher)
    updater.on_start()
    for _ in range(5):
        updater.tick()
    assert transport.beats[-1].state == UpgradeState.DOWNLOADING
    with pytest.raises(SelfUpgradeError, match="already running"):
        updater.upgrade(NEW.order(BASE))
    release.set()
    wait_idle(updater)
    assert fetcher.fetched.count(f"{BASE}/bin_1.1") == 1
    assert restarter.restarts == 1


def test_a_downgrade_is_refused_and_reported(tmp: Path) -> None:
    updater, transport, restarter = make(tmp, version="2.0", order=NEW.order(BASE))
    updater.on_start()
    updater.tick()
    updater.tick()
    assert transport.beats[-1].state == UpgradeState.FAILED
    assert "does not allow a downgrade" in (transport.beats[-1].error or "")
    assert restarter.restarts == 0


def test_an_allowed_downgrade_is_installed(tmp: Path) -> None:
    updater, _, restarter = make(tmp, version="2.0", order=NEW.order(BASE, allow_downgrade=True))
    updater.on_start()
    updater.tick()
    wait_idle(updater)
    assert restarter.restarts == 1


def test_the_new_version_confirms_after_its_first_heartbeat(tmp: Path) -> None:
    old, _, _ = make(tmp, order=NEW.order(BASE))
    old.on_start()
    old.tick()
    wait_idle(old)
    new, transport, _ = make(tmp, version="1.1", order=NEW.order(BASE))
    new.on_start()
    assert new.state == UpgradeState.CONFIRMING and new.on_trial
    assert new.heartbeat().confirmed is False
    new.tick()
    assert not new.on_trial
    assert transport.beats[-1].version == NEW.order(BASE).version
    assert new.heartbeat().confirmed
    last = TripleInstaller(tmp / "state").status().last_result
    assert last is not None and last.outcome == "confirmed"


def test_a_health_check_of_its_own_confirms_before_the_heartbeat_goes_out(tmp: Path) -> None:
    """A heartbeat that a partitioned network holds (for longer than the trial's deadline,
    under the real network test) does not keep a healthy new version from confirming: its
    own health check is asked before the heartbeat is sent, and the heartbeat says so."""
    old, _, _ = make(tmp, order=NEW.order(BASE))
    old.on_start()
    old.tick()
    wait_idle(old)
    new, transport, _ = make(tmp, version="1.1", health=lambda: True)
    confirmed_when_sent = []
    send = transport.heartbeat

    def held(beat):  # type: ignore[no-untyped-def]
        confirmed_when_sent.append(TripleInstaller(tmp / "state").status().pending is None)
        return send(beat)

    transport.heartbeat = held  # type: ignore[method-assign]
    new.on_start()
    assert new.on_trial
    new.tick()
    assert confirmed_when_sent == [True]
    assert transport.beats[-1].confirmed and not new.on_trial


def test_an_unhealthy_new_version_is_rolled_back_at_its_deadline(tmp: Path) -> None:
    clock = Clock()
    old, _, _ = make(tmp, order=NEW.order(BASE), clock=clock)
    old.on_start()
    old.tick()
    wait_idle(old)
    new, transport, restarter = make(tmp, version="1.1", health=lambda: False, clock=clock)
    new.on_start()
    new.tick()
    assert new.on_trial and restarter.restarts == 0
    clock.now += 31
    new.tick()
    assert restarter.restarts == 1
    assert files(tmp / "opt") == dict(OLD.files)
    # the restored 1.0 reports what happened
    back, transport, _ = make(tmp, version="1.0", order=NEW.order(BASE), clock=clock)
    back.on_start()
    back.tick()
    beat = transport.beats[-1]
    assert beat.state == UpgradeState.ROLLED_BACK
    assert str(beat.failed_version) == "1.1"
    assert "did not confirm its health within 30s" in (beat.error or "")
    assert not back._busy.locked()  # backing off: no new attempt right away


def test_a_health_check_that_raises_counts_as_unhealthy(tmp: Path) -> None:
    old, _, _ = make(tmp, order=NEW.order(BASE))
    old.on_start()
    old.tick()
    wait_idle(old)

    def boom() -> bool:
        raise RuntimeError("db down")

    new, _, _ = make(tmp, version="1.1", health=boom)
    new.on_start()
    new.tick()
    assert new.on_trial


def test_transport_failures_do_not_stop_the_thread(tmp: Path) -> None:
    updater, transport, restarter = make(tmp, order=NEW.order(BASE))
    transport.fail_with = RuntimeError("plug-in bug")
    updater.start()
    try:
        deadline = time.monotonic() + 5
        while len(transport.beats) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(transport.beats) >= 3
        transport.fail_with = None
        assert restarter.called.wait(5)
    finally:
        updater.stop()
    assert transport.closed


def test_asyncio_form_runs_without_blocking_the_loop(tmp: Path) -> None:
    """The first heartbeat blocks until the event loop has run 20 more steps: only possible if
    run() does its blocking work outside the loop (it would deadlock otherwise)."""
    beating = threading.Event()
    release = threading.Event()
    blocked: list[bool] = []

    class Blocking(FakeTransport):
        def heartbeat(self, beat: Heartbeat) -> UpgradeOrder | None:
            beating.set()
            if not release.wait(5):
                blocked.append(True)
                raise TimeoutError("the event loop was blocked")
            return super().heartbeat(beat)

    transport = Blocking(NEW.order(BASE))
    updater, _, restarter = make(tmp)
    updater._transport = transport

    async def main() -> None:
        task = asyncio.create_task(updater.run())
        while not beating.is_set():
            await asyncio.sleep(0.001)
        for _ in range(20):  # the daemon's own work keeps running during the heartbeat
            await asyncio.sleep(0)
        release.set()
        while restarter.restarts == 0:
            await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(asyncio.wait_for(main(), 20))
    assert blocked == [], "the heartbeat blocked the event loop"
    assert restarter.restarts == 1
    assert transport.closed


def test_a_program_that_does_not_report_its_released_version_is_rolled_back(tmp: Path) -> None:
    old, _, _ = make(tmp, order=NEW.order(BASE))
    old.on_start()
    old.tick()
    wait_idle(old)  # 1.1 installed, restarting
    mislabelled, _, restarter = make(tmp, version="1.0")  # the "1.1" program says 1.0
    mislabelled.on_start()
    assert restarter.restarts == 1
    assert files(tmp / "opt") == dict(OLD.files)
    last = TripleInstaller(tmp / "state").status().last_result
    assert last is not None and last.outcome == "rolled_back"
    assert "installed as 1.1 reports version 1.0" in last.reason
