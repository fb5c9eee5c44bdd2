"""Heartbeat throughput of one hbs process during a rollout, against its own no-op endpoint
and nginx's fixed 200, on the embedded store and on Redis.

The store is seeded with a fleet of ``--hosts`` hosts (600,000: a fleet beating once a minute
sends 10,000 heartbeats a second) on the old version and a one-wave rollout to the new one,
``--slots`` hosts at a time. wrk then plays the fleet (see ``heartbeat.lua``): each host sends
the body a real agent sends, agents that get an order come back downloading and then on the
new version, so admissions, lease renewals and completions are written while it runs.

For Redis, the commands hbs sent during the heartbeat run (``INFO commandstats``, the
housekeeping included) and hbs's own count of round trips to Redis (a command, or a
pipeline, each: ``selfupgrade_store_round_trips_total`` on ``/metrics``) are divided by the
heartbeats answered.

    python bench/hbs_heartbeat.py [--hosts 600000] [--rounds 3] [--store sqlite|redis|both]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import (
    BENCH,
    LOAD_CPU,
    SERVER_CPU,
    WrkResult,
    machine,
    nginx,
    pin_pid,
    pinned,
    process,
    report,
    wait_http,
    wrk,
)
from selfupgrade.models import Heartbeat, UpgradeState, parse_version
from selfupgrade.server.plane import ControlPlane
from selfupgrade.server.tasks import HostSeen, TaskLimits, task_from_seed
from selfupgrade.testing.redis_server import RedisServer, free_port

OLD, NEW = "6.0.0", "6.0.1"


def agent_body() -> str:
    """The JSON a falcon-style agent sends, with HOST, VERSION and STATE to fill in."""
    beat = Heartbeat(
        host="HOST",
        version=parse_version(OLD),
        state=UpgradeState.IDLE,
        files={"cfg": {"md5": "0" * 32, "sha256": "1" * 64}},
    ).to_wire()
    beat["version"], beat["state"] = "VERSION", "STATE"
    return json.dumps(beat, separators=(",", ":"))


def write_noop_script(path: Path) -> None:
    """A wrk script that sends one idle host's heartbeat body again and again (for the no-op
    endpoint and nginx's fixed 200)."""
    one = agent_body().replace("HOST", "h0000001").replace("VERSION", OLD)
    path.write_text(
        'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
        f"wrk.body = {json.dumps(one.replace('STATE', 'idle'))}\n"
    )


def seed(store: object, hosts: int, slots: int) -> None:
    """Put ``hosts`` hosts on the old version in ``store`` and publish the rollout."""
    now = time.time()
    names = [f"h{i:07d}" for i in range(hosts)]
    for start in range(0, hosts, 20_000):
        store.save_hosts(  # type: ignore[attr-defined]
            [HostSeen(h, OLD, "idle", now) for h in names[start : start + 20_000]]
        )
    plane = ControlPlane(store)  # type: ignore[arg-type]
    task = task_from_seed(
        {"wgeturl": "http://127.0.0.1:9/files", "version": NEW, "binfile_md5": "0" * 32},
        limits=TaskLimits(max_in_flight=slots, lease_s=600, failure_limit=hosts),
        now=now,
    )
    plane.commands.publish(task)


