"""Which patch format for delta updates: patch size, time to make, time and peak memory to
apply, on real data, each against the full download (issue 15, point 2: the measured reason).

The data: two builds of the real Go falcon-agent (``../shared/falcon-plus-agent/build.sh``,
6.1.0 and 6.1.1) and two builds of the example falcon agent (6.0.0 and 6.0.1). The formats:
bsdiff4, zstd's patch-from mode (the old file as a raw-content dictionary, through
``zstandard``), and detools (bsdiff with lzma), each where its package is installed. Each
apply runs in a fresh child process that prints its own peak RSS; a child that only reads the
two files is the baseline, so the figure is what applying adds (the child's high-water mark,
``VmHWM``: ``ru_maxrss`` would include the parent's, which Linux carries across exec).

Run: ``python bench/delta_formats.py`` (needs Go and build.sh's Debian packages for the first
pair; ``pip install bsdiff4 zstandard detools`` for the formats).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import machine
from examples.falcon_agent.build import build

ROOT = Path(__file__).resolve().parents[1]
FALCON_SRC = Path(
    os.environ.get("SELFUPGRADE_FALCON_AGENT_SRC", ROOT.parent / "shared" / "falcon-plus-agent")
)

_APPLY = r"""
import sys, time
from pathlib import Path
fmt, old_path, patch_path, out_path = sys.argv[1:5]
old = Path(old_path).read_bytes()
patch = Path(patch_path).read_bytes()
start = time.perf_counter()
if fmt == "baseline":
    new = old
elif fmt == "bsdiff4":
    import bsdiff4
    new = bsdiff4.patch(old, patch)
elif fmt == "zstd":
    import zstandard
    d = zstandard.ZstdCompressionDict(old, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    new = zstandard.ZstdDecompressor(dict_data=d, max_window_size=1 << 31).decompress(patch)
elif fmt == "detools":
    import detools, io
    out = io.BytesIO()
    detools.apply_patch(io.BytesIO(old), io.BytesIO(patch), out)
    new = out.getvalue()
elapsed = time.perf_counter() - start
Path(out_path).write_bytes(new)
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across exec
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(int(hwm.split()[1]), elapsed)
"""


def window_log(*sizes: int) -> int:
    """A zstd window that reaches back over the whole old file into the new one."""
    return max(10, (max(sizes) * 2 - 1).bit_length())


def make(fmt: str, old: bytes, new: bytes) -> bytes:
    if fmt == "bsdiff4":
        import bsdiff4

        return bytes(bsdiff4.diff(old, new))
    if fmt == "zstd":
        import zstandard

        d = zstandard.ZstdCompressionDict(old, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
        params = zstandard.ZstdCompressionParameters.from_level(
            19, window_log=window_log(len(old), len(new)), enable_ldm=True, source_size=len(new)
        )
        return bytes(zstandard.ZstdCompressor(dict_data=d, compression_params=params).compress(new))
    if fmt == "detools":
        import io

        import detools

        out = io.BytesIO()
        detools.create_patch(io.BytesIO(old), io.BytesIO(new), out, compression="lzma")
        return out.getvalue()
    raise ValueError(fmt)


def apply_in_child(fmt: str, old: Path, patch: Path, out: Path) -> tuple[int, float]:
    """Peak RSS (KiB) and apply time of a fresh process applying ``patch`` to ``old``."""
    done = subprocess.run(
        [sys.executable, "-c", _APPLY, fmt, str(old), str(patch), str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    rss, elapsed = done.stdout.split()
    return int(rss), float(elapsed)


def falcon_pair(workdir: Path) -> tuple[bytes, bytes]:
    subprocess.run(
        ["sh", str(FALCON_SRC / "build.sh"), str(workdir), "6.1.0", "6.1.1"],
        check=True,
        capture_output=True,
        timeout=900,
    )
    old = (workdir / "falcon-agent-6.1.0").read_bytes()
    new = (workdir / "falcon-agent-6.1.1").read_bytes()
    return old, new


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--skip-go", action="store_true", help="only the example agent's pair")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    formats = [
        f
        for f, module in (("bsdiff4", "bsdiff4"), ("zstd", "zstandard"), ("detools", "detools"))
        if importlib.util.find_spec(module) is not None
    ]
    missing = {"bsdiff4", "zstd", "detools"} - set(formats)
    if missing:
        print(f"not installed, not measured: {', '.join(sorted(missing))}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        pairs: list[tuple[str, bytes, bytes]] = []
        if not args.skip_go:
            old, new = falcon_pair(work / "go")
            pairs.append(("falcon-agent (Go) 6.1.0 -> 6.1.1", old, new))
        a, b = build("6.0.0"), build("6.0.1")
        pairs.append(("example agent 6.0.0 -> 6.0.1", a.program, b.program))
        rows = []
        for name, old, new in pairs:
            (work / "old").write_bytes(old)
            (work / "none").write_bytes(b"")
            base_rss, _ = apply_in_child("baseline", work / "old", work / "none", work / "out")
            print(f"{name}: old {len(old):,} bytes, new {len(new):,} bytes (the full download)")
            for fmt in formats:
                start = time.perf_counter()
                patch = make(fmt, old, new)
                made_s = time.perf_counter() - start
                (work / "patch").write_bytes(patch)
                rss, apply_s = apply_in_child(fmt, work / "old", work / "patch", work / "out")
                same = (work / "out").read_bytes() == new
                row = {
                    "pair": name,
                    "format": fmt,
                    "patch_bytes": len(patch),
                    "ratio": len(patch) / len(new),
                    "make_s": made_s,
                    "apply_s": apply_s,
                    "apply_peak_mib": (rss - base_rss) / 1024,
                    "exact": same,
                }
                rows.append(row)
                print(
                    f"  {fmt:8} patch {len(patch):>10,} bytes ({row['ratio']:.5f}x the full file); "
                    f"made in {made_s:.2f} s; applied in {apply_s:.3f} s, "
                    f"+{row['apply_peak_mib']:.1f} MiB peak; result exact: {same}"
                )
        print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
