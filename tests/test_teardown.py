"""Issues 13 (point 4) and 17: every fleet the project starts stops every process it started.

Each run below is a real child process (the demo, the bench's real-fleet step, a user's
pytest run through the ``fleet`` fixture) started with a mark in its environment
(:mod:`selfupgrade.testing.processes`), which every process it starts inherits, detached
helpers and orphans included. After it ends, normally, by failing, or by Ctrl-C or SIGTERM,
no process with the mark may be left, and the ports it used must be free.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from selfupgrade.testing import free_port, marked, new_mark, stop_marked, with_mark

pytestmark = pytest.mark.real

ROOT = Path(__file__).resolve().parent.parent


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def run_marked(argv: list[str], timeout_s: float, **kwargs: object) -> tuple[int, str, str]:
    """Run ``argv`` with a fresh mark; return its status, its output and the mark."""
    mark = new_mark()
    try:
        done = subprocess.run(
            argv,
            env=with_mark(dict(os.environ), mark),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
            **kwargs,  # type: ignore[arg-type]
        )
    finally:
        # what the run under test failed to stop is stopped here, so that the check below
        # reports it without leaving it to the next test
        left_before = [p.pid for p in marked(mark)]
    assert stop_marked(mark) == []
    return done.returncode, done.stdout + done.stderr, ",".join(map(str, left_before))


@pytest.mark.parametrize(
    "scenario", [["--scenario", "good"], ["--plan", "canary"], ["--scenario", "bad-release"]]
)
def test_each_demo_scenario_stops_every_process_it_started(scenario: list[str]) -> None:
    port = free_port()
    argv = [sys.executable, "-m", "examples.demo", "--agents", "6", "--queue", "2"]
    code, out, left = run_marked([*argv, "--port", str(port), *scenario], 300)
    print(f"demo {' '.join(scenario)}: exit {code}, processes left: [{left}]")
    assert code == 0, out[-3000:]
    assert left == ""
    assert port_free(port)


def test_the_demo_on_redis_stops_every_process_it_started(redis_url: str) -> None:
    """The README's ``--redis`` variant: two hbs replicas sharing a real redis-server."""
    port = free_port()
    argv = [sys.executable, "-m", "examples.demo", "--agents", "6", "--queue", "2"]
    code, out, left = run_marked([*argv, "--port", str(port), "--redis", redis_url], 300)
    print(f"demo --redis: exit {code}, processes left: [{left}]")
    assert code == 0, out[-3000:]
    assert left == "" and port_free(port) and port_free(port + 1)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_demo_stops_every_process_it_started(sig: signal.Signals) -> None:
    port = free_port()
    mark = new_mark()
    # A process started with SIGINT ignored (a background job of a shell without job
    # control) passes that on, and Python then keeps it ignored: the demo starts with a
    # handler here, so that exec gives it SIGINT's default whatever started pytest.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "examples.demo", "--agents", "6", "--port", str(port)],
            env=with_mark(dict(os.environ), mark),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
    finally:
        signal.signal(signal.SIGINT, previous)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # interrupt it once the fleet runs
            if "agents heartbeat" in line:
                break
        started = len(marked(mark, besides=[proc.pid]))
        proc.send_signal(sig)
        code = proc.wait(60)
        left = [p.pid for p in marked(mark)]
    finally:
        proc.kill()
        proc.wait()
        stop_marked(mark)
    print(
        f"demo interrupted by {sig.name} with {started} processes running: exit {code}, left {left}"
    )
    assert started > 6
    assert code == 130 and left == []
    assert port_free(port)


def test_the_bench_real_fleet_step_stops_every_process_it_started() -> None:
    code, out, left = run_marked(
        [sys.executable, "bench/simulator.py", "--skip-large", "--agents", "4"], 600
    )
    print(f"bench/simulator.py --agents 4: exit {code}, processes left: [{left}]")
    assert code == 0, out[-3000:]
    assert left == ""


def test_a_users_failing_test_with_real_processes_stops_everything(tmp_path: Path) -> None:
    """``make_fleet`` in process mode: the user's daemon as real processes through the
    guard, under the ``hbs`` fixture; the test fails on purpose while they run."""
    (tmp_path / "test_user.py").write_text(
        textwrap.dedent(
            """
            import sys

            def test_fails(hbs, make_fleet):
                agents = make_fleet(
                    n=3,
                    mode="process",
                    command=[sys.executable, "{install}/toyd"],
                    env={"TOY_HOST": "{host}", "TOY_HBS": "{hbs}", "TOY_STATE_DIR": "{state}"},
                )
                agents.wait_until(version="1.0", timeout_s=60)
                assert False, "on purpose"
            """
        )
    )
    started = time.monotonic()
    code, out, left = run_marked(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)], 300
    )
    took = time.monotonic() - started
    print(f"a failing user test: exit {code} after {took:.1f} s, processes left: [{left}]")
    assert code == 1 and "on purpose" in out, out[-3000:]
    assert left == ""
