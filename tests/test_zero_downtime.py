"""Issue 14, point 4: the example HTTP daemon (``examples/http_daemon``) upgrades 20 times in a
row under a bounded load (200 requests/s, half on keep-alive connections, half on a new
connection each) with 0 refused connections and 0 failed requests per upgrade: by ``execv``
(under the guard's restart harness, and under a real supervisord), by an overlap (on its own,
and under a real systemd), and under a real systemd with its socket unit and with its
file-descriptor store. A release that exits before it is ready leaves the old version serving
(overlap, systemd's socket) with 0 failed requests as well. The same upgrades without a
hand-off refuse connections and fail requests: the reference, and the proof that the checks
can fail.

Each upgrade is a real one: an order from a control server on 127.0.0.1, a download from an
artifact server, the triple installer, the restart, the guard, the confirmation.
"""

from __future__ import annotations

import contextlib
import os
import site
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest

from examples.http_daemon import PROGRAM, release
from selfupgrade import UpgradeState
from selfupgrade.guard import guard_command
from selfupgrade.testing import (
    ArtifactServer,
    ControlServer,
    ServiceHarness,
    Supervisord,
    free_port,
    new_mark,
    stop_marked,
    with_mark,
)
from selfupgrade.testing.load import HttpLoad, LoadReport
from selfupgrade.testing.toy import ToyRelease

from .conftest import host_python

pytestmark = pytest.mark.real

UPGRADES = 20
HOST = "httpd-1"
PACE_S = 2.2
"""At least this long between two restarts: systemd's default StartLimitBurst is 5 starts in
10 s, and upgrades count."""


def httpd_args(port: int, control: ControlServer, state: Path, handoff: str) -> list[str]:
    return [
        "--listen",
        f"127.0.0.1:{port}",
        "--control",
        control.url,
        "--state",
        str(state),
        "--handoff",
        handoff,
        "--host",
        HOST,
        "--interval",
        "0.2",
    ]


def upgrade_under_load(
    control: ControlServer,
    files: ArtifactServer,
    port: int,
    versions: list[ToyRelease],
    on_failure: Callable[[], str],
) -> list[LoadReport]:
    """With the daemon on ``versions[0]`` answering on ``port``: upgrade it to each next one
    under load; the load's report of each upgrade (from the order to the confirmation)."""
    control.wait_for_version(HOST, versions[0].version, timeout_s=60)
    reports = []
    with HttpLoad(port, rate=200, keep_alive=0.5, workers=8) as load:
        time.sleep(1.0)
        at_rest = load.report(since=time.monotonic() - 0.9)
        for new in versions[1:]:
            for name, data in new.files.items():
                files.add(new.artifact_name(name), data)
            started = time.monotonic()
            control.publish(new.order(files.base_url))
            try:
                control.wait_for_version(HOST, new.version, timeout_s=60)
            except Exception as exc:
                raise AssertionError(f"{new.version} not confirmed: {exc}\n{on_failure()}") from exc
            control.publish(None)
            time.sleep(max(0.3, PACE_S - (time.monotonic() - started)))
            reports.append(load.report(since=started, until=time.monotonic()))
    print(f"at rest: {at_rest.summary()}")
    return reports


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


def releases(python: str | None = None) -> list[ToyRelease]:
    return [release(f"1.{i}", python=python) for i in range(UPGRADES + 1)]


@pytest.fixture
def control_files() -> Iterator[tuple[ControlServer, ArtifactServer]]:
    with ControlServer() as control, ArtifactServer() as files:
        yield control, files


@pytest.mark.parametrize("manager", ["guard-harness", "supervisord"])
def test_twenty_execs_refuse_no_connection_and_fail_no_request(
    tmp_path: Path, control_files: tuple[ControlServer, ArtifactServer], manager: str
) -> None:
    control, files = control_files
    versions = releases()
    install, state = tmp_path / "opt", tmp_path / "state"
    versions[0].install(install)
    port = free_port()
    argv = guard_command(state, [str(install / PROGRAM), *httpd_args(port, control, state, "exec")])
    log = tmp_path / "httpd.log"
    runner: AbstractContextManager[object]
    if manager == "supervisord":
        sup = Supervisord(tmp_path / "supervisor")
        sup.add_program("httpd", argv, autorestart=True)
        runner = sup
        log = sup.workdir  # its child logs are there
    else:
        runner = ServiceHarness(argv, log_path=log)
    with runner:
        reports = upgrade_under_load(control, files, port, versions, lambda: _tail(log))
    check(reports, f"exec under {manager}")


