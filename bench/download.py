"""The agent's download of a 64 MiB artifact (sha256 computed while streaming, file fsynced)
against ``curl -o file`` fetching the same file from the same nginx, in the same run.

nginx (its usual worker per CPU) serves the file; the clients run one after the other, in
alternation, ``--runs`` times each, unpinned, each after a ``sync`` (so that neither pays
for writing back what the other left dirty); the figure of each is its median. curl is a new
process each time; selfupgrade's figure is its second download in a process (an agent is a
long-running process), the first is printed beside it.

    python bench/download.py [--mib 64] [--runs 9]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import machine, nginx, report, require

_CHILD = """
import sys, time
from pathlib import Path
from selfupgrade._download import download_artifact
from selfupgrade.models import Artifact, Digest, Role
from selfupgrade.transport.http import HttpFetcher
from selfupgrade.verify.digest import DigestVerifier
url, digest, dest = sys.argv[1:4]
artifact = Artifact(Role.BIN, url, Digest.parse(digest))
fetcher = HttpFetcher()
for name in ("first", "second"):
    started = time.perf_counter()
    download_artifact(artifact, Path(dest + name), fetcher=fetcher, verifier=DigestVerifier(),
                      max_bytes=1 << 40, timeout_s=600)
    print(time.perf_counter() - started)
if sys.argv[4:] == ["profile"]:
    # Where the time goes: the same client's 1 MiB reads written to a file with neither
    # digest nor fsync; then sha256 and fsync of the same bytes alone.
    import hashlib, os
    from selfupgrade.transport.http import HttpSettings
    with HttpSettings().client(read_bytes=1 << 20) as client:
        for name in ("plain1", "plain2"):
            started = time.perf_counter()
            with client.stream("GET", url) as r, open(dest + name, "wb") as f:
                for chunk in r.iter_raw(1 << 20):
                    f.write(chunk)
            plain = time.perf_counter() - started
    data = Path(dest + "second").read_bytes()
    started = time.perf_counter()
    hashlib.sha256(data).digest()
    hashing = time.perf_counter() - started
    with open(dest + "fsync", "wb") as f:
        f.write(data)
        f.flush()
        started = time.perf_counter()
        os.fsync(f.fileno())
        syncing = time.perf_counter() - started
    print(plain, hashing, syncing)
"""


def ours(url: str, digest: str, dest: Path, profile: bool = False) -> list[float]:
    """Seconds for selfupgrade's download in a fresh process: its first, and a second in the
    same process (an agent is a long-running process: its allocator has grown); with
    ``profile``, then those of a plain download (same client, no digest, no fsync), of
    sha256 over the bytes, and of their fsync."""
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, url, digest, str(dest), *(["profile"] if profile else [])],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
        cwd=Path(__file__).resolve().parent.parent,
    )
    return [float(x) for x in out.stdout.split()]


def curl(url: str, dest: Path) -> float:
    """Seconds for ``curl -o dest url`` (time measured by curl itself)."""
    out = subprocess.run(
        ["curl", "-sS", "--fail", "-o", str(dest), "-w", "%{time_total}", url],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    return float(out.stdout.strip())


def pipeline(url: str, dest: Path, digest: str) -> float:
    """Seconds for the careful shell way to do selfupgrade's work: ``curl | tee file |
    sha256sum`` (the digest checked), then ``sync file`` (an fsync of that file), processes
    started included, as a shell script pays for them."""
    script = 'curl -sS --fail "$1" | tee "$2" | sha256sum && sync "$2"'
    started = time.perf_counter()
    out = subprocess.run(
        ["sh", "-c", script, "sh", url, str(dest)],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    took = time.perf_counter() - started
    if out.stdout.split()[0] != digest.removeprefix("sha256:"):
        raise SystemExit(f"the pipeline's sha256 is wrong: {out.stdout!r}")
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--runs", type=int, default=9)
    args = parser.parse_args()
    require("curl")
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory(prefix="su-bench-dl-") as d:
        tmp = Path(d)
        (tmp / "www").mkdir()
        data = os.urandom(args.mib << 20)
        (tmp / "www" / "agent.bin").write_bytes(data)
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        size = len(data)
        del data
        with nginx(static_root=tmp / "www", workers="auto", cpu=None) as port:
            url = f"http://127.0.0.1:{port}/agent.bin"
            ours_s, curl_s, pipe_s = [], [], []
            profile: list[list[float]] = []
            for k in range(args.runs + 1):
                for dest in tmp.glob("out-*"):
                    dest.unlink()
                os.sync()  # neither client pays for writing back what the other left dirty
                c = curl(url, tmp / "out-curl")
                os.sync()
                piped = pipeline(url, tmp / "out-pipe", digest)
                os.sync()
                first, o, *parts = ours(url, digest, tmp / "out-ours-", profile=k > 0)
                if parts:
                    profile.append(parts)
                if k:  # the first pair warms the page cache and nginx
                    curl_s.append(c)
                    ours_s.append(o)
                    pipe_s.append(piped)
                    print(
                        f"run {k}: curl {size / c / 1e6:,.0f} MB/s, "
                        f"curl | tee | sha256sum; sync {size / piped / 1e6:,.0f} MB/s, "
                        f"selfupgrade {size / o / 1e6:,.0f} MB/s (its first download in a "
                        f"new process: {size / first / 1e6:,.0f} MB/s)",
                        flush=True,
                    )
    curl_rate = size / statistics.median(curl_s) / 1e6
    ours_rate = size / statistics.median(ours_s) / 1e6
    report(
        f"download of {args.mib} MiB (sha256 while streaming, fsync)",
        ours_rate,
        "MB/s",
        ref=curl_rate,
        ref_name="curl -o file, same server",
        target=">= 0.8x curl",
    )
    report(
        f"download of {args.mib} MiB (sha256 while streaming, fsync)",
        ours_rate,
        "MB/s",
        ref=size / statistics.median(pipe_s) / 1e6,
        ref_name="curl | tee file | sha256sum; sync file",
        target=">= 1.0x the pipeline",
    )
    plain, hashing, syncing = (statistics.median(p[i] for p in profile) for i in range(3))
    report(
        "  where the time goes: the same client without digest or fsync",
        size / plain / 1e6,
        "MB/s",
        ref=curl_rate,
        ref_name="curl",
    )
    whole = {
        "curl": statistics.median(curl_s),
        "the pipeline": statistics.median(pipe_s),
        "selfupgrade": statistics.median(ours_s),
    }
    print(
        f"  where the time goes: sha256 of {args.mib} MiB alone {hashing * 1e3:.0f} ms, "
        f"fsync of {args.mib} MiB {syncing * 1e3:.0f} ms; whole downloads: "
        + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in whole.items())
    )


if __name__ == "__main__":
    main()
