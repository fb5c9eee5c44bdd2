"""The fleet demo: N falcon agents upgrade themselves through hbs, a few at a time.

    python -m examples.demo                     # 20 agents, 5 upgrading at once, SQLite store
    python -m examples.demo --redis redis://127.0.0.1:6379/0    # two hbs replicas on Redis
    python -m examples.demo --plan canary       # a staged rollout: 1 host, 25%, everyone
    python -m examples.demo --scenario bad-release   # a release that crashes halts at the canary

On 127.0.0.1 only: starts hbs (HTTP on the seed's port 6031; 6032 too for the second replica),
a static artifact server, builds falcon-agent 6.0.0 and 6.0.1 as real artifacts with their
md5s, installs 6.0.0 on N hosts (directories) and runs the N agents under a real supervisord,
publishes 6.0.1 with the article's ``POST /agent/upgrade``, and prints the fleet by version,
the slots in use and the failures every second until every agent runs 6.0.1 and has confirmed
its health. Then it stops everything it started, by PID, and exits 0 (1 on a timeout).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from selfupgrade.testing import ArtifactServer

from .falcon_agent.build import build
from .fleet import NEW, OLD, Fleet, Hbs


def say(text: str) -> None:
    """Print one line with the time."""
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds it
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def fleet_line(status: dict[str, Any], started: float, n: int) -> str:
    """One progress line from hbs's status."""
    versions = status["versions"]
    c = status["counters"]
    if status["task"] is None:
        return f"t={time.monotonic() - started:5.1f}s  this replica has not seen the task yet"
    bar_len = 30
    done = min(c["done"], n)
    bar = "#" * (bar_len * done // n) + "." * (bar_len - bar_len * done // n)
    by_version = "  ".join(f"{v}: {k:>3}" for v, k in sorted(versions.items()))
    return (
        f"[{bar}] t={time.monotonic() - started:5.1f}s  {by_version}  | slots "
        f"{c['in_flight']}/{status['task']['limits']['max_in_flight']}  done {c['done']}"
        f"  failed {c['failed']}  failed attempts {c['failures']}"
    )


def load_plan(choice: str | None, queue: int) -> dict[str, Any] | None:
    """The plan for ``--plan``: a JSON file, or ``canary`` (1 host, 25%, everyone)."""
    if choice is None:
        return None
    if choice == "canary":
        return {
            "waves": [
                {"name": "canary", "hosts": 1, "max_in_flight": 1, "bake_s": 3},
                {"name": "25%", "percent": 25, "max_in_flight": max(1, queue // 2), "bake_s": 3},
                {"name": "all", "percent": 100, "max_in_flight": queue},
            ]
        }
    try:
        plan: dict[str, Any] = json.loads(Path(choice).read_text())
    except (OSError, ValueError) as exc:
        raise SystemExit(f"demo: cannot read the plan {choice}: {exc}") from None
    return plan


def staged(
    client: httpx.Client,
    hbs: list[str],
    body: dict[str, Any],
    plan: dict[str, Any],
    n: int,
    bad: bool,
) -> int:
    """Start a staged rollout and follow it with ``selfupgrade rollout watch``."""
    say(f"POST {hbs[0]}/selfupgrade/v1/rollouts with the plan:")
    for w in plan["waves"]:
        say(f"    {json.dumps(w)}")
    reply = client.post(
        f"{hbs[0]}/selfupgrade/v1/rollouts", content=json.dumps({**body, "plan": plan})
    )
    if reply.status_code != 201:
        say(f"-> {reply.status_code} {reply.text}")
        return 1
    rollout_id = reply.json()["task"]["id"]
    say(f"rollout {rollout_id} started; selfupgrade rollout watch {rollout_id}:")
    watch = subprocess.run(
        [
            sys.executable,
            "-m",
            "selfupgrade",
            "rollout",
            "--server",
            hbs[-1],
            "watch",
            rollout_id,
            "--interval-s",
            "1",
        ],
        check=False,
    )
    versions = Counter(client.get(f"{hbs[0]}/agentversions").json()["data"].values())
    say(f"watch exited {watch.returncode}; fleet: {dict(sorted(versions.items()))}")
    if bad:
        detail = client.get(f"{hbs[0]}/selfupgrade/v1/rollouts/{rollout_id}").json()
        ok = watch.returncode == 2 and versions.get(OLD) == n and detail["wave"] == 0
        say(
            "done: the bad release halted at the canary, the canary rolled itself back to "
            f"{OLD}, and no other host was touched"
            if ok
            else "FAILED: the bad release was not stopped at the canary"
        )
        return 0 if ok else 1
    ok = watch.returncode == 0 and versions.get(NEW) == n
    say(f"done: {n} agents upgraded wave by wave" if ok else "FAILED: the rollout did not complete")
    return 0 if ok else 1


def run(args: argparse.Namespace) -> int:
    """The demo; see the module docstring."""
    n, queue = args.agents, args.queue
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="selfupgrade-fleet-")))
        say(f"fleet demo: {n} agents, {queue} upgrading at once, work dir {tmp}")
        agent_cfg = {
            "heartbeat": {"interval": args.interval},
            "collect_interval": 1,
            "confirm_timeout_s": 30,
        }
        bad = args.scenario == "bad-release"
        old = build(OLD, config=agent_cfg)
        new = build(NEW, config=agent_cfg, crash_at_start=bad)
        plan = load_plan(args.plan or ("canary" if bad else None), queue)
        if bad:
            say(f"scenario bad-release: {NEW} exits with status 3 as soon as it starts")
        files = stack.enter_context(ArtifactServer())
        files.add(f"file/open-falcon/bin_{NEW}", new.program)
        files.add(f"file/open-falcon/cfg_{NEW}", new.config)
        wgeturl = f"{files.base_url}/file/open-falcon"
        say(f"artifact server {wgeturl}/bin_{NEW} (md5 {new.bin_md5})")

        if args.redis:
            stores = [args.redis, args.redis]
            ports = [args.port, args.port + 1]
        else:
            stores, ports = [f"sqlite:{tmp / 'hbs.db'}"], [args.port]
        hbs = []
        for port, store in zip(ports, stores, strict=True):
            if not _port_free(port):
                raise SystemExit(f"demo: port {port} is taken; pass --port to use another")
            server = Hbs(
                store,
                tmp / f"hbs-{port}.log",
                port=port,
                queue=queue,
                lease_s=args.lease_s,
                retry_backoff_s=5,
            )
            stack.enter_context(server)
            say(
                f"hbs pid {server.proc.pid if server.proc else '?'} on {server.url} (store {store})"
            )
            hbs.append(server.url)
        if args.redis:
            say(f"two hbs replicas share {args.redis}: {hbs[0]} and {hbs[1]}")

        fleet = stack.enter_context(Fleet(tmp, n, hbs, old=old))
        say(f"supervisord pid {fleet.sup.pid} runs {n} agents of version {OLD}")

        client = stack.enter_context(httpx.Client(timeout=5))
        deadline = time.monotonic() + args.timeout
        while True:
            versions = client.get(f"{hbs[-1]}/agentversions").json()["data"]
            if sum(1 for v in versions.values() if v == OLD) == n:
                break
            if time.monotonic() > deadline:
                say(f"FAILED: only {len(versions)} of {n} agents reported in time")
                return 1
            time.sleep(0.2)
        say(f"all {n} agents heartbeat {OLD}")

        body = {"wgeturl": wgeturl, "version": NEW, "binfile_md5": new.bin_md5}
        if plan is not None:
            return staged(client, hbs, body, plan, n, bad)
        say(f"curl -X POST {hbs[0]}/agent/upgrade -d '{json.dumps(body)}'")
        reply = client.post(f"{hbs[0]}/agent/upgrade", content=json.dumps(body))
        say(f"-> {reply.status_code} {reply.text}")
        if reply.status_code != 200:
            return 1

        started = time.monotonic()
        peak = 0
        ok = False
        while time.monotonic() < deadline:
            status = client.get(f"{hbs[-1]}/selfupgrade/v1/status").json()
            peak = max(peak, status["counters"]["in_flight"])
            say(fleet_line(status, started, n))
            if status["counters"]["done"] >= n and status["versions"].get(NEW) == n:
                ok = True
                break
            if status["counters"]["status"] == "halted":
                say(f"HALTED: {status['counters']['halt_reason']}")
                break
            time.sleep(1.0)
        versions = client.get(f"{hbs[0]}/agentversions").json()["data"]
        counts = Counter(versions.values())
        say(f"curl {hbs[0]}/agentversions -> {len(versions)} hosts: {dict(sorted(counts.items()))}")
        if not ok:
            say("FAILED: the fleet did not converge in time; logs in the work dir")
            for p in ports:
                print((tmp / f"hbs-{p}.log").read_text()[-3000:], file=sys.stderr)
            return 1
        say(
            f"done: {n} agents upgraded {OLD} -> {NEW} in {time.monotonic() - started:.1f}s, "
            f"at most {peak} at once (limit {queue})"
        )
        say("stopping supervisord (and the agents), hbs and the artifact server")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse the flags and run the demo."""
    parser = argparse.ArgumentParser(
        prog="python -m examples.demo", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--agents", type=int, default=20, help="agents in the fleet (default 20)")
    parser.add_argument("--queue", type=int, default=5, help="agents upgrading at once (default 5)")
    parser.add_argument("--redis", metavar="URL", help="two hbs replicas sharing this Redis")
    parser.add_argument("--port", type=int, default=6031, help="hbs's HTTP port (default 6031)")
    parser.add_argument("--interval", type=float, default=1.0, help="agent heartbeat interval (s)")
    parser.add_argument("--lease-s", type=float, default=20.0, help="slot lease (s)")
    parser.add_argument("--timeout", type=float, default=300.0, help="give up after (s)")
    parser.add_argument(
        "--plan",
        metavar="FILE|canary",
        help="a staged rollout: a plan JSON file, or 'canary' (1 host, 25%%, everyone)",
    )
    parser.add_argument(
        "--scenario",
        choices=["good", "bad-release"],
        default="good",
        help="bad-release: the new version crashes at start; it halts at the canary",
    )
    args = parser.parse_args(argv)
    if args.queue >= args.agents:
        parser.error("--queue must be below --agents, or there is nothing to queue")
    # SIGTERM ends the demo as Ctrl-C does: through every "with", so that all it started stops
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return run(args)
    except KeyboardInterrupt:
        say("interrupted; everything started was stopped")
        return 130


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    raise SystemExit(main())