@contextlib.contextmanager
def on_its_own(argv: list[str], log: Path) -> Iterator[None]:
    """Run ``argv`` under no process manager (its PID changes with an overlap); stop every
    process it leads to, by the mark they carry."""
    mark = new_mark()
    with log.open("ab") as out:
        first = subprocess.Popen(
            argv, env=with_mark(dict(os.environ), mark), stdout=out, stderr=subprocess.STDOUT
        )
    try:
        yield
    finally:
        left = stop_marked(mark)
        first.wait(10)
        assert left == [], f"left running: {left}"


def test_twenty_overlaps_refuse_no_connection_and_fail_no_request(
    tmp_path: Path, control_files: tuple[ControlServer, ArtifactServer]
) -> None:
    control, files = control_files
    versions = releases()
    install, state = tmp_path / "opt", tmp_path / "state"
    versions[0].install(install)
    port = free_port()
    log = tmp_path / "httpd.log"
    argv = guard_command(
        state, [str(install / PROGRAM), *httpd_args(port, control, state, "overlap")]
    )
    with on_its_own(argv, log):
        reports = upgrade_under_load(control, files, port, versions, lambda: _tail(log))
    check(reports, "overlap on its own")
    pids = {body.split()[1] for r in reports for body in r.bodies}
    assert len(pids) == UPGRADES + 1, pids  # a new process each time


def test_a_release_that_exits_before_ready_leaves_the_old_one_serving(
    tmp_path: Path, control_files: tuple[ControlServer, ArtifactServer]
) -> None:
    """Overlap on its own: the old process never stops serving; the old files are back."""
    control, files = control_files
    old, bad = release("1.0"), release("1.1", starts=False)
    install, state = tmp_path / "opt", tmp_path / "state"
    old.install(install)
    port = free_port()
    log = tmp_path / "httpd.log"
    argv = guard_command(
        state, [str(install / PROGRAM), *httpd_args(port, control, state, "overlap")]
    )
    with on_its_own(argv, log):
        publish_a_bad_release(control, files, port, old, bad, lambda: _tail(log))
    assert (install / PROGRAM).read_bytes() == old.files[next(iter(old.files))]


