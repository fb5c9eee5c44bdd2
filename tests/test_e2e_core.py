"""End to end: the toy daemon, a real child process, upgrades itself over real HTTP.

Under (a) a restart-on-exit harness that behaves like systemd's ``Restart=always`` with a real
``NOTIFY_SOCKET``, and (b) a real supervisord. Every process is stopped by PID at the end,
also when the test fails (the harnesses are context managers).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from selfupgrade import Role, TripleInstaller, UpgradeState
from selfupgrade.guard import guard_command
from selfupgrade.testing import (
    TOY_FILES,
    ArtifactServer,
    ControlServer,
    Fault,
    ServiceHarness,
    Supervisord,
    ToyRelease,
    free_port,
    toy_release,
)

pytestmark = pytest.mark.real

CFG = {"confirm_timeout_s": 4, "max_starts": 2, "interval_s": 0.3, "failure_backoff_s": 30}
OLD = toy_release("1.0", config=CFG)
NEW = toy_release("1.1", config=CFG)


@dataclass
class Host:
    name: str
    install: Path
    state: Path
    log: Path

    def command(self) -> list[str]:
        return guard_command(self.state, [str(self.install / "toyd")])

    def env(self, hbs: ControlServer, restarter: str = "systemd", **extra: str) -> dict[str, str]:
        return {
            "TOY_HOST": self.name,
            "TOY_HBS": hbs.url,
            "TOY_STATE_DIR": str(self.state),
            "TOY_RESTARTER": restarter,
            **extra,
        }

    def triple(self) -> dict[Role, bytes]:
        return {r: (self.install / n).read_bytes() for r, n in TOY_FILES.items()}

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@pytest.fixture
def host(tmp_path: Path) -> Host:
    h = Host("toy-1", tmp_path / "opt", tmp_path / "state", tmp_path / "toy.log")
    OLD.install(h.install)
    return h


def publish(arts: ArtifactServer, release: ToyRelease, **faults: Fault) -> None:
    for role in Role:
        arts.add(release.artifact_name(role), release.files[role], fault=faults.get(role.value))


def test_upgrade_under_systemd_like_harness(
    host: Host, artifact_server: ArtifactServer, control_server: ControlServer
) -> None:
    publish(artifact_server, NEW)
    with ServiceHarness(host.command(), env=host.env(control_server), log_path=host.log) as svc:
        ready = svc.wait_for_notification("READY=1")
        control_server.wait_for_version("toy-1", "1.0", timeout_s=20)
        control_server.publish(NEW.order(artifact_server.base_url, algorithm="md5", task_id="t1"))
        beat = control_server.wait_for_version("toy-1", "1.1", timeout_s=30)
        assert beat.state == UpgradeState.IDLE and beat.confirmed, host.log_text()
        stopping = svc.wait_for_notification("STOPPING=1")
        ready2 = svc.wait_for_notification("READY=1\nSTATUS=toyd 1.1")
    assert host.triple() == dict(NEW.files)
    assert stopping.pid == ready.pid  # 1.0 said it was stopping
    assert ready2.pid != ready.pid  # a new process runs 1.1
    assert svc.exits[0][0] == ready.pid
    assert svc.starts >= 2
    status = TripleInstaller(host.state).status()
    assert (status.current_version, status.previous_version, status.pending) == ("1.1", "1.0", None)


def test_an_order_with_mirrors_upgrades_from_one_that_works_and_says_which(
    host: Host, artifact_server: ArtifactServer, control_server: ControlServer
) -> None:
    """Issue 15, point 1: each artifact's URL has nothing listening, its first mirror sends
    other bytes, its second serves; the heartbeat before the restart names the second."""
    publish(artifact_server, NEW)
    down = f"http://127.0.0.1:{free_port()}"
    with ArtifactServer() as liar:
        publish(liar, NEW, **{r.value: Fault(wrong_bytes=True) for r in Role})
        order = NEW.order(artifact_server.base_url, task_id="m1")
        artifacts = tuple(
            dataclasses.replace(
                a,
                url=a.url.replace(artifact_server.base_url, down),
                mirrors=(a.url.replace(artifact_server.base_url, liar.base_url), a.url),
            )
            for a in order.release.artifacts
        )
        order = dataclasses.replace(
            order, release=dataclasses.replace(order.release, artifacts=artifacts)
        )
        with ServiceHarness(host.command(), env=host.env(control_server), log_path=host.log):
            control_server.wait_for_version("toy-1", "1.0", timeout_s=20)
            control_server.publish(order)
            control_server.wait_for_version("toy-1", "1.1", timeout_s=30)
    said = [b.served_by for b in control_server.beats if b.served_by]
    print(f"served_by in the beats: {said[-1:]}")
    assert said and said[-1] == {a.role.value: a.mirrors[1] for a in artifacts}
    assert host.triple() == dict(NEW.files)


@pytest.mark.parametrize(
    ("case", "fault_role", "fault", "expect"),
    [
        ("wrong digest", "bin", Fault(wrong_bytes=True), "md5 mismatch for"),
        ("truncated", "bin", Fault(truncate_to=100), "ended after 100 of"),
        ("404", "cfg", Fault(status=404), "answered 404"),
    ],
)
def test_bad_downloads_leave_the_old_version_running(
    host: Host,
    artifact_server: ArtifactServer,
    control_server: ControlServer,
    case: str,
    fault_role: str,
    fault: Fault,
    expect: str,
) -> None:
    publish(artifact_server, NEW, **{fault_role: fault})
    with ServiceHarness(host.command(), env=host.env(control_server), log_path=host.log) as svc:
        control_server.wait_for_version("toy-1", "1.0", timeout_s=20)
        control_server.publish(NEW.order(artifact_server.base_url, algorithm="md5"))
        beats = control_server.wait_for(
            lambda bs: any(b.state == UpgradeState.FAILED for b in bs), timeout_s=30
        )
        failed = next(b for b in beats if b.state == UpgradeState.FAILED)
        pid = svc.pid
        time.sleep(1.0)  # it keeps running, and does not retry at every beat
        assert svc.pid == pid and svc.starts == 1, host.log_text()
    assert str(failed.version) == "1.0"
    assert str(failed.failed_version) == "1.1"
    assert expect in (failed.error or ""), failed.error
    assert host.triple() == dict(OLD.files)
    assert not [p for p in host.install.iterdir() if p.name.endswith(".new")]
    gets = [r for r in artifact_server.requests if r.path == f"/{fault_role}_1.1"]
    assert len(gets) == 1


def test_oversize_download_leaves_the_old_version_running(
    host: Host, artifact_server: ArtifactServer, control_server: ControlServer
) -> None:
    publish(artifact_server, NEW)
    artifact_server.add("bin_1.1", NEW.files[Role.BIN] + b"#" * 5000)
    with ServiceHarness(host.command(), env=host.env(control_server), log_path=host.log) as svc:
        control_server.wait_for_version("toy-1", "1.0", timeout_s=20)
        control_server.publish(NEW.order(artifact_server.base_url))
        beats = control_server.wait_for(
            lambda bs: any(b.state == UpgradeState.FAILED for b in bs), timeout_s=30
        )
        assert svc.starts == 1
    failed = next(b for b in beats if b.state == UpgradeState.FAILED)
    assert "more than the allowed" in (failed.error or "")
    assert host.triple() == dict(OLD.files)


@pytest.mark.parametrize(
    ("behaviour", "reason"),
    [
        ("crash", "started 2 time(s) without confirming"),
        ("hang", "did not confirm its health before its deadline"),
        ("unhealthy", "did not confirm its health"),  # the watcher or the updater
    ],
)
def test_a_failing_new_version_is_rolled_back_and_reported(
    host: Host,
    artifact_server: ArtifactServer,
    control_server: ControlServer,
    behaviour: str,
    reason: str,
) -> None:
    bad = toy_release("1.1", behaviour=behaviour, config=CFG)  # type: ignore[arg-type]
    publish(artifact_server, bad)
    with ServiceHarness(
        host.command(), env=host.env(control_server), log_path=host.log, restart_sec=0.2
    ) as svc:
        control_server.wait_for_version("toy-1", "1.0", timeout_s=20)
        control_server.publish(bad.order(artifact_server.base_url))
        beats = control_server.wait_for(
            lambda bs: any(b.state == UpgradeState.ROLLED_BACK for b in bs), timeout_s=60
        )
        back = next(b for b in beats if b.state == UpgradeState.ROLLED_BACK)
        starts = svc.starts
    assert str(back.version) == "1.0", host.log_text()
    assert str(back.failed_version) == "1.1"
    assert reason in (back.error or ""), back.error
    assert host.triple() == dict(OLD.files)
    if behaviour == "crash":
        assert [code for _, code in svc.exits[1:3]] == [3, 3]  # 1.1 exited twice, then 1.0 again
        assert starts >= 4
    status = TripleInstaller(host.state).status()
    assert status.current_version == "1.0" and status.pending is None


def test_exec_restarter_keeps_the_pid(
    host: Host, artifact_server: ArtifactServer, control_server: ControlServer
) -> None:
    publish(artifact_server, NEW)
    with ServiceHarness(
        host.command(), env=host.env(control_server, "exec"), log_path=host.log
    ) as svc:
        control_server.wait_for_version("toy-1", "1.0", timeout_s=20)
        pid = svc.pid
        control_server.publish(NEW.order(artifact_server.base_url))
        control_server.wait_for_version("toy-1", "1.1", timeout_s=30)
        assert svc.pid == pid, host.log_text()
        assert svc.exits == []
    assert host.triple() == dict(NEW.files)


@pytest.mark.parametrize("how", ["rpc", "exit"])
def test_upgrade_under_real_supervisord(
    host: Host,
    artifact_server: ArtifactServer,
    control_server: ControlServer,
    tmp_path: Path,
    how: str,
) -> None:
    publish(artifact_server, NEW)
    sup = Supervisord(tmp_path / "supervisor")
    sup.add_program(
        "toy",
        host.command(),
        env=host.env(control_server, "supervisor", TOY_PROGRAM="toy", TOY_SUPERVISOR_HOW=how),
    )
    with sup:
        control_server.wait_for_version("toy-1", "1.0", timeout_s=30)
        first = sup.info("toy")["pid"]
        control_server.publish(NEW.order(artifact_server.base_url, algorithm="md5"))
        control_server.wait_for_version("toy-1", "1.1", timeout_s=30)
        info = sup.info("toy")
        assert info["statename"] == "RUNNING", sup.log("toy")
        assert info["pid"] != first
        assert "restart" in sup.log("toy")
    assert host.triple() == dict(NEW.files)
    assert not psutil.pid_exists(info["pid"])  # stopping supervisord stopped the daemon too


def _toy_under_supervisord(
    host: Host,
    artifact_server: ArtifactServer,
    control_server: ControlServer,
    tmp_path: Path,
    autorestart: bool | str,
) -> Supervisord:
    """1.1 published on the artifact server; toy 1.0 as supervisord program ``toy`` with
    the rpc-mode SupervisorRestarter (not started)."""
    publish(artifact_server, NEW)
    sup = Supervisord(tmp_path / "supervisor")
    sup.add_program(
        "toy",
        host.command(),
        env=host.env(control_server, "supervisor", TOY_PROGRAM="toy"),
        autorestart=autorestart,
    )
    return sup


def _kill_on_sight(sup: Supervisord, victims: str, found: list[str]) -> threading.Thread:
    """Watch for the restart helper of ``sup``'s program; the moment it appears, SIGKILL
    the helper, the daemon or both (by PID), and note what was killed in ``found``."""
    helper_module = "selfupgrade.restart._supervisor_helper"

    def run() -> None:
        daemon = sup.info("toy")["pid"]
        url = sup.server_url.encode()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            # the helper is the daemon's child, and the daemon waits for it to say it watches
            # before it exits: look at the daemon's children first (cheap, so often), then,
            # once the daemon is gone, at every process
            try:
                candidates = [c.pid for c in psutil.Process(daemon).children()]
            except psutil.Error:
                candidates = [int(p) for p in os.listdir("/proc") if p.isdigit()]
            for pid in candidates:
                try:
                    argv = Path(f"/proc/{pid}/cmdline").read_bytes()
                except OSError:
                    continue
                if helper_module.encode() in argv and url in argv:
                    if victims in ("helper", "both"):
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
                            found.append(f"helper {pid}")
                    if victims in ("daemon", "both"):
                        try:
                            os.kill(daemon, signal.SIGKILL)
                            found.append(f"daemon {daemon}")
                        except ProcessLookupError:
                            found.append(f"daemon {daemon} had exited already (missed)")
                    return
            time.sleep(0.001)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("autorestart", ["true", "unexpected"])
@pytest.mark.parametrize("victims", ["helper", "daemon", "both"])
def test_no_kill_during_a_supervisord_restart_leaves_the_daemon_stopped(
    host: Host,
    artifact_server: ArtifactServer,
    control_server: ControlServer,
    tmp_path: Path,
    autorestart: str,
    victims: str,
) -> None:
    """Issue 12, point 1: the old helper stopped the program and then started it; killed in
    between, supervisord kept it stopped (2 of 9 random kills). Now the daemon exits as a
    crash would and supervisord's own autorestart starts it: kills at the helper's first
    moment leave nothing stopped."""
    sup = _toy_under_supervisord(host, artifact_server, control_server, tmp_path, autorestart)
    with sup:
        control_server.wait_for_version("toy-1", "1.0", timeout_s=30)
        first = sup.info("toy")["pid"]
        killed: list[str] = []
        killer = _kill_on_sight(sup, victims, killed)
        control_server.publish(NEW.order(artifact_server.base_url, algorithm="md5"))
        killer.join(60)
        control_server.wait_for_version("toy-1", "1.1", timeout_s=30)
        info = sup.info("toy")
        print(f"autorestart={autorestart}, killed {killed}: {info['statename']} pid {info['pid']}")
        assert killed, "the helper never appeared"
        assert not any("missed" in k for k in killed), killed
        assert info["statename"] == "RUNNING" and info["pid"] != first, sup.log("toy")
    assert host.triple() == dict(NEW.files)


def test_with_autorestart_false_the_helper_starts_the_program(
    host: Host, artifact_server: ArtifactServer, control_server: ControlServer, tmp_path: Path
) -> None:
    sup = _toy_under_supervisord(host, artifact_server, control_server, tmp_path, False)
    with sup:
        control_server.wait_for_version("toy-1", "1.0", timeout_s=30)
        control_server.publish(NEW.order(artifact_server.base_url, algorithm="md5"))
        control_server.wait_for_version("toy-1", "1.1", timeout_s=30)
        assert sup.info("toy")["statename"] == "RUNNING"
        log = (tmp_path / "supervisor" / "supervisord.log").read_text()
        assert "exit status 75; not expected" in log


def test_crashing_release_is_rolled_back_under_real_supervisord(
    host: Host, artifact_server: ArtifactServer, control_server: ControlServer, tmp_path: Path
) -> None:
    bad = toy_release("1.1", behaviour="crash", config=CFG)
    publish(artifact_server, bad)
    sup = Supervisord(tmp_path / "supervisor")
    sup.add_program("toy", host.command(), env=host.env(control_server, "supervisor"))
    with sup:
        control_server.wait_for_version("toy-1", "1.0", timeout_s=30)
        control_server.publish(bad.order(artifact_server.base_url))
        beats = control_server.wait_for(
            lambda bs: any(b.state == UpgradeState.ROLLED_BACK for b in bs), timeout_s=60
        )
    back = next(b for b in beats if b.state == UpgradeState.ROLLED_BACK)
    assert str(back.version) == "1.0" and str(back.failed_version) == "1.1"
    assert host.triple() == dict(OLD.files)
