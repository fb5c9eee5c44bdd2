"""Drive httpd through upgrades under load, each way of handing its socket over: what
``tests/test_zero_downtime.py`` asserts on and ``bench/zero_downtime.py`` measures.

Everything runs on 127.0.0.1: a control server, an artifact server, httpd under the process
manager of the way (the guard's restart harness, a real supervisord, none, or a real systemd in
its own namespaces), and :class:`~selfupgrade.testing.load.HttpLoad`.
"""

from __future__ import annotations

import contextlib
import os
import site
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from selfupgrade.guard import guard_command
from selfupgrade.testing import (
    ArtifactServer,
    ControlServer,
    ServiceHarness,
    Supervisord,
    new_mark,
    stop_marked,
    with_mark,
)
from selfupgrade.testing.load import HttpLoad, LoadReport
from selfupgrade.testing.systemd import Systemd
from selfupgrade.testing.toy import ToyRelease

from . import HERE, PROGRAM, release

HOST = "httpd-1"
PACE_S = 2.2
"""At least this long between two upgrades when each restarts the unit: systemd's default
StartLimitBurst is 5 starts in 10 s, and upgrades count."""

WAYS = {
    "exec": ("exec", "guard-harness"),
    "exec-supervisord": ("exec", "supervisord"),
    "overlap": ("overlap", "none"),
    "overlap-systemd": ("overlap", "systemd"),
    "systemd-socket": ("systemd-socket", "systemd"),
    "systemd-fdstore": ("systemd-fdstore", "systemd"),
    "none": ("none", "guard-harness"),
}
"""Each way: httpd's ``--handoff`` and the process manager it runs under (``none`` is the
plain restart without a hand-off, the reference)."""


def releases(count: int, python: str | None = None) -> list[ToyRelease]:
    """httpd 1.0, 1.1, ..., 1.<count>."""
    return [release(f"1.{i}", python=python) for i in range(count + 1)]


