"""What the benchmark scripts share: processes stopped by PID, wrk runs, nginx, output.

Every benchmark prints lines of the form ``name: figure unit (reference: figure, ratio x)``
and starts each reference in the same run as the thing it is compared with.
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

from selfupgrade.testing.harness import stop_pid
from selfupgrade.testing.redis_server import free_port

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"

__all__ = [
    "BENCH",
    "LOAD_CPU",
    "ROOT",
    "SERVER_CPU",
    "WrkResult",
    "machine",
    "nginx",
    "pin_pid",
    "pinned",
    "process",
    "report",
    "require",
    "wait_http",
    "wrk",
]


# On a machine with two or more CPUs, the server under test runs on CPU 0 and the load
# generator on CPU 1, so that wrk's own work does not eat into the server's (on 2 cores,
# unpinned, it costs the server a third of its throughput, and more from run to run).
SERVER_CPU, LOAD_CPU = "0", "1"


def pinned(argv: Sequence[str], cpu: str) -> list[str]:
    """``argv`` run on ``cpu`` (with taskset), when the machine has two CPUs or more."""
    if (os.cpu_count() or 1) >= 2 and shutil.which("taskset"):
        return ["taskset", "-c", cpu, *argv]
    return list(argv)


def pin_pid(pid: int, cpu: str) -> None:
    """Move a running process (all its threads) to ``cpu``."""
    if (os.cpu_count() or 1) >= 2 and shutil.which("taskset"):
        subprocess.run(
            ["taskset", "-a", "-p", "-c", cpu, str(pid)], capture_output=True, check=True
        )


def require(*tools: str) -> None:
    """Exit with a clear message if a tool the benchmark needs is missing."""
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        sys.exit(
            f"this benchmark needs {', '.join(missing)} (Debian: apt-get install "
            f"{' '.join(missing)})"
        )


def machine() -> str:
    """One line about the machine the figures come from."""
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = ""
    with contextlib.suppress(OSError, ValueError, IndexError):
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kib / 2**20:.0f} GiB"
    return (
        f"{os.cpu_count()} CPU ({model or platform.processor()}){mem}, "
        f"{platform.system()} {platform.release()}, Python {platform.python_version()}"
    )


def report(
    name: str,
    value: float,
    unit: str,
    *,
    ref: float | None = None,
    ref_name: str = "",
    target: str = "",
) -> None:
    """Print one figure, with its reference and ratio when given."""
    text = f"{name}: {value:,.{_digits(value)}f} {unit}"
    if ref is not None:
        ratio = value / ref if ref else float("inf")
        text += f" (reference {ref_name}: {ref:,.{_digits(ref)}f} {unit}, ratio {ratio:.2f}x)"
    if target:
        text += f" [target {target}]"
    print(text, flush=True)


def _digits(value: float) -> int:
    return 0 if abs(value) >= 100 else 1 if abs(value) >= 10 else 2


@contextlib.contextmanager
def process(
    argv: Sequence[str], *, log: Path, env: dict[str, str] | None = None, cwd: Path = ROOT
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``argv`` with output to ``log``; stop it by PID on the way out, whatever happens."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            list(argv),
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
    try:
        yield proc
    finally:
        stop_pid(proc.pid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)


def wait_http(
    url: str,
    *,
    timeout_s: float,
    proc: subprocess.Popen[bytes] | None = None,
    log: Path | None = None,
) -> None:
    """Wait until ``url`` answers 200; fail with the log's tail if the process died."""
    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=2, trust_env=False) as client:
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                tail = log.read_text(errors="replace")[-2000:] if log else ""
                raise RuntimeError(f"{proc.args} exited with {proc.returncode}:\n{tail}")
            with contextlib.suppress(httpx.HTTPError):
                if client.get(url).status_code == 200:
                    return
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout_s:.0f} s")


@contextlib.contextmanager
def nginx(
    *,
    static_root: Path | None = None,
    workers: str = "1",
    cpu: str | None = SERVER_CPU,
    slow_rate: str | None = None,
    access_log: Path | None = None,
) -> Iterator[int]:
    """nginx on 127.0.0.1 and a free port: ``POST /fixed`` answers a fixed 200 JSON body;
    other paths serve ``static_root``, and ``/slow/<path>`` the same file at ``slow_rate``
    bytes a second per connection (nginx's ``limit_rate``, e.g. ``"1m"``), when given. With
    ``access_log``, each request's URI and bytes sent are written there as it ends. By
    default one worker on the server's CPU, like hbs. Yields the port."""
    require("nginx")
    port = free_port()
    tmp = Path(tempfile.mkdtemp(prefix="su-bench-nginx-"))
    root = static_root or tmp
    user = "user root;" if os.geteuid() == 0 else ""
    (tmp / "nginx.conf").write_text(
        f"""
{user}
worker_processes {workers};
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    log_format sent '$request_uri $bytes_sent';
    access_log {f"{access_log} sent" if access_log else "off"};
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    sendfile on;
    keepalive_requests 1000000;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        {f"location /slow/ {{ alias {root}/; limit_rate {slow_rate}; }}" if slow_rate else ""}
        location = /fixed {{
            default_type application/json;
            return 200 '{{"order":null}}';
        }}
    }}
}}
"""
    )
    try:
        with process(
            ["nginx", "-p", str(tmp), "-c", str(tmp / "nginx.conf")], log=tmp / "stdout.log"
        ) as proc:
            deadline = time.monotonic() + 10
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.post(f"http://127.0.0.1:{port}/fixed", trust_env=False).is_success:
                        break
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        "nginx did not start: " + (tmp / "error.log").read_text(errors="replace")
                    )
                time.sleep(0.05)
            yield port
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@dataclass(frozen=True)
class WrkResult:
    """What one wrk run measured."""

    requests_per_s: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int
    output: str


def wrk(
    url: str,
    script: Path,
    *,
    seconds: int,
    connections: int,
    threads: int,
    args: Sequence[str] = (),
    cpu: str | None = LOAD_CPU,
) -> WrkResult:
    """Run wrk with ``script`` on ``cpu`` (``None``: where the kernel puts it) and return its
    figures; non-2xx answers count as errors."""
    require("wrk")
    argv = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{seconds}s",
        "--latency",
        "-s",
        str(script),
        url,
    ]
    if args:
        argv += ["--", *args]
    if cpu is not None:
        argv = pinned(argv, cpu)
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60, check=True)
    text = out.stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))  # type: ignore[union-attr]
    requests = int(re.search(r"(\d+) requests in", text).group(1))  # type: ignore[union-attr]
    errors = 0
    for pattern in (
        r"Non-2xx or 3xx responses: (\d+)",
        r"Socket errors: connect (\d+), "
        r"read (\d+), write (\d+), timeout (\d+)",
    ):
        m = re.search(pattern, text)
        if m:
            errors += sum(int(g) for g in m.groups())
    return WrkResult(
        rps, _percentile(text, "50%"), _percentile(text, "99%"), requests, errors, text
    )


def _percentile(text: str, label: str) -> float:
    m = re.search(rf"^\s+{re.escape(label)}\s+([\d.]+)(us|ms|s)\s*$", text, re.MULTILINE)
    if m is None:
        return float("nan")
    value, unit = float(m.group(1)), m.group(2)
    return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value
