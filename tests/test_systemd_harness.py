"""Issue 14, point 1: the real-systemd harness of ``selfupgrade.testing`` does what it says,
and leaves nothing behind, also when the test process is killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from selfupgrade.testing.systemd import _CGROUP_PREFIX, _cgroup2_mount

pytestmark = pytest.mark.real

SERVICE = textwrap.dedent(
    """
    import signal, sys, time
    import sdnotify
    n = sdnotify.SystemdNotifier()
    signal.signal(signal.SIGTERM, lambda *a: (n.notify("STOPPING=1"), sys.exit(0)))
    n.notify("READY=1\\nSTATUS=probe up")
    while True:
        time.sleep(1)
    """
)


def our_cgroups() -> list[str]:
    root = _cgroup2_mount()
    return (
        sorted(p.name for p in root.iterdir() if p.name.startswith(_CGROUP_PREFIX)) if root else []
    )


def test_the_harness_drives_a_real_systemd(systemd: Any, tmp_path: Path) -> None:
    script = tmp_path / "probe.py"
    script.write_text(SERVICE)
    systemd.install_unit(
        "probe.service",
        f"[Service]\nType=notify\nExecStart={sys.executable} {script}\nRestart=always\n"
        "RestartSec=100ms\n",
    )
    assert systemd.systemctl("start", "probe").returncode == 0
    first = systemd.state("probe.service")
    assert first["ActiveState"] == "active" and first["StatusText"] == "probe up"
    host_pid = systemd.host_pid(first["MainPID"])
    assert host_pid is not None and Path(f"/proc/{host_pid}").exists()
    systemd.systemctl("kill", "-s", "KILL", "probe")
    again = systemd.wait_for(
        "probe.service", lambda s: s["NRestarts"] == "1" and s["ActiveState"] == "active", 10
    )
    assert again["MainPID"] != first["MainPID"]
    assert systemd.systemctl("stop", "probe").returncode == 0
    stopped = systemd.state("probe.service")
    journal = systemd.journal("probe.service")
    print(f"harness: {first} -> SIGKILL -> {again} -> stop -> {stopped['ActiveState']}")
    assert stopped["ActiveState"] == "inactive" and stopped["Result"] == "success"
    assert "Main process exited, code=killed, status=9/KILL" in journal
    assert not Path(f"/proc/{host_pid}").exists()


def test_a_killed_test_process_takes_its_systemd_with_it(tmp_path: Path) -> None:
    from selfupgrade.testing.systemd import unavailable

    why = unavailable()
    if why:
        if os.environ.get("SELFUPGRADE_REQUIRE_SYSTEMD") == "1":
            pytest.fail(why)
        pytest.skip(f"a real systemd cannot run here: {why}")
    driver = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time\n"
            "from selfupgrade.testing.systemd import Systemd\n"
            "sd = Systemd().start()\n"
            "print(sd.pid, flush=True)\n"
            "time.sleep(600)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert driver.stdout is not None
        systemd_pid = int(driver.stdout.readline())
        assert Path(f"/proc/{systemd_pid}").exists()
        assert any(str(driver.pid) in name for name in our_cgroups())
        os.kill(driver.pid, signal.SIGKILL)  # no cleanup can run in it
        driver.wait(10)
        deadline = time.monotonic() + 10
        while Path(f"/proc/{systemd_pid}").exists():
            assert time.monotonic() < deadline, "systemd outlived its test process"
            time.sleep(0.05)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    # the next harness removes the empty cgroup the killed one left
    from selfupgrade.testing.systemd import Systemd

    with Systemd():
        left = [n for n in our_cgroups() if n.startswith(f"{_CGROUP_PREFIX}{driver.pid}-")]
    print(
        f"driver SIGKILLed: systemd {systemd_pid} gone; stale cgroups after the next boot: {left}"
    )
    assert left == []