def systemd_python() -> str | None:
    """An interpreter a ``ProtectHome=true`` unit can run that can import this checkout (the
    machine's ``/usr/bin/python3`` of this interpreter's version), or ``None``."""
    debian = Path("/usr/bin/python3")
    if not debian.exists():
        return None
    same = subprocess.run(
        [str(debian), "-c", "import sys; print(sys.version_info[:2])"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return str(debian) if same == str(sys.version_info[:2]) else None


def httpd_args(port: int, control_url: str, state: Path, handoff: str) -> list[str]:
    """httpd's arguments for the drive: a short heartbeat interval."""
    return [
        *("--listen", f"127.0.0.1:{port}", "--control", control_url, "--state", str(state)),
        *("--handoff", handoff, "--host", HOST, "--interval", "0.2"),
    ]


@dataclass
class Running:
    """httpd, running: ``log()`` tells what it said (for a failure's message); ``unit()``
    systemd's view of it (``{}`` under other managers); ``restarts_unit``: whether each
    upgrade is a start of the systemd unit."""

    log: Callable[[], str]
    unit: Callable[[], dict[str, str]]
    restarts_unit: bool = False


@contextlib.contextmanager
def running(
    way: str,
    workdir: Path,
    control: ControlServer,
    first: ToyRelease,
    port: int,
    systemd: Systemd | None = None,
) -> Iterator[Running]:
    """httpd ``first`` installed in ``workdir`` and running the ``way`` of :data:`WAYS`;
    stopped (every process it led to) on leaving. Under systemd, ``workdir`` must not be in
    ``/tmp`` (the unit's ``PrivateTmp=`` hides it) and ``first`` must be built for
    :func:`systemd_python`."""
    handoff, manager = WAYS[way]
    install, state = workdir / "opt", workdir / "state"
    first.install(install)
    state.mkdir(parents=True, exist_ok=True)
    argv = guard_command(
        state, [str(install / PROGRAM), *httpd_args(port, control.url, state, handoff)]
    )
    log = workdir / "httpd.log"

    def tail() -> str:
        return log.read_text()[-3000:] if log.exists() else ""

    if manager == "guard-harness":
        with ServiceHarness(argv, log_path=log):
            yield Running(tail, dict)
    elif manager == "supervisord":
        sup = Supervisord(workdir / "supervisor")
        sup.add_program("httpd", argv, autorestart=True)
        with sup:
            yield Running(lambda: sup.log("httpd")[-3000:], dict)
    elif manager == "none":
        mark = new_mark()
        with log.open("ab") as out:
            first_pid = subprocess.Popen(
                argv, env=with_mark(dict(os.environ), mark), stdout=out, stderr=subprocess.STDOUT
            )
        try:
            yield Running(tail, dict)
        finally:
            left = stop_marked(mark)
            first_pid.wait(10)
            if left:
                raise RuntimeError(f"httpd processes left running: {left}")
    else:
        if systemd is None:
            raise ValueError(f"the way {way!r} needs a Systemd")
        _install_units(systemd, install, state, control, port, handoff)
        yield Running(
            lambda: systemd.journal("httpd.service")[-3000:],
            lambda: systemd.state("httpd.service"),
            restarts_unit=handoff != "overlap",
        )


def _install_units(
    systemd: Systemd, install: Path, state: Path, control: ControlServer, port: int, handoff: str
) -> None:
    """The shipped httpd.service (and httpd.socket for the socket way), with one drop-in for
    what a shared test machine cannot honour: ``User=root`` (no ``httpd`` user is added to the
    machine), no ``StateDirectory=`` (it would be made on the machine's own ``/var/lib``), the
    settings of the drive, and the ``PYTHONPATH`` of this checkout."""
    python = systemd_python()
    if python is None:
        raise RuntimeError("httpd under systemd needs /usr/bin/python3 of this Python's version")

    def fill(text: str) -> str:
        return (
            text.replace("/usr/bin/python3", python)
            .replace("/opt/httpd", str(install))
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
            *("[Service]", "User=root", "Group=root", "StateDirectory="),
            f"ReadWritePaths={state}",
            *(f'Environment="{k}={v}"' for k, v in env.items()),
            "",
        ]
    )
    units = ["httpd.service"]
    if handoff == "systemd-socket":
        systemd.install_unit("httpd.socket", fill((HERE / "httpd.socket").read_text()))
        units.insert(0, "httpd.socket")
    service = fill((HERE / "httpd.service").read_text())
    systemd.install_unit("httpd.service", service, dropins={"drive.conf": dropin})
    started = systemd.systemctl("start", *units)
    if started.returncode != 0:
        raise RuntimeError(f"httpd did not start:\n{systemd.journal('httpd.service')[-3000:]}")


@dataclass(frozen=True)
class Upgrades:
    """The load at rest (the second before the first upgrade) and during each upgrade (from
    the order to the confirmation and the pause after it)."""

    at_rest: LoadReport
    each: list[LoadReport]


def upgrade_under_load(
    control: ControlServer,
    files: ArtifactServer,
    port: int,
    versions: list[ToyRelease],
    on_failure: Callable[[], str],
    *,
    rate: float = 200.0,
    restarts_unit: bool = False,
) -> Upgrades:
    """With httpd on ``versions[0]`` answering on ``port``: upgrade it to each next version
    under load, one after the other, each confirmed before the next (and, when each upgrade
    ``restarts_unit`` under systemd, :data:`PACE_S` apart)."""
    control.wait_for_version(HOST, versions[0].version, timeout_s=60)
    each = []
    pace_s = PACE_S if restarts_unit else 0.3
    with HttpLoad(port, rate=rate, keep_alive=0.5, workers=8) as load:
        time.sleep(1.0)
        at_rest = load.report(since=time.monotonic() - 0.9)
        for new in versions[1:]:
            for role, data in new.files.items():
                files.add(new.artifact_name(role), data)
            started = time.monotonic()
            control.publish(new.order(files.base_url))
            try:
                control.wait_for_version(HOST, new.version, timeout_s=60)
            except Exception as exc:
                raise AssertionError(f"{new.version} not confirmed: {exc}\n{on_failure()}") from exc
            control.publish(None)
            time.sleep(max(0.3, pace_s - (time.monotonic() - started)))
            each.append(load.report(since=started, until=time.monotonic()))
    return Upgrades(at_rest, each)