def measure(
    label: str,
    store_url: str,
    args: argparse.Namespace,
    tmp: Path,
    *,
    slots: int,
    nginx_port: int,
    redis: RedisServer | None,
) -> None:
    """Start hbs on ``store_url`` and measure: no-op, heartbeats, no-op again."""
    port = free_port()
    log = tmp / f"hbs-{label}.log"
    entry = [args.hbs_wrapper] if args.hbs_wrapper else ["-m", "selfupgrade.server"]
    argv = [
        sys.executable,
        *entry,
        "--http",
        f"127.0.0.1:{port}",
        "--rpc",
        "off",
        "--store",
        store_url,
        "--queue",
        str(slots),
        # the benchmark's artifact URL serves nothing, and its hosts never finish
        "--no-artifact-check",
        "--failure-limit",
        str(10**9),
        "--bench-noop",
        "--log-level",
        "warning",
    ]
    trips = 0.0
    with process(pinned(argv, SERVER_CPU), log=log) as proc:
        started = time.monotonic()
        wait_http(f"http://127.0.0.1:{port}/health", timeout_s=300, proc=proc, log=log)
        print(
            f"[{label}] hbs loaded {args.hosts:,} hosts in {time.monotonic() - started:.1f} s",
            flush=True,
        )
        run = {
            "seconds": args.seconds,
            "connections": args.connections,
            "threads": args.connections,
        }
        noop_url = f"http://127.0.0.1:{port}/selfupgrade/v1/noop"
        wrk(noop_url, tmp / "noop.lua", **{**run, "seconds": 2})  # warm-up
        rounds = []
        for k in range(args.rounds):
            if k:
                # A new rollout for the round. The agents of the last one that still hold
                # slots will not come back (wrk starts afresh), and their leases count against
                # the new rollout's limit until they run out (600 s): this round writes
                # little (docs/benchmarks.md, 2026-12-04).
                publish(port)
                # Let the housekeeping that follows a publish (the first scan of the new
                # rollout's members, the collector) pass before measuring.
                time.sleep(args.settle)
                wrk(noop_url, tmp / "noop.lua", **{**run, "seconds": 2})
            noop = wrk(noop_url, tmp / "noop.lua", **run)
            before = _commands(redis)
            trips_before = _round_trips(port)
            beat = wrk(
                f"http://127.0.0.1:{port}/selfupgrade/v1/heartbeat",
                BENCH / "heartbeat.lua",
                **{**run, "seconds": args.seconds * 2},
                args=[
                    str(args.connections),
                    str(args.hosts),
                    OLD,
                    NEW,
                    str(args.work),
                    str(tmp / "body.json"),
                ],
            )
            after = _commands(redis)
            trips += _round_trips(port) - trips_before
            for res in (noop, beat):
                _check(res)
            o, r, f = rollout_writes(beat)
            ratio = beat.requests_per_s / noop.requests_per_s
            print(
                f"[{label}] round {k + 1}: no-op {noop.requests_per_s:,.0f} req/s "
                f"(p99 {noop.p99_ms:.1f} ms); heartbeat {beat.requests_per_s:,.0f} req/s "
                f"(p50 {beat.p50_ms:.1f} ms, p99 {beat.p99_ms:.1f} ms, "
                f"{beat.requests:,} requests), ratio {ratio:.2f}x; "
                f"{o} admissions, {r} renewals, {f} completions "
                f"({(o + r + f) / (args.seconds * 2):,.0f} writes/s)",
                flush=True,
            )
            rounds.append((noop, beat, before, after))
    if args.keep_logs:
        args.keep_logs.mkdir(parents=True, exist_ok=True)
        shutil.copy(log, args.keep_logs / log.name)
    noop_rps = statistics.median(n.requests_per_s for n, _, _, _ in rounds)
    beat_rps = statistics.median(b.requests_per_s for _, b, _, _ in rounds)
    beat_p99 = statistics.median(b.p99_ms for _, b, _, _ in rounds)
    sqlite = label.startswith("sqlite")
    report(
        f"[{label}] heartbeats (median of {len(rounds)} rounds)",
        beat_rps,
        "req/s",
        ref=noop_rps,
        ref_name="same server's no-op",
        target=">= 10,000 req/s and >= 0.6x no-op" if sqlite else ">= 10,000 req/s",
    )
    report(f"[{label}] heartbeat p99 (median)", beat_p99, "ms", target="<= 25 ms")
    if label == "sqlite":
        results["sqlite"] = beat_rps
    elif "sqlite" in results:
        report(
            f"[{label}] heartbeats against the embedded store",
            beat_rps,
            "req/s",
            ref=results["sqlite"],
            ref_name="SQLite-backed hbs, same run",
            target=">= 0.7x",
        )
    report(
        f"[{label}] heartbeats against nginx",
        beat_rps,
        "req/s",
        ref=nginx_rps,
        ref_name="nginx fixed 200",
    )
    if redis is not None:
        ran = sum(a[0] - b[0] for _, _, b, a in rounds if a and b)
        sent = sum(a[1] - b[1] for _, _, b, a in rounds if a and b)
        answered = sum(beat.requests for _, beat, _, _ in rounds)
        report(
            f"[{label}] Redis commands per heartbeat (inside scripts included)",
            ran / answered,
            "commands",
        )
        report(f"[{label}] Redis commands sent per heartbeat", sent / answered, "commands")
        report(
            f"[{label}] round trips to Redis per heartbeat (hbs's count)",
            trips / answered,
            "round trips",
            target="<= 1",
        )


def rollout_writes(result: WrkResult) -> tuple[int, int, int]:
    """The admissions, renewals and completions ``heartbeat.lua`` counted in a wrk run."""
    line = next(ln for ln in result.output.splitlines() if ln.startswith("ROLLOUT"))
    o, r, f = (int(x.split("=")[1]) for x in line.split()[1:])
    return o, r, f


def publish(port: int) -> None:
    """Publish a new rollout to the new version through the falcon API."""
    import httpx

    body = {"wgeturl": "http://127.0.0.1:9/files", "version": NEW, "binfile_md5": "0" * 32}
    r = httpx.post(
        f"http://127.0.0.1:{port}/agent/upgrade", json=body, timeout=300, trust_env=False
    )
    r.raise_for_status()


nginx_rps = 0.0
results: dict[str, float] = {}


