"""Issue 14, point 4: the example HTTP daemon (``examples/http_daemon``) upgrades 20 times in a
row under a bounded load (200 requests/s, half on keep-alive connections, half on a new
connection each) with 0 refused connections and 0 failed requests per upgrade: by ``execv``
(under the guard's restart harness, and under a real supervisord), by an overlap (on its own,
and under a real systemd), and under a real systemd with its socket unit and with its
file-descriptor store. A release that exits before it is ready leaves the old version serving
(overlap, systemd's socket) with 0 failed requests as well. The same upgrades without a
hand-off refuse connections: the reference, and the proof that the checks can fail.

Each upgrade is a real one: an order from a control server on 127.0.0.1, a download from an
artifact server, the triple installer, the restart, the guard, the confirmation. The ways and
their process managers are :data:`examples.http_daemon.drive.WAYS`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from examples.http_daemon import PROGRAM, release
from examples.http_daemon.drive import HOST, WAYS, releases, running, upgrade_under_load
from selfupgrade import UpgradeState
from selfupgrade.testing import ArtifactServer, ControlServer, free_port
from selfupgrade.testing.load import HttpLoad, LoadReport
from selfupgrade.testing.toy import ToyRelease

from .conftest import host_python

pytestmark = pytest.mark.real

UPGRADES = 20
UNDER_SYSTEMD = [w for w, (_, manager) in WAYS.items() if manager == "systemd"]
ELSEWHERE = [
    w for w, (handoff, manager) in WAYS.items() if manager != "systemd" and handoff != "none"
]


@pytest.fixture
def servers() -> Iterator[tuple[ControlServer, ArtifactServer]]:
    with ControlServer() as control, ArtifactServer() as files:
        yield control, files


def check(reports: list[LoadReport], way: str) -> None:
    for i, report in enumerate(reports, 1):
        print(f"{way} upgrade {i:2d}: {report.summary()} {dict(report.errors)}")
    total = LoadReport([r for report in reports for r in report.requests])
    print(f"{way}: {len(reports)} upgrades, {total.summary()}")
    assert len(reports) == UPGRADES
    assert all(r.refused == 0 and r.failed == 0 for r in reports), [
        (r.refused, r.failed, dict(r.errors)) for r in reports
    ]
    assert all(r.answered > 50 for r in reports)
    last = reports[-1].bodies
    assert any(body.startswith(f"1.{UPGRADES} ") for body in last), last


def answering_pids(reports: list[LoadReport]) -> set[str]:
    return {body.split()[1] for r in reports for body in r.bodies}


@pytest.mark.parametrize("way", ELSEWHERE)
def test_twenty_upgrades_refuse_no_connection_and_fail_no_request(
    tmp_path: Path, servers: tuple[ControlServer, ArtifactServer], way: str
) -> None:
    control, files = servers
    versions = releases(UPGRADES)
    port = free_port()
    with running(way, tmp_path, control, versions[0], port) as httpd:
        done = upgrade_under_load(control, files, port, versions, httpd.log)
    print(f"at rest: {done.at_rest.summary()}")
    check(done.each, way)
    pids = answering_pids(done.each)
    if WAYS[way][0] == "exec":
        assert len(pids) == 1, pids  # the same process, exec'd 20 times
    else:
        assert len(pids) == UPGRADES + 1, pids  # a new process each time


@pytest.mark.parametrize("way", UNDER_SYSTEMD)
def test_twenty_upgrades_under_real_systemd_refuse_no_connection_and_fail_no_request(
    systemd: Any, place: Path, servers: tuple[ControlServer, ArtifactServer], way: str
) -> None:
    """The shipped httpd.service (and httpd.socket for the socket way), with the drop-in of
    examples.http_daemon.drive for what the namespace cannot honour."""
    control, files = servers
    versions = releases(UPGRADES, host_python())
    port = free_port()
    with running(way, place, control, versions[0], port, systemd) as httpd:
        done = upgrade_under_load(
            control, files, port, versions, httpd.log, restarts_unit=httpd.restarts_unit
        )
        state = httpd.unit()
    print(f"at rest: {done.at_rest.summary()}; unit {state}")
    check(done.each, f"{way} under systemd")
    assert state["ActiveState"] == "active" and state["StatusText"] == f"httpd 1.{UPGRADES}"
    if way == "overlap-systemd":  # no restart: systemd was told each new main PID
        assert int(state["NRestarts"]) == 0
        assert len(answering_pids(done.each)) == UPGRADES + 1
    else:
        assert int(state["NRestarts"]) >= UPGRADES


def under_a_bad_release(
    control: ControlServer,
    files: ArtifactServer,
    port: int,
    old: ToyRelease,
    bad: ToyRelease,
    on_failure: Callable[[], str],
) -> LoadReport:
    """Publish ``bad`` under load; wait until the daemon reports it failed, and 3 s more;
    the load's report from the publish on."""
    control.wait_for_version(HOST, old.version, timeout_s=60)
    for name, data in bad.files.items():
        files.add(bad.artifact_name(name), data)
    with HttpLoad(port, rate=200, keep_alive=0.5, workers=8) as load:
        time.sleep(0.5)
        started = time.monotonic()
        control.publish(bad.order(files.base_url))
        try:
            beats = control.wait_for(
                lambda bs: any(
                    b.host == HOST
                    and str(b.failed_version) == bad.version
                    and b.state in (UpgradeState.FAILED, UpgradeState.ROLLED_BACK)
                    for b in bs
                ),
                timeout_s=90,
            )
        except Exception as exc:
            raise AssertionError(f"no failure reported: {exc}\n{on_failure()}") from exc
        control.publish(None)
        time.sleep(3)
        report = load.report(since=started)
    failed = next(b for b in reversed(beats) if str(b.failed_version) == bad.version)
    print(
        f"{bad.version} exits before ready: {failed.state.value} ({failed.error}); "
        f"under load: {report.summary()}; answered by {sorted(report.bodies)}"
    )
    return report


