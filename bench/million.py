"""The fleet simulator on a real Redis: the control plane hbs runs, its state in a real
redis-server, driven through a three-wave rollout of a large fleet.

Heartbeats that come within one simulated second are answered as one batch, as hbs's
batcher answers the heartbeats that arrive together under load. Prints the wall time, the
Redis commands per simulated heartbeat (``INFO stats``' commands
processed, before and after), and Redis's memory (``used_memory``, and per host). The
reference in the same run is the same rollout on the in-memory store (``--hosts`` of them,
or ``--reference-hosts``). The issue's target: 1,000,000 hosts within 15 minutes on two
CPUs. Needs redis-server (Debian: ``apt-get install redis-server``).

    python bench/million.py [--hosts 1000000] [--pacing] [--reference-hosts 100000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis

from bench._common import machine, report, require
from selfupgrade.server.pacing import Pacing
from selfupgrade.server.stores.redis import RedisStore
from selfupgrade.testing import RedisServer
from selfupgrade.testing.simulator import FleetSimulator, SimConfig, SimResult, three_waves


def config(hosts: int, pacing: bool, store: RedisStore | None) -> SimConfig:
    """The simulator's 100,000-host rollout grown to ``hosts``: the slots (2,000 per
    100,000 hosts) and the file server's capacity (1.25 GB/s per 100,000 hosts, a CDN) grow
    with the fleet, so that the rollout takes about as long (at a fixed 1.25 GB/s, a 64 MiB
    file to a million hosts alone takes 15 hours)."""
    return SimConfig(
        hosts=hosts,
        plan=three_waves(limit=max(1, hosts // 50), bake_s=300),
        server_bandwidth_bps=1.25e9 * hosts / 100_000,
        pacing=Pacing() if pacing else None,
        park_waiting=not pacing,
        batch_s=1.0,
        store=store,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hosts", type=int, default=1_000_000)
    parser.add_argument("--reference-hosts", type=int, help="hosts of the in-memory run")
    parser.add_argument("--pacing", action="store_true", help="hbs paces check-ins")
    args = parser.parse_args()
    require("redis-server")
    print(f"machine: {machine()}")
    ref_hosts = args.reference_hosts or args.hosts
    reference = FleetSimulator(config(ref_hosts, args.pacing, None)).run()
    print(f"in memory, {ref_hosts:,} hosts: {reference.summary()}", flush=True)
    with RedisServer() as server:
        client = redis.Redis.from_url(server.url)
        store = RedisStore(server.url, timeout_s=30)
        before = int(client.info("stats")["total_commands_processed"])
        started = time.perf_counter()
        result: SimResult = FleetSimulator(config(args.hosts, args.pacing, store)).run()
        wall = time.perf_counter() - started
        commands = int(client.info("stats")["total_commands_processed"]) - before
        memory = int(client.info("memory")["used_memory"])
        cpu = client.info("cpu")
    print(f"on Redis, {args.hosts:,} hosts: {result.summary()}")
    print(
        f"Redis: {commands:,} commands, {commands / max(result.heartbeats, 1):.2f} per "
        f"simulated heartbeat; used_memory {memory / 2**20:,.1f} MiB "
        f"({memory / args.hosts:,.0f} bytes per host); Redis CPU "
        f"{float(cpu['used_cpu_user']) + float(cpu['used_cpu_sys']):.1f} s"
    )
    report(
        f"simulator on Redis, {args.hosts:,} hosts, three waves, wall time",
        wall,
        "s",
        ref=reference.wall_s * args.hosts / ref_hosts,
        ref_name=f"in memory, scaled from {ref_hosts:,} hosts",
        target="<= 900 s for 1,000,000 hosts",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
