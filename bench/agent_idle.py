"""The example falcon agent at rest: its resident memory, and the CPU time it spends per
heartbeat, against a bare Python process and a plain httpx heartbeat loop in the same run.

The agent runs as shipped (metrics collector and ``/metrics`` server on), heartbeating an
in-process hbs on 127.0.0.1; hbs counts the heartbeats it receives. Memory is read after
``--settle`` seconds; CPU per heartbeat is the agent's user+system time over ``--seconds``
divided by the heartbeats hbs received in that time (with a 0.2 s interval, so that
heartbeats, not the collector, dominate; the collector's share is included).

    python bench/agent_idle.py [--seconds 20]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import ROOT, machine, report
from selfupgrade.server.tasks import TaskLimits
from selfupgrade.testing.hbs import HbsServer
from selfupgrade.testing.redis_server import free_port

_PLAIN_LOOP = """
import sys, time, httpx
url, interval = sys.argv[1], float(sys.argv[2])
body = {"host": "plain", "version": "6.0.0", "state": "idle"}
with httpx.Client(timeout=5, trust_env=False) as client:
    while True:
        client.post(url, json=body)
        time.sleep(interval)
"""


class Counter:
    """Counts heartbeats per host as hbs's plane receives them."""

    def __init__(self, hbs: HbsServer) -> None:
        assert hbs.plane is not None
        self.counts: dict[str, int] = {}
        self._lock = threading.Lock()
        inner = hbs.plane.answer

        def counted(beats):  # type: ignore[no-untyped-def]
            with self._lock:
                for beat in beats:
                    self.counts[beat.host] = self.counts.get(beat.host, 0) + 1
            return inner(beats)

        hbs.plane.answer = counted  # type: ignore[method-assign]

    def get(self, host: str) -> int:
        with self._lock:
            return self.counts.get(host, 0)


def rss_mb(pid: int) -> float:
    """Resident memory in MB (10^6 bytes, as the target is stated)."""
    return psutil.Process(pid).memory_info().rss / 1e6


def cpu_s(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def per_beat(proc: subprocess.Popen[bytes], host: str, counter: Counter, seconds: float) -> float:
    """Seconds of CPU per heartbeat of ``proc`` over ``seconds``."""
    cpu0, n0 = cpu_s(proc.pid), counter.get(host)
    time.sleep(seconds)
    cpu1, n1 = cpu_s(proc.pid), counter.get(host)
    if n1 == n0:
        sys.exit(f"{host} sent no heartbeat in {seconds} s")
    return (cpu1 - cpu0) / (n1 - n0)


def start(argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        argv,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def agent(tmp: Path, hbs: HbsServer, interval: float, host: str) -> subprocess.Popen[bytes]:
    cfg = json.loads((ROOT / "examples" / "falcon_agent" / "cfg.json").read_text())
    cfg["heartbeat"]["interval"] = interval
    cfg["http"]["listen"] = f"127.0.0.1:{free_port()}"
    cfg["state_dir"] = str(tmp / host)
    cfg["restarter"] = "exec"
    path = tmp / f"{host}.json"
    path.write_text(json.dumps(cfg))
    env = {"FALCON_AGENT_HOSTNAME": host, "FALCON_AGENT_HBS": hbs.heartbeat_url}
    return start(
        [sys.executable, str(ROOT / "examples" / "falcon_agent" / "agent.py"), "-c", str(path)], env
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--settle", type=float, default=10.0)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory(prefix="su-bench-agent-") as d:
        tmp = Path(d)
        with HbsServer(tmp / "hbs", limits=TaskLimits()) as hbs:
            counter = Counter(hbs)
            procs = {
                "bare": start([sys.executable, "-c", "import time; time.sleep(3600)"]),
                "plain": start([sys.executable, "-c", _PLAIN_LOOP, hbs.heartbeat_url, "0.2"]),
                "agent": agent(tmp, hbs, 0.2, "agent-1"),
            }
            try:
                time.sleep(args.settle)
                for name, proc in procs.items():
                    if proc.poll() is not None:
                        sys.exit(f"{name} exited early with {proc.returncode}")
                rss = {name: rss_mb(p.pid) for name, p in procs.items()}
                cpu_agent = per_beat(procs["agent"], "agent-1", counter, args.seconds)
                cpu_plain = per_beat(procs["plain"], "plain", counter, args.seconds)
            finally:
                for proc in procs.values():
                    stop(proc)
    print(
        f"resident memory: agent {rss['agent']:.1f} MB, plain httpx heartbeat loop "
        f"{rss['plain']:.1f} MB, bare Python {rss['bare']:.1f} MB"
    )
    report(
        "example agent idle RSS",
        rss["agent"],
        "MB",
        ref=rss["plain"],
        ref_name="plain httpx heartbeat loop",
        target="<= 40 MB",
    )
    report(
        "example agent CPU per heartbeat",
        cpu_agent * 1000,
        "ms",
        ref=cpu_plain * 1000,
        ref_name="plain httpx POST",
        target="<= 2 ms",
    )


if __name__ == "__main__":
    main()
