"""Delta against full downloads: bytes transferred and time to a verified, fsynced file.

Per pair (two builds of the real Go falcon-agent, 6.1.0 and 6.1.1, from
``../shared/falcon-plus-agent/build.sh``; two builds of the example agent, 6.0.0 and 6.0.1):
the patch ``selfupgrade release patch`` would make, then the updater's own download
(``download_artifact``: sha256 while streaming, fsync) of the whole file against the same
call given the installed old file (the patch fetched, applied, the result checked against the
whole file's sha256). nginx serves both, at the wire speed of loopback and, under
``/slow/``, at 1 MB/s per connection (``limit_rate``: an 8 Mbit/s site link); nginx's access
log gives the bytes it sent. Needs nginx and zstandard (``pip install 'selfupgrade[delta]'``);
Go for the falcon-agent pair (``--skip-go`` leaves it out).

    python bench/delta.py [--skip-go] [--runs 5]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import machine, nginx, report, require
from bench.delta_formats import falcon_pair
from examples.falcon_agent.build import build
from selfupgrade import _delta
from selfupgrade._download import PatchBase, download_artifact
from selfupgrade.models import Artifact, Digest, Patch, Role, parse_version
from selfupgrade.transport.http import HttpFetcher
from selfupgrade.verify.digest import DigestVerifier

SLOW_RATE = 1_000_000  # bytes a second


def timed(artifact: Artifact, work: Path, base: PatchBase | None) -> tuple[float, bool]:
    """Seconds to a verified, fsynced file; whether it was built from the patch."""
    dest = work / "staged"
    dest.unlink(missing_ok=True)
    os.sync()  # no run pays for what the one before left dirty
    start = time.perf_counter()
    fetched = download_artifact(
        artifact,
        dest,
        fetcher=HttpFetcher(),
        verifier=DigestVerifier(),
        max_bytes=1 << 30,
        timeout_s=600,
        base=base,
    )
    return time.perf_counter() - start, fetched.patch is not None


def sent(log: Path, name: str) -> int:
    """Bytes nginx sent for the last request of ``name`` (body and headers)."""
    lines = [line.split() for line in log.read_text().splitlines()]
    return int([n for uri, n in lines if uri.endswith(f"/{name}")][-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--skip-go", action="store_true", help="only the example agent's pair")
    parser.add_argument("--runs", type=int, default=5, help="runs at wire speed (median)")
    args = parser.parse_args()
    require("nginx")
    _delta.zstandard()
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory(prefix="su-bench-delta-") as tmp:
        work = Path(tmp)
        www = work / "www"
        www.mkdir()
        pairs: list[tuple[str, bytes, bytes]] = []
        if not args.skip_go:
            require("go")
            pairs.append(("falcon-agent (Go) 6.1.0 -> 6.1.1", *falcon_pair(work / "go")))
        a, b = build("6.0.0"), build("6.0.1")
        pairs.append(("example agent 6.0.0 -> 6.0.1", a.program, b.program))
        log = work / "access.log"
        with nginx(static_root=www, workers="1", cpu=None, slow_rate="1m", access_log=log) as port:
            for i, (name, old, new) in enumerate(pairs):
                start = time.perf_counter()
                patch = _delta.make_patch(old, new)
                made_s = time.perf_counter() - start
                full_name, patch_name = f"new-{i}", f"patch-{i}.zst"
                (www / full_name).write_bytes(new)
                (www / patch_name).write_bytes(patch)
                (work / "installed").write_bytes(old)
                print(
                    f"{name}: whole file {len(new):,} bytes, patch {len(patch):,} bytes "
                    f"({len(patch) / len(new):.2%}), made in {made_s:.2f} s",
                    flush=True,
                )
                for where, prefix, runs in (
                    ("loopback", "", args.runs),
                    (f"{SLOW_RATE // 1_000_000} MB/s link", "slow/", 1),
                ):
                    base_url = f"http://127.0.0.1:{port}/{prefix}"
                    art = Artifact(
                        Role.BIN,
                        base_url + full_name,
                        Digest("sha256", hashlib.sha256(new).hexdigest()),
                        size=len(new),
                        patches=(
                            Patch(
                                parse_version("1.0"),
                                base_url + patch_name,
                                Digest("sha256", hashlib.sha256(patch).hexdigest()),
                                size=len(patch),
                            ),
                        ),
                    )
                    base = PatchBase(parse_version("1.0"), work / "installed", work / "scratch")
                    full_s, delta_s = [], []
                    for _ in range(runs + (1 if runs > 1 else 0)):  # one warm-up at wire speed
                        full_s.append(timed(art, work, None)[0])
                        seconds, patched = timed(art, work, base)
                        assert patched, "the bench's patch did not apply"
                        delta_s.append(seconds)
                    if runs > 1:
                        full_s, delta_s = full_s[1:], delta_s[1:]
                    full_bytes, delta_bytes = sent(log, full_name), sent(log, patch_name)
                    print(
                        f"  {where}: bytes sent, whole {full_bytes:,}, delta {delta_bytes:,} "
                        f"({delta_bytes / full_bytes:.2%})"
                    )
                    report(
                        f"  {where}: time to a verified, fsynced file, delta",
                        statistics.median(delta_s) * 1000,
                        "ms",
                        ref=statistics.median(full_s) * 1000,
                        ref_name="the whole file",
                    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
