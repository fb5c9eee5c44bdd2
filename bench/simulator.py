"""The fleet simulator: its wall time for 100,000 hosts through a three-wave rollout, and how
well it predicts a real rollout of 50 agents.

1. ``FleetSimulator(SimConfig())``: 100,000 hosts beating every minute, a canary, 25% and
   everyone (2000 upgrades at once, 5 min bakes), a 64 MiB artifact over a 1.25 GB/s server.
   Its wall time is printed beside the simulated time (how many times faster than real).
   Then the same rollout with hbs pacing check-ins (``Pacing()``, its defaults): heartbeats per
   host per hour and the rollout's duration against the fixed one-minute interval.
2. 50 real falcon agents under supervisord, a real hbs process, a three-wave plan (1 host,
   25%, everyone; 4 at once, 2 s bakes). The per-host upgrade time (admission to done, the
   median over the fleet, read from hbs's store) calibrates the simulator's ``restart_s``;
   everything else (heartbeat interval and jitter, slots, waves, bakes, housekeeping) comes
   from the configuration. The simulated and real durations, overall and per wave, are
   printed with their ratio; the stated tolerance is 25% on the overall duration.

    python bench/simulator.py [--skip-real]
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import machine, report
from examples.falcon_agent.build import build
from examples.fleet import AGENT_CFG, Fleet, Hbs, serve_release
from selfupgrade.server.pacing import Pacing
from selfupgrade.server.plan import Plan
from selfupgrade.testing import ArtifactServer
from selfupgrade.testing.simulator import FleetSimulator, SimConfig

OLD, NEW = "6.0.0", "6.0.1"
AGENTS = 50
PLAN: dict[str, Any] = {
    "waves": [
        {"name": "canary", "hosts": 1, "max_in_flight": 1, "bake_s": 2},
        {"name": "quarter", "percent": 25, "max_in_flight": 4, "bake_s": 2},
        {"name": "all", "percent": 100, "max_in_flight": 4},
    ]
}
TOLERANCE = 0.25


def large() -> None:
    result = FleetSimulator(SimConfig()).run()
    print(result.summary())
    print(
        f"simulated {result.duration_s / 60:.1f} min in {result.wall_s:.1f} s: "
        f"{result.duration_s / result.wall_s:,.0f} times faster than real time"
    )
    report("simulator: 100,000 hosts, three waves, wall time", result.wall_s, "s", target="<= 60 s")


def paced(rarely_s: float) -> None:
    """Issue 15, point 4: the same 100,000-host rollout with hbs pacing check-ins."""
    fixed = FleetSimulator(SimConfig()).run()
    result = FleetSimulator(SimConfig(pacing=Pacing(rarely_s=rarely_s))).run()
    print(f"paced (rarely {rarely_s:g} s): {result.summary()}")
    report(
        "paced check-ins: heartbeats per host per hour",
        result.per_host_hour,
        "",
        ref=fixed.per_host_hour,
        ref_name="a fixed 60 s interval",
        target="<= 0.20x (5 times fewer)",
    )
    report(
        "paced check-ins: rollout duration",
        result.duration_s / 60,
        "min",
        ref=fixed.duration_s / 60,
        ref_name="a fixed 60 s interval",
        target="<= 1.05x",
    )
    canary = result.waves[0][2]
    if canary is not None:
        print(f"  of which the canary's first check-in after the publish: {canary / 60:.1f} min")


def wait(what: str, check: Any, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            sys.exit(f"timed out waiting for {what}")
        time.sleep(0.1)


def real(tmp: Path, agents: int) -> tuple[float, list[tuple[float, float]], float]:
    """Run the real rollout: (duration, per wave (start, settle) from publication, median
    per-host upgrade time), seconds."""
    config = {**AGENT_CFG, "heartbeat": {**AGENT_CFG["heartbeat"], "interval": 0.5}}
    new = build(NEW, config=config)
    db = tmp / "hbs.db"
    with (
        ArtifactServer() as files,
        Hbs(f"sqlite:{db}", tmp / "hbs.log", queue=4, lease_s=30, retry_backoff_s=2) as hbs,
        Fleet(tmp, agents, [hbs.url], old=build(OLD, config=config)),
    ):
        wgeturl = serve_release(files, new)
        wait(
            f"{agents} agents on {OLD}",
            lambda: list(hbs.versions().values()).count(OLD) == agents,
            120,
        )
        import hashlib

        published = time.time()
        detail = hbs.start_rollout(
            {
                "wgeturl": wgeturl,
                "version": NEW,
                "plan": PLAN,
                "binfile_md5": hashlib.md5(new.program).hexdigest(),
            }
        )
        rid = detail["task"]["id"]
        wait("the rollout to complete", lambda: hbs.rollout(rid)["status"] == "complete", 600)
        finished = time.time()
        detail = hbs.rollout(rid)
    waves: dict[int, list[str]] = {}
    for host, info in detail["hosts"].items():
        waves.setdefault(info["wave"], []).append(host)
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as c:
        rows = c.execute("SELECT host, body FROM progress WHERE task_id = ?", (rid,))
        progress = {h: json.loads(b) for h, b in rows}
    upgrade = statistics.median(p["done_at"] - p["admitted_at"] for p in progress.values())
    spans = []
    for k in sorted(waves):
        hosts = [progress[h] for h in waves[k]]
        spans.append(
            (
                min(p["admitted_at"] for p in hosts) - published,
                max(p["done_at"] for p in hosts) - published,
            )
        )
    return finished - published, spans, upgrade


def simulated(upgrade_s: float, agents: int) -> tuple[float, list[tuple[float, float]]]:
    config = SimConfig(
        hosts=agents,
        plan=Plan.from_json(PLAN),
        interval_s=0.5,
        jitter=0.2,
        artifact_bytes=20_000,
        host_bandwidth_bps=100e6,
        install_s=0.0,
        restart_s=upgrade_s,
        confirm_s=0.0,
        fail_fraction=0.0,
        vanish_fraction=0.0,
        lease_s=30,
        tick_s=1.0,
        step_s=0.05,
        max_virtual_s=3600,
        park_waiting=False,
    )
    result = FleetSimulator(config).run()
    spans = [(start, end if end is not None else float("nan")) for _, start, end in result.waves]
    return result.duration_s, spans


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--skip-real", action="store_true", help="only the 100,000-host run")
    parser.add_argument("--skip-large", action="store_true", help="only the real rollout")
    parser.add_argument("--agents", type=int, default=AGENTS, help=f"real agents ({AGENTS})")
    parser.add_argument(
        "--pace-rarely-s",
        type=float,
        default=Pacing().rarely_s,
        help=f"the paced run's rarely_s ({Pacing().rarely_s:g})",
    )
    args = parser.parse_args()
    agents = args.agents
    print(f"machine: {machine()}")
    if not args.skip_large:
        large()
        paced(args.pace_rarely_s)
    if args.skip_real:
        return
    with tempfile.TemporaryDirectory(prefix="su-bench-sim-") as d:
        real_s, real_waves, upgrade = real(Path(d), agents)
    sim_s, sim_waves = simulated(upgrade, agents)
    print(
        f"real rollout of {agents} agents: {real_s:.1f} s; median upgrade of one host "
        f"(admission to done) {upgrade:.2f} s"
    )
    for k, ((rs, re), (ss, se)) in enumerate(zip(real_waves, sim_waves, strict=False)):
        print(f"  wave {k + 1}: real {rs:.1f}-{re:.1f} s, simulated {ss:.1f}-{se:.1f} s")
    report(
        f"simulated rollout of {agents} agents",
        sim_s,
        "s",
        ref=real_s,
        ref_name="the real rollout",
        target=f"within {TOLERANCE:.0%}",
    )
    off = abs(sim_s / real_s - 1)
    print(
        f"simulator against the real fleet: {off:.0%} off "
        f"({'within' if off <= TOLERANCE else 'OUTSIDE'} the stated {TOLERANCE:.0%})"
    )


if __name__ == "__main__":
    main()