def _round_trips(port: int) -> float:
    """hbs's count of round trips to its store (0 for a store that does not count them)."""
    import httpx

    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30, trust_env=False).text
    for line in text.splitlines():
        if line.startswith("selfupgrade_store_round_trips_total "):
            return float(line.split()[1])
    return 0.0


def _check(result: WrkResult) -> None:
    if result.errors:
        sys.exit(f"{result.errors} requests failed; the figures are not valid:\n{result.output}")


def _commands(redis: RedisServer | None) -> tuple[int, int] | None:
    """Commands Redis ran (those inside scripts included) and commands clients sent (each
    a round trip, or part of a pipeline's), not counting the INFO calls made here."""
    if redis is None:
        return None
    import redis as redis_py

    client = redis_py.Redis.from_url(redis.url)
    try:
        stats = client.info("commandstats")
        ran = sum(int(v["calls"]) for k, v in stats.items() if not k.endswith("info"))
        sent = int(client.info("stats")["total_commands_processed"]) - int(
            stats.get("cmdstat_info", {}).get("calls", 0)
        )
        return ran, sent
    finally:
        client.close()


def main() -> None:
    global nginx_rps
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hosts", type=int, default=600_000)
    parser.add_argument(
        "--seconds",
        type=int,
        default=5,
        help="length of a no-op run (a heartbeat run is twice as long)",
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--settle",
        type=float,
        default=5.0,
        help="seconds of quiet after publishing a round's rollout",
    )
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument(
        "--work",
        type=int,
        default=400,
        help="requests of its connection before an admitted agent reports back",
    )
    parser.add_argument("--store", choices=["sqlite", "redis", "both"], default="both")
    parser.add_argument(
        "--stress",
        action="store_true",
        help="also run the embedded store with 2000 slots (10x the writes)",
    )
    parser.add_argument(
        "--hbs-wrapper",
        help="a Python file run instead of `-m selfupgrade.server` with the same arguments "
        "(it runs hbs itself, for example under a profiler or a stall watchdog)",
    )
    parser.add_argument(
        "--keep-logs", type=Path, help="copy each hbs log into this directory at the end"
    )
    args = parser.parse_args()
    print(f"machine: {machine()}")
    print(
        f"fleet: {args.hosts:,} hosts; wrk: {args.connections} connections on CPU "
        f"{LOAD_CPU}, servers on CPU {SERVER_CPU}"
    )
    print(
        "load: the writes of a real rollout of 600,000 hosts beating once a minute with 2000 "
        "slots (about 33 admissions, 33 renewals and 33 completions a second) come from 200 "
        "slots and agents that report back within seconds"
    )
    with tempfile.TemporaryDirectory(prefix="su-bench-hbs-") as d, nginx() as nginx_port:
        tmp = Path(d)
        (tmp / "body.json").write_text(agent_body())
        write_noop_script(tmp / "noop.lua")
        run = {
            "seconds": args.seconds,
            "connections": args.connections,
            "threads": args.connections,
        }
        wrk(f"http://127.0.0.1:{nginx_port}/fixed", tmp / "noop.lua", **{**run, "seconds": 2})
        fixed = wrk(f"http://127.0.0.1:{nginx_port}/fixed", tmp / "noop.lua", **run)
        _check(fixed)
        nginx_rps = fixed.requests_per_s
        print(
            f"nginx fixed 200 (1 worker): {fixed.requests_per_s:,.0f} req/s, p50 "
            f"{fixed.p50_ms:.1f} ms, p99 {fixed.p99_ms:.1f} ms",
            flush=True,
        )
        variants = []
        if args.store in ("sqlite", "both"):
            variants.append(("sqlite", 200))
            if args.stress:
                variants.append(("sqlite-2000-slots", 2000))
        for label, slots in variants:
            from selfupgrade.server.stores.sqlite import SqliteStore

            started = time.monotonic()
            path = tmp / f"{label}.db"
            store = SqliteStore(path)
            seed(store, args.hosts, slots)
            store.close()
            print(f"[{label}] seeded in {time.monotonic() - started:.1f} s", flush=True)
            measure(
                label, f"sqlite:{path}", args, tmp, slots=slots, nginx_port=nginx_port, redis=None
            )
        if args.store in ("redis", "both"):
            from selfupgrade.server.stores.redis import RedisStore

            with RedisServer() as redis:
                assert redis.pid is not None
                pin_pid(redis.pid, SERVER_CPU)
                started = time.monotonic()
                rstore = RedisStore(redis.url, timeout_s=60)
                seed(rstore, args.hosts, 200)
                rstore.close()
                print(f"[redis] seeded in {time.monotonic() - started:.1f} s", flush=True)
                measure(
                    "redis", redis.url, args, tmp, slots=200, nginx_port=nginx_port, redis=redis
                )


if __name__ == "__main__":
    main()
