"""Upgrades of a serving daemon, each way of handing its socket over, against a plain restart.

The example httpd (examples/http_daemon) upgrades ``--upgrades`` times in a row under a load
of ``--rate`` requests/s (half on keep-alive connections, half on a new connection each), for
each way of :data:`examples.http_daemon.drive.WAYS`; the ways under systemd run in a real
systemd in its own namespaces, when the machine allows it (else they are skipped, with the
reason). Per way: the requests refused and failed per upgrade, the longest time between two
answers, and the p99 latency during an upgrade against the p99 at rest of the same run. The
reference is ``none``: the same upgrades by an exec that closes the socket and binds it again.

    python bench/zero_downtime.py [--upgrades 5] [--rate 200] [--ways exec,overlap,...]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import ROOT, machine, report
from examples.http_daemon.drive import (
    WAYS,
    Upgrades,
    releases,
    running,
    systemd_python,
    upgrade_under_load,
)
from selfupgrade.testing import ArtifactServer, ControlServer, free_port
from selfupgrade.testing.systemd import Systemd, unavailable


def run_way(way: str, count: int, rate: float) -> Upgrades:
    under_systemd = WAYS[way][1] == "systemd"
    python = systemd_python() if under_systemd else None
    versions = releases(count, python)
    port = free_port()
    base = ROOT / ".bench-systemd" if under_systemd else None
    if base is not None:
        base.mkdir(exist_ok=True)
    with (
        tempfile.TemporaryDirectory(dir=base, prefix=f"{way}-") as tmp,
        ControlServer() as control,
        ArtifactServer() as files,
    ):
        workdir = Path(tmp)
        workdir.chmod(0o755)
        if under_systemd:
            with (
                Systemd() as systemd,
                running(way, workdir, control, versions[0], port, systemd) as httpd,
            ):
                return upgrade_under_load(
                    control,
                    files,
                    port,
                    versions,
                    str,
                    rate=rate,
                    restarts_unit=httpd.restarts_unit,
                )
        with running(way, workdir, control, versions[0], port):
            return upgrade_under_load(control, files, port, versions, str, rate=rate)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upgrades", type=int, default=5)
    parser.add_argument("--rate", type=float, default=200.0, help="requests per second")
    parser.add_argument("--ways", default=",".join(WAYS), help=f"of {', '.join(WAYS)}")
    args = parser.parse_args()
    ways = [w.strip() for w in args.ways.split(",") if w.strip()]
    unknown = [w for w in ways if w not in WAYS]
    if unknown:
        parser.error(f"unknown ways {unknown}; the ways are {', '.join(WAYS)}")
    if "none" not in ways:
        ways.append("none")  # the reference
    print(f"# zero-downtime upgrades: {args.upgrades} per way at {args.rate:g} req/s; {machine()}")
    no_systemd = unavailable() or (
        None if systemd_python() else "no /usr/bin/python3 of this version"
    )
    figures: dict[str, Upgrades] = {}
    for way in ways:
        if WAYS[way][1] == "systemd" and no_systemd:
            print(f"{way}: skipped ({no_systemd})")
            continue
        figures[way] = run_way(way, args.upgrades, args.rate)
    ref = figures["none"]
    ref_gap = max(r.longest_gap_s for r in ref.each) * 1000
    for way, done in figures.items():
        handoff, manager = WAYS[way]
        lost = [r.refused + r.failed for r in done.each]
        print(
            f"{way} ({handoff} under {manager}): {sum(len(r.requests) for r in done.each)} "
            f"requests in {len(done.each)} upgrades; refused {sum(r.refused for r in done.each)}"
            f", failed {sum(r.failed for r in done.each)}, retried "
            f"{sum(r.retried for r in done.each)}"
        )
        report(
            f"{way}: requests lost per upgrade (max)",
            max(lost),
            "requests",
            ref=max(r.refused + r.failed for r in ref.each),
            ref_name="no hand-off",
        )
        report(
            f"{way}: longest gap between answers (max)",
            max(r.longest_gap_s for r in done.each) * 1000,
            "ms",
            ref=ref_gap,
            ref_name="no hand-off",
        )
        during = statistics.median(r.latency_s(0.99) for r in done.each) * 1000
        report(
            f"{way}: p99 latency during an upgrade (median of upgrades)",
            during,
            "ms",
            ref=done.at_rest.latency_s(0.99) * 1000,
            ref_name="at rest",
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
