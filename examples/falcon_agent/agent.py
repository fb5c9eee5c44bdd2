#!/usr/bin/env python3
"""falcon-agent: a falcon-style host agent that upgrades itself with selfupgrade.

It collects a few host metrics with psutil (cpu, memory, disk, load, uptime), serves them and
its own process metrics in Prometheus text format on ``/metrics``, heartbeats to hbs with its
hostname and version, and upgrades itself when hbs says so.

    falcon-agent -c cfg.json

The version is baked into this file (``VERSION`` below), as falcon-agent's is compiled in.
Host-specific settings come from the environment, so one cfg.json (which upgrades replace)
serves every host: FALCON_AGENT_HOSTNAME, FALCON_AGENT_HBS (heartbeat address),
FALCON_AGENT_STATE_DIR, FALCON_AGENT_HTTP (metrics listen address, or "off"),
FALCON_AGENT_RESTARTER (systemd, supervisor or exec), FALCON_AGENT_PROGRAM (supervisord name),
FALCON_AGENT_LABELS (host labels for targeting, ``dc=bj,role=db``), FALCON_AGENT_TOKEN (the
heartbeat token, when hbs requires one).
"""

from __future__ import annotations

VERSION = "6.0.0"
HEALTHY = True  # a build for tests and demos can make a release that fails its health check
SAYS_READY = True  # ... or one that hangs before it tells systemd READY=1
PETS_WATCHDOG = True  # ... or one that never pets systemd's watchdog

import argparse  # noqa: E402 - VERSION stays the first statement, where the build stamps it
import http.server  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import psutil  # noqa: E402

import selfupgrade as su  # noqa: E402
from selfupgrade.transport import FalconRpcTransport  # noqa: E402

log = logging.getLogger("falcon-agent")

DEFAULTS: dict[str, Any] = {
    "hostname": "",
    "heartbeat": {
        "addr": "http://127.0.0.1:6031/selfupgrade/v1/heartbeat",
        "interval": 60,
        "timeout": 5000,
        "transport": "http",
        "token": "",
        "ca_file": "",
    },
    "trust": {"keys": [], "threshold": 1, "product": "falcon-agent", "platform": "linux-x86_64"},
    "self_upgrade": True,
    "http": {"enabled": True, "listen": "127.0.0.1:1988"},
    "collect_interval": 10,
    "state_dir": "/var/lib/falcon-agent",
    "releases_root": "",
    "restarter": "systemd",
    "supervisor_program": "falcon-agent",
    "confirm_timeout_s": 60,
    "max_starts": 2,
    "failure_backoff_s": 60,
    "allow_md5": True,
    "labels": {},
}


def load_config(path: Path) -> dict[str, Any]:
    """cfg.json over the defaults, then the FALCON_AGENT_* environment over both."""
    cfg = json.loads(json.dumps(DEFAULTS))
    for key, value in json.loads(path.read_text()).items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key].update(value)
        else:
            cfg[key] = value
    env = os.environ
    cfg["hostname"] = env.get("FALCON_AGENT_HOSTNAME") or cfg["hostname"] or socket.gethostname()
    cfg["heartbeat"]["addr"] = env.get("FALCON_AGENT_HBS", cfg["heartbeat"]["addr"])
    cfg["heartbeat"]["token"] = env.get("FALCON_AGENT_TOKEN", cfg["heartbeat"]["token"])
    cfg["state_dir"] = env.get("FALCON_AGENT_STATE_DIR", cfg["state_dir"])
    cfg["releases_root"] = env.get("FALCON_AGENT_RELEASES", cfg["releases_root"])
    cfg["restarter"] = env.get("FALCON_AGENT_RESTARTER", cfg["restarter"])
    cfg["supervisor_program"] = env.get("FALCON_AGENT_PROGRAM", cfg["supervisor_program"])
    labels = env.get("FALCON_AGENT_LABELS")
    if labels:
        cfg["labels"] = dict(item.split("=", 1) for item in labels.split(",") if "=" in item)
    listen = env.get("FALCON_AGENT_HTTP")
    if listen == "off":
        cfg["http"]["enabled"] = False
    elif listen:
        cfg["http"]["listen"] = listen
    return cfg