def publish_a_bad_release(
    control: ControlServer,
    files: ArtifactServer,
    port: int,
    old: ToyRelease,
    bad: ToyRelease,
    on_failure: Callable[[], str],
) -> LoadReport:
    """Publish ``bad`` under load; wait until the daemon reports it failed, and 3 s more."""
    control.wait_for_version(HOST, old.version, timeout_s=60)
    for name, data in bad.files.items():
        files.add(bad.artifact_name(name), data)
    with HttpLoad(port, rate=200, keep_alive=0.5, workers=8) as load:
        time.sleep(0.5)
        started = time.monotonic()
        control.publish(bad.order(files.base_url))
        try:
            beat = control.wait_for(
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
    failed = next(b for b in reversed(beat) if str(b.failed_version) == bad.version)
    print(
        f"{bad.version} exits before ready: {failed.state.value} ({failed.error}); "
        f"under load: {report.summary()}; answered by {sorted(report.bodies)}"
    )
    assert report.refused == 0 and report.failed == 0, dict(report.errors)
    assert {body.split()[0] for body in report.bodies} == {old.version}
    return report


def test_without_a_hand_off_upgrades_refuse_connections_and_fail_requests(
    tmp_path: Path, control_files: tuple[ControlServer, ArtifactServer]
) -> None:
    """The reference: the same daemon and load, an exec that closes the socket and binds it
    again. What the checks above would see without a hand-off."""
    control, files = control_files
    versions = releases()[:4]
    install, state = tmp_path / "opt", tmp_path / "state"
    versions[0].install(install)
    port = free_port()
    log = tmp_path / "httpd.log"
    argv = guard_command(state, [str(install / PROGRAM), *httpd_args(port, control, state, "none")])
    with ServiceHarness(argv, log_path=log):
        reports = upgrade_under_load(control, files, port, versions, lambda: _tail(log))
    for i, report in enumerate(reports, 1):
        print(f"no hand-off, upgrade {i}: {report.summary()} {dict(report.errors)}")
    assert all(r.refused + r.failed > 0 for r in reports)


def _tail(path: Path) -> str:
    if path.is_dir():
        return "\n".join(p.read_text()[-1500:] for p in sorted(path.glob("*.log")))
    return path.read_text()[-3000:] if path.exists() else ""


HERE = Path(__file__).resolve().parent.parent / "examples" / "http_daemon"


@pytest.mark.parametrize("handoff", ["systemd-socket", "systemd-fdstore", "overlap"])
def test_twenty_upgrades_under_real_systemd_refuse_no_connection_and_fail_no_request(
    systemd: Any,
    place: Path,
    tmp_path: Path,
    control_files: tuple[ControlServer, ArtifactServer],
    handoff: str,
) -> None:
    """The shipped httpd.service (and httpd.socket for the socket way), with the drop-in of
    test_systemd_real for what the namespace cannot honour (User=root, no StateDirectory=)."""
    control, files = control_files
    python = host_python()
    versions = releases(python)
    port = free_port()
    install_httpd(systemd, place, control, versions[0], port, handoff, python)
    reports = upgrade_under_load(
        control, files, port, versions, lambda: systemd.journal("httpd.service")[-3000:]
    )
    state = systemd.state("httpd.service")
    (tmp_path / "journal.txt").write_text(systemd.journal("httpd.service"))
    print(f"{handoff}: unit {state}; journal in {tmp_path / 'journal.txt'}")
    check(reports, f"{handoff} under systemd")
    assert state["ActiveState"] == "active" and state["StatusText"] == f"httpd 1.{UPGRADES}"
    if handoff == "overlap":  # no restart: systemd was told each new main PID
        assert int(state["NRestarts"]) == 0
        assert len({body.split()[1] for r in reports for body in r.bodies}) == UPGRADES + 1
    else:
        assert int(state["NRestarts"]) >= UPGRADES


@pytest.mark.parametrize("handoff", ["systemd-socket", "overlap"])
def test_a_release_that_exits_before_ready_under_real_systemd_fails_no_request(
    systemd: Any,
    place: Path,
    control_files: tuple[ControlServer, ArtifactServer],
    handoff: str,
) -> None:
    """Overlap: the old process serves on. systemd's socket: the old one has left, the new
    one exits, the guard rolls it back at a later start, and meanwhile the connections wait
    in the socket's backlog: late answers, none refused or failed."""
    control, files = control_files
    python = host_python()
    old, bad = release("1.0", python=python), release("1.1", python=python, starts=False)
    port = free_port()
    install_httpd(systemd, place, control, old, port, handoff, python)
    publish_a_bad_release(
        control, files, port, old, bad, lambda: systemd.journal("httpd.service")[-3000:]
    )
    state = systemd.state("httpd.service")
    print(f"{handoff}: unit {state}")
    assert state["ActiveState"] == "active" and state["StatusText"] == "httpd 1.0"
    assert (place / "opt" / PROGRAM).read_bytes() == next(iter(old.files.values()))


def install_httpd(
    systemd: Any,
    place: Path,
    control: ControlServer,
    first: ToyRelease,
    port: int,
    handoff: str,
    python: str,
) -> None:
    opt, state = place / "opt", place / "state"
    first.install(opt)
    state.mkdir()

    def fill(text: str) -> str:
        return (
            text.replace("/usr/bin/python3", python)
            .replace("/opt/httpd", str(opt))
            .replace("/var/lib/httpd", str(state))
            .replace("127.0.0.1:8080", f"127.0.0.1:{port}")
        )

    env = {
        "PYTHONPATH": ":".join([*site.getsitepackages(), str(HERE.parent.parent)]),
        "HTTPD_CONTROL": control.url,
        "HTTPD_HANDOFF": handoff,
        "HTTPD_ARGS": f"--host {HOST} --interval 0.2",
    }
    dropin = "\n".join(
        [
            "[Service]",
            "User=root",
            "Group=root",
            "StateDirectory=",
            f"ReadWritePaths={state}",
            *(f'Environment="{k}={v}"' for k, v in env.items()),
            "",
        ]
    )
    units = ["httpd.service"]
    if handoff == "systemd-socket":
        systemd.install_unit("httpd.socket", fill((HERE / "httpd.socket").read_text()))
        units.insert(0, "httpd.socket")
    systemd.install_unit(
        "httpd.service", fill((HERE / "httpd.service").read_text()), dropins={"test.conf": dropin}
    )
    started = systemd.systemctl("start", *units)
    assert started.returncode == 0, systemd.journal("httpd.service")[-3000:]