def publish_a_bad_release(
    control: ControlServer,
    files: ArtifactServer,
    port: int,
    old: ToyRelease,
    bad: ToyRelease,
    on_failure: Callable[[], str],
) -> LoadReport:
    """:func:`under_a_bad_release`, then: nothing refused or failed, only ``old`` answered."""
    report = under_a_bad_release(control, files, port, old, bad, on_failure)
    assert report.refused == 0 and report.failed == 0, dict(report.errors)
    assert {body.split()[0] for body in report.bodies} == {old.version}
    return report


def test_a_release_that_exits_before_ready_leaves_the_old_one_serving(
    tmp_path: Path, servers: tuple[ControlServer, ArtifactServer]
) -> None:
    """Overlap on its own: the old process never stops serving; the old files are back."""
    control, files = servers
    old, bad = release("1.0"), release("1.1", starts=False)
    port = free_port()
    with running("overlap", tmp_path, control, old, port) as httpd:
        publish_a_bad_release(control, files, port, old, bad, httpd.log)
    assert (tmp_path / "opt" / PROGRAM).read_bytes() == next(iter(old.files.values()))


@pytest.mark.parametrize("way", ["systemd-socket", "overlap-systemd"])
def test_a_release_that_exits_before_ready_under_real_systemd_fails_no_request(
    systemd: Any, place: Path, servers: tuple[ControlServer, ArtifactServer], way: str
) -> None:
    """Overlap: the old process serves on. systemd's socket: the old one has left, the new
    one exits, the guard rolls it back at a later start, and meanwhile the connections wait
    in the socket's backlog: late answers, none refused or failed."""
    control, files = servers
    python = host_python()
    old, bad = release("1.0", python=python), release("1.1", python=python, starts=False)
    port = free_port()
    with running(way, place, control, old, port, systemd) as httpd:
        publish_a_bad_release(control, files, port, old, bad, httpd.log)
        state = httpd.unit()
    print(f"{way}: unit {state}")
    assert state["ActiveState"] == "active" and state["StatusText"] == "httpd 1.0"
    assert (place / "opt" / PROGRAM).read_bytes() == next(iter(old.files.values()))


def test_by_exec_a_release_that_exits_before_ready_is_rolled_back_but_refuses_meanwhile(
    tmp_path: Path, servers: tuple[ControlServer, ArtifactServer]
) -> None:
    """The limit of the exec way, measured: the new version exits with the PID, the socket
    with it; the guard's harness restarts the process and the guard rolls the release back,
    and until the old version listens again connections are refused. (The overlap serves on:
    the test above.)"""
    control, files = servers
    old, bad = release("1.0"), release("1.1", starts=False)
    port = free_port()
    with running("exec", tmp_path, control, old, port) as httpd:
        report = under_a_bad_release(control, files, port, old, bad, httpd.log)
        log = httpd.log()
    print(f"exec, 1.1 exits before ready: rolled back; under load: {report.summary()}")
    assert (tmp_path / "opt" / PROGRAM).read_bytes() == next(iter(old.files.values())), log
    assert report.refused > 0  # what the overlap avoids
    assert {body.split()[0] for body in report.bodies} == {old.version}


def test_without_a_hand_off_upgrades_refuse_connections(
    tmp_path: Path, servers: tuple[ControlServer, ArtifactServer]
) -> None:
    """The reference: the same daemon and load, an exec that closes the socket and binds it
    again. What the checks above would see without a hand-off."""
    control, files = servers
    versions = releases(3)
    port = free_port()
    with running("none", tmp_path, control, versions[0], port) as httpd:
        done = upgrade_under_load(control, files, port, versions, httpd.log)
    for i, report in enumerate(done.each, 1):
        print(f"no hand-off, upgrade {i}: {report.summary()} {dict(report.errors)}")
    assert all(r.refused > 0 for r in done.each)