class Collector:
    """Samples host metrics every ``interval_s`` in a thread."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self.values: dict[str, float] = {}
        self.samples = 0
        self._stop = threading.Event()
        psutil.cpu_percent(None)  # the first call only primes the counter

    def sample(self) -> None:
        """Take one sample."""
        mem = psutil.virtual_memory()
        disk = psutil.disk_usage("/")
        load1, load5, load15 = os.getloadavg()
        self.values = {
            "host_cpu_percent": psutil.cpu_percent(None),
            "host_memory_total_bytes": float(mem.total),
            "host_memory_available_bytes": float(mem.available),
            "host_disk_total_bytes": float(disk.total),
            "host_disk_used_bytes": float(disk.used),
            "host_load1": load1,
            "host_load5": load5,
            "host_load15": load15,
            "host_uptime_seconds": time.time() - psutil.boot_time(),
        }
        self.samples += 1

    def run(self) -> None:
        """Sample until :meth:`stop`."""
        while True:
            try:
                self.sample()
            except OSError as exc:
                log.warning("metric collection failed: %s", exc)
            if self._stop.wait(self.interval_s):
                return

    def stop(self) -> None:
        """Stop sampling."""
        self._stop.set()


def process_metrics() -> dict[str, tuple[str, str, float]]:
    """The standard Prometheus process metrics: name -> (type, help, value)."""
    proc = psutil.Process()
    with proc.oneshot():
        cpu = proc.cpu_times()
        mem = proc.memory_info()
        fds = proc.num_fds()
        started = proc.create_time()
    return {
        "process_cpu_seconds_total": (
            "counter",
            "Total user and system CPU time spent in seconds.",
            cpu.user + cpu.system,
        ),
        "process_resident_memory_bytes": ("gauge", "Resident memory size in bytes.", mem.rss),
        "process_virtual_memory_bytes": ("gauge", "Virtual memory size in bytes.", mem.vms),
        "process_open_fds": ("gauge", "Number of open file descriptors.", fds),
        "process_max_fds": (
            "gauge",
            "Maximum number of open file descriptors.",
            resource.getrlimit(resource.RLIMIT_NOFILE)[0],
        ),
        "process_start_time_seconds": (
            "gauge",
            "Start time of the process since unix epoch in seconds.",
            started,
        ),
    }


def exposition(collector: Collector) -> str:
    """All metrics in the Prometheus text format, version 0.0.4."""
    lines = []
    for name, (kind, text, value) in process_metrics().items():
        lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", f"{name} {value!r}"]
    lines += [
        "# HELP falcon_agent_info The running agent.",
        "# TYPE falcon_agent_info gauge",
        f'falcon_agent_info{{version="{VERSION}"}} 1',
    ]
    for name, value in collector.values.items():
        lines += [f"# TYPE {name} gauge", f"{name} {value!r}"]
    return "\n".join(lines) + "\n"


def serve_metrics(listen: str, collector: Collector) -> http.server.ThreadingHTTPServer:
    """Serve /metrics, /health and /version on ``listen`` (HOST:PORT) in a thread."""
    host, _, port = listen.rpartition(":")

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            if self.path == "/metrics":
                body, kind = exposition(collector).encode(), "text/plain; version=0.0.4"
            elif self.path == "/health":
                body, kind = b"ok\n", "text/plain"
            elif self.path == "/version":
                body, kind = f"{VERSION}\n".encode(), "text/plain"
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = http.server.ThreadingHTTPServer((host, int(port)), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def make_updater(cfg: dict[str, Any], here: Path, collector: Collector) -> su.Updater:
    """The updater, configured from cfg."""
    hb = cfg["heartbeat"]
    timeout_s = float(hb["timeout"]) / 1000
    token = hb.get("token") or None
    settings = su.HttpSettings(
        connect_timeout_s=timeout_s, read_timeout_s=10, verify=hb.get("ca_file") or True
    )
    if hb["transport"] == "rpc":
        transport: su.Transport = FalconRpcTransport(
            hb["addr"], timeout_s=max(timeout_s, 1.0), token=token
        )
    else:
        transport = su.HttpTransport(hb["addr"], settings=settings, token=token)
    verifier: su.Verifier = su.DigestVerifier(allow_md5=bool(cfg["allow_md5"]))
    trust = cfg["trust"]
    if trust["keys"]:
        # with trusted keys configured, only signed releases are installed
        from selfupgrade.verify.signature import SignatureVerifier, load_public_key

        verifier = SignatureVerifier(
            [load_public_key(Path(p).read_bytes()) for p in trust["keys"]],
            threshold=int(trust["threshold"]),
            product=trust["product"],
            platform=trust["platform"],
        )
    kind = cfg["restarter"]
    restarter: su.Restarter
    if kind == "supervisor":
        restarter = su.SupervisorRestarter(cfg["supervisor_program"])
    elif kind == "exec":
        restarter = su.ExecRestarter(guard_state_dir=cfg["state_dir"])
    else:
        restarter = su.SystemdRestarter()
    installer: su.Installer
    if cfg["releases_root"]:
        # release directories: <root>/releases/<version>/, the service runs <root>/current/...
        installer = su.ReleaseInstaller(cfg["releases_root"], state_dir=cfg["state_dir"])
        files_dir = Path(cfg["releases_root"]) / "current"
    else:
        installer = su.TripleInstaller(cfg["state_dir"])
        files_dir = here
    return su.Updater(
        version=VERSION,
        layout=su.Layout(files_dir, {su.Role.BIN: Path(sys.argv[0]).name, su.Role.CFG: "cfg.json"}),
        transport=transport,
        installer=installer,
        restarter=restarter,
        config=su.UpdaterConfig(
            host=cfg["hostname"],
            interval_s=float(hb["interval"]),
            labels=cfg["labels"],
            failure_backoff_s=float(cfg["failure_backoff_s"]),
            confirm=su.ConfirmPolicy(
                max_starts=int(cfg["max_starts"]), timeout_s=float(cfg["confirm_timeout_s"])
            ),
        ),
        verifier=verifier,
        fetcher=su.HttpFetcher(settings=settings),
        health_check=lambda: HEALTHY and collector.samples > 0,
    )


def main(argv: list[str] | None = None) -> int:
    """Run the agent until SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser(prog="falcon-agent", description=__doc__.splitlines()[1])
    parser.add_argument("-c", "--config", type=Path, help="cfg.json (default: beside the program)")
    parser.add_argument("-v", "--version", action="version", version=VERSION)
    args = parser.parse_args(argv)
    here = Path(sys.argv[0]).resolve().parent
    cfg = load_config(args.config or here / "cfg.json")
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format=f"%(asctime)s falcon-agent {VERSION} [{cfg['hostname']}] %(name)s: %(message)s",
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    collector = Collector(float(cfg["collect_interval"]))
    threading.Thread(target=collector.run, daemon=True, name="collector").start()
    server = serve_metrics(cfg["http"]["listen"], collector) if cfg["http"]["enabled"] else None
    if server is not None:
        log.info("metrics on http://%s:%d/metrics", *server.server_address[:2])
    updater = make_updater(cfg, here, collector) if cfg["self_upgrade"] else None
    if updater is not None:
        updater.start()
    log.info("falcon-agent %s started (self_upgrade=%s)", VERSION, updater is not None)
    if not SAYS_READY:
        stop.wait()  # a broken build: systemd's start timeout ends it
    su.notify_ready(f"falcon-agent {VERSION}")
    from selfupgrade.restart import watchdog_interval_s

    watchdog = watchdog_interval_s()  # under WatchdogSec=: half the timeout
    while not stop.wait(watchdog if watchdog else 3600):
        if PETS_WATCHDOG:
            su.notify_watchdog()
    log.info("falcon-agent %s stopping", VERSION)
    if updater is not None:
        updater.stop()
    collector.stop()
    if server is not None:
        server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
