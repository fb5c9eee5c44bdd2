"""Two hbs processes on one Redis: aggregate heartbeats per second and Redis's CPU per
heartbeat, against one hbs process on the same Redis in the same run (the reference).

Redis is seeded as ``bench/hbs_heartbeat.py`` seeds it (``--hosts`` hosts on the old version,
a rollout to the new one with 200 slots). wrk plays the fleet (``heartbeat.lua``). Both hbs
processes start, warm up (a no-op run, a heartbeat run on each, then ``--settle`` seconds of
quiet), then:

* one hbs: wrk against hbs A, laid out as ``hbs_heartbeat.py`` lays it out (hbs A and Redis
  on CPU 0, wrk on CPU 1; hbs B idles on CPU 1), so its figure is comparable with that one's;
* two hbs: one wrk against each at once, each with the connections of the first; hbs A on
  CPU 0, hbs B on CPU 1, Redis and the two wrk where the kernel puts them.

Redis's CPU is ``INFO cpu`` (user + system) over each run. On two CPUs the two-process figure
is bounded by the machine (two hbs, two wrk and Redis share two cores); what carries to a
larger machine is Redis's CPU per heartbeat, from which the sizing table in
docs/operators-guide.md follows.

    python bench/hbs_replicas.py [--hosts 600000] [--seconds 10] [--connections 32]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis as redis_py

from bench._common import (
    BENCH,
    LOAD_CPU,
    SERVER_CPU,
    WrkResult,
    machine,
    pin_pid,
    pinned,
    process,
    report,
    wait_http,
    wrk,
)
from bench.hbs_heartbeat import NEW, OLD, agent_body, rollout_writes, seed, write_noop_script
from selfupgrade.server.stores.redis import RedisStore
from selfupgrade.testing.redis_server import RedisServer, free_port


def redis_cpu(client: redis_py.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hosts", type=int, default=600_000)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--settle", type=float, default=5.0, help="quiet after the warm-up, s")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory(prefix="su-bench-replicas-") as d, RedisServer() as redis:
        tmp = Path(d)
        body = tmp / "body.json"
        body.write_text(agent_body())
        noop = tmp / "noop.lua"
        write_noop_script(noop)
        store = RedisStore(redis.url, timeout_s=60)
        seed(store, args.hosts, 200)
        store.close()
        client = redis_py.Redis.from_url(redis.url)
        ports = [free_port(), free_port()]
        hbs = []
        for i, port in enumerate(ports):
            argv = [
                sys.executable, "-m", "selfupgrade.server", "--http", f"127.0.0.1:{port}",
                "--rpc", "off", "--store", redis.url, "--queue", "200",
                "--no-artifact-check", "--failure-limit", str(10**9), "--bench-noop",
                "--log-level", "warning",
            ]  # fmt: skip
            hbs.append(process(pinned(argv, str(i)), log=tmp / f"hbs-{i}.log"))
        with hbs[0] as a, hbs[1] as b:
            for port, proc in zip(ports, (a, b), strict=True):
                wait_http(f"http://127.0.0.1:{port}/health", timeout_s=300, proc=proc)

            def load(port: int, out: list[WrkResult], cpu: str | None) -> None:
                out.append(
                    wrk(
                        f"http://127.0.0.1:{port}/selfupgrade/v1/heartbeat",
                        BENCH / "heartbeat.lua",
                        seconds=args.seconds,
                        connections=args.connections,
                        threads=args.connections,
                        args=[str(args.connections), str(args.hosts), OLD, NEW, "400", str(body)],
                        cpu=cpu,
                    )
                )

            # warm-up: each hbs's first seconds (its start's own work, the first housekeeping)
            for port in ports:
                wrk(
                    f"http://127.0.0.1:{port}/selfupgrade/v1/noop",
                    noop,
                    seconds=2,
                    connections=args.connections,
                    threads=args.connections,
                )
                load(port, [], LOAD_CPU)
            time.sleep(args.settle)

            figures = {}
            assert redis.pid is not None
            for label, targets, redis_cpus, wrk_cpu in (
                ("one hbs", ports[:1], SERVER_CPU, LOAD_CPU),
                ("two hbs", ports, "0,1", None),
            ):
                pin_pid(redis.pid, redis_cpus)
                results: list[WrkResult] = []
                cpu, started = redis_cpu(client), time.monotonic()
                threads = [
                    threading.Thread(target=load, args=(p, results, wrk_cpu)) for p in targets
                ]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                elapsed, cpu = time.monotonic() - started, redis_cpu(client) - cpu
                errors = sum(r.errors for r in results)
                rps = sum(r.requests_per_s for r in results)
                answered = sum(r.requests for r in results)
                figures[label] = rps
                writes = [sum(w) for w in zip(*(rollout_writes(r) for r in results), strict=True)]
                print(
                    f"{label}: {rps:,.0f} heartbeats/s in all "
                    f"({', '.join(f'{r.requests_per_s:,.0f}' for r in results)}; p99 "
                    f"{max(r.p99_ms for r in results):.1f} ms; {errors} errors); Redis CPU "
                    f"{cpu / elapsed:.0%} of a core, {cpu / answered * 1e6:.1f} us per "
                    f"heartbeat; {writes[0]} admissions, {writes[1]} renewals, {writes[2]} "
                    "completions",
                    flush=True,
                )
    report(
        "two hbs processes on one Redis: heartbeats/s in all",
        figures["two hbs"],
        "req/s",
        ref=figures["one hbs"],
        ref_name="one hbs on the same Redis, same run",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
