"""Time from an upgrade order to the new version's first heartbeat, per restarter.

A real falcon agent 6.0.0 runs under each restarter: ``systemd`` (the systemd-like harness of
``selfupgrade.testing``: ``Restart=always``, ``RestartSec=100ms``, a real ``NOTIFY_SOCKET``),
``supervisor`` (a real supervisord) and ``exec`` (the agent replaces itself with ``execv``).
An in-process hbs publishes 6.0.1 (the agent's program, its size printed, from a local HTTP
server); the clock starts when hbs answers a heartbeat with the order and stops at the first
heartbeat that reports 6.0.1. The reference, in the same run, is the time the same agent
takes from being started to its first heartbeat (a cold start of the program).

    python bench/order_to_heartbeat.py [--runs 3]
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import machine, report
from examples.falcon_agent.build import Built, build
from examples.fleet import AGENT_CFG, agent_command, agent_env, serve_release
from selfupgrade.server.tasks import TaskLimits
from selfupgrade.testing import ArtifactServer
from selfupgrade.testing.harness import ServiceHarness, Supervisord, stop_pid
from selfupgrade.testing.hbs import HbsServer

OLD, NEW = "6.0.0", "6.0.1"
HOST = "agent-1"


class Clock:
    """Watches hbs's plane: when the order went out, when the new version first beat."""

    def __init__(self, hbs: HbsServer) -> None:
        assert hbs.plane is not None
        self.first_beat: float | None = None
        self.order_sent: float | None = None
        self.new_beat: float | None = None
        self.changed = threading.Condition()
        inner = hbs.plane.answer

        def watched(beats):  # type: ignore[no-untyped-def]
            now = time.monotonic()
            replies = inner(beats)
            with self.changed:
                for beat, reply in zip(beats, replies, strict=True):
                    if self.first_beat is None:
                        self.first_beat = now
                    if reply.task is not None and self.order_sent is None:
                        self.order_sent = time.monotonic()
                    if str(beat.version) == NEW and self.new_beat is None:
                        self.new_beat = now
                self.changed.notify_all()
            return replies

        hbs.plane.answer = watched  # type: ignore[method-assign]

    def wait(self, what: Callable[[], float | None], timeout_s: float, name: str) -> float:
        with self.changed:
            if not self.changed.wait_for(lambda: what() is not None, timeout=timeout_s):
                raise RuntimeError(f"no {name} within {timeout_s:.0f} s")
        value = what()
        assert value is not None
        return value


def one_run(restarter: str, old: Built, new: Built, tmp: Path) -> tuple[float, float]:
    """(start to first heartbeat, order to the new version's first heartbeat), seconds."""
    home = tmp / "host"
    old.install(home / "opt")
    limits = TaskLimits(max_in_flight=5, lease_s=30, retry_backoff_s=2)
    with HbsServer(tmp / "hbs", limits=limits, tick_s=0.1) as hbs, ArtifactServer() as files:
        clock = Clock(hbs)
        wgeturl = serve_release(files, new)
        e = agent_env(home, HOST, hbs.heartbeat_url, restarter)
        started = time.monotonic()
        if restarter == "systemd":
            runner: object = ServiceHarness(agent_command(home), env=e, log_path=tmp / "agent.log")
        elif restarter == "supervisor":
            sup = Supervisord(tmp / "supervisor")
            sup.add_program(HOST, agent_command(home), env=e)
            runner = sup
        else:
            import os

            log = (tmp / "agent.log").open("wb")
            proc = subprocess.Popen(
                agent_command(home), env={**os.environ, **e}, stdout=log, stderr=subprocess.STDOUT
            )
            runner = proc
        try:
            if not isinstance(runner, subprocess.Popen):
                runner.start()  # type: ignore[attr-defined]
            first = clock.wait(lambda: clock.first_beat, 60, "first heartbeat") - started
            hbs.publish(
                {
                    "wgeturl": wgeturl,
                    "version": NEW,
                    "type": 0,
                    "binfile_md5": hashlib.md5(new.program).hexdigest(),
                }
            )
            sent = clock.wait(lambda: clock.order_sent, 60, "order")
            done = clock.wait(lambda: clock.new_beat, 60, f"heartbeat of {NEW}")
            return first, done - sent
        finally:
            if isinstance(runner, subprocess.Popen):
                stop_pid(runner.pid)
                runner.wait(timeout=10)
            else:
                runner.stop()  # type: ignore[attr-defined]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    config = {**AGENT_CFG, "heartbeat": {**AGENT_CFG["heartbeat"], "interval": 1.0}}
    old, new = build(OLD, config=config), build(NEW, config=config)
    print(f"artifact: the agent's program, {len(new.program):,} bytes")
    for restarter in ("systemd", "supervisor", "exec"):
        starts, upgrades = [], []
        for k in range(args.runs):
            with tempfile.TemporaryDirectory(prefix=f"su-bench-{restarter}-") as d:
                first, upgrade = one_run(restarter, old, new, Path(d))
            starts.append(first)
            upgrades.append(upgrade)
            print(
                f"[{restarter}] run {k + 1}: start to first heartbeat {first:.2f} s, "
                f"order to {NEW}'s first heartbeat {upgrade:.2f} s",
                flush=True,
            )
        report(
            f"[{restarter}] order to new version's first heartbeat (median)",
            statistics.median(upgrades),
            "s",
            ref=statistics.median(starts),
            ref_name="cold start to first heartbeat",
            target="<= 2 s",
        )


if __name__ == "__main__":
    main()
