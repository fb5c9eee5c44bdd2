"""A fleet on one machine: hbs as a real process, and falcon agents under a real supervisord.

Used by the fleet demo and by the end-to-end tests. Everything listens on 127.0.0.1 and is
stopped by PID, also on errors (both classes are context managers).
"""

from __future__ import annotations

import json
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx

from selfupgrade.guard import guard_command
from selfupgrade.testing import ArtifactServer, Supervisord, free_port, stop_pid

from .falcon_agent.build import Built, build

ROOT = Path(__file__).resolve().parent.parent
OLD, NEW = "6.0.0", "6.0.1"
AGENT_CFG: dict[str, Any] = {
    "heartbeat": {"interval": 0.5},
    "collect_interval": 0.5,
    "confirm_timeout_s": 20,
}


class Hbs:
    """``python -m selfupgrade.server`` (hbs) on a free port; restartable with the same store."""

    def __init__(
        self,
        store: str,
        log_path: Path,
        *,
        port: int | None = None,
        rpc: bool = False,
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
        nofile: int | None = None,
        **limits: Any,
    ) -> None:
        self.store = store
        self.log_path = log_path
        self.tls = (tls_cert, tls_key) if tls_cert and tls_key else None
        self.port = port or free_port()
        self.rpc_port = free_port() if rpc else None
        self.limits = {"queue": 3, "lease_s": 10, "retry_backoff_s": 2, **limits}
        self.nofile = nofile
        self.url = f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Hbs:
        """Start and wait until ``/health`` answers."""
        args = [
            sys.executable,
            "-m",
            "selfupgrade.server",
            "--http",
            f"127.0.0.1:{self.port}",
            "--rpc",
            f"127.0.0.1:{self.rpc_port}" if self.rpc_port else "off",
            "--store",
            self.store,
            "--log-level",
            "info",
        ]
        for key, value in self.limits.items():
            flag = f"--{key.replace('_', '-')}"
            if value is True:
                args.append(flag)  # a switch, e.g. no_artifact_check=True
            elif value is not False:
                args += [flag, str(value)]
        if self.tls:
            args += ["--tls-cert", str(self.tls[0]), "--tls-key", str(self.tls[1])]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                args,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=ROOT,
                preexec_fn=self._limit_files if self.nofile else None,
            )
        deadline = time.monotonic() + 30
        while True:
            if self._ready():
                return self
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"hbs did not start:\n{self.log()}")
            time.sleep(0.05)

    def _limit_files(self) -> None:
        """In the child: at most ``nofile`` open files (systemd's default is 1024)."""
        assert self.nofile is not None
        resource.setrlimit(resource.RLIMIT_NOFILE, (self.nofile, self.nofile))

    def _ready(self) -> bool:
        if self.tls:  # the certificate is the test's business; readiness is the open port
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return True
            except OSError:
                return False
        try:
            return httpx.get(f"{self.url}/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop by PID (SIGTERM, or SIGKILL with ``sig``)."""
        if self.proc is not None and self.proc.poll() is None:
            if sig == signal.SIGKILL:
                self.proc.kill()
                self.proc.wait(10)
            else:
                stop_pid(self.proc.pid, grace_s=10)
        self.proc = None

    def log(self) -> str:
        """What hbs printed."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def status(self) -> dict[str, Any]:
        """``GET /selfupgrade/v1/status``."""
        return httpx.get(f"{self.url}/selfupgrade/v1/status", timeout=5).json()  # type: ignore[no-any-return]

    def versions(self) -> dict[str, str]:
        """``GET /agentversions``."""
        return httpx.get(f"{self.url}/agentversions", timeout=5).json()["data"]  # type: ignore[no-any-return]

    def publish(self, body: Mapping[str, Any]) -> httpx.Response:
        """``POST /agent/upgrade`` with ``body``, as curl sends it."""
        return httpx.post(f"{self.url}/agent/upgrade", content=json.dumps(body), timeout=5)

    def start_rollout(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """``POST /selfupgrade/v1/rollouts``; the rollout's detail.

        Raises:
            RuntimeError: hbs refused the rollout (the message is its answer).
        """
        reply = httpx.post(
            f"{self.url}/selfupgrade/v1/rollouts", content=json.dumps(body), timeout=10
        )
        if reply.status_code != 201:
            raise RuntimeError(f"hbs refused the rollout: {reply.status_code} {reply.text}")
        return reply.json()  # type: ignore[no-any-return]

    def rollout(self, rollout_id: str) -> dict[str, Any]:
        """``GET /selfupgrade/v1/rollouts/{id}``."""
        return httpx.get(f"{self.url}/selfupgrade/v1/rollouts/{rollout_id}", timeout=10).json()  # type: ignore[no-any-return]

    def act(
        self, rollout_id: str, action: str, body: Mapping[str, Any] | None = None
    ) -> httpx.Response:
        """``POST /selfupgrade/v1/rollouts/{id}/{action}``."""
        return httpx.post(
            f"{self.url}/selfupgrade/v1/rollouts/{rollout_id}/{action}",
            content=json.dumps(body or {}),
            timeout=10,
        )

    def __enter__(self) -> Hbs:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Fleet:
    """N falcon agents of ``OLD`` under a real supervisord, beating to one or more hbs URLs.

    Args:
        workdir: where hosts, supervisord and logs live.
        n: number of agents.
        hbs_urls: heartbeat base URLs; agent i uses ``hbs_urls[i % len]``.
        transport: ``http`` or ``rpc`` (``hbs_urls`` are then ``host:port``).
        autorestart: supervisord's autorestart for the agents.
    """

    def __init__(
        self,
        workdir: Path,
        n: int,
        hbs_urls: list[str],
        *,
        transport: str = "http",
        autorestart: bool = True,
        old: Built | None = None,
        labels: Mapping[str, Mapping[str, str]] | None = None,
    ) -> None:
        self.workdir = workdir
        self.n = n
        self.names = [f"agent-{i:02d}" for i in range(1, n + 1)]
        self.old = old or build(
            OLD,
            config={**AGENT_CFG, "heartbeat": {**AGENT_CFG["heartbeat"], "transport": transport}},
        )
        self.sup = Supervisord(workdir / "supervisor")
        for i, name in enumerate(self.names):
            home = workdir / "hosts" / name
            self.old.install(home / "opt")
            url = hbs_urls[i % len(hbs_urls)]
            addr = url if transport == "rpc" else f"{url}/selfupgrade/v1/heartbeat"
            self.sup.add_program(
                name,
                agent_command(home),
                env=agent_env(home, name, addr, "supervisor", (labels or {}).get(name)),
                autorestart=autorestart,
            )

    def home(self, name: str) -> Path:
        """The host's directory."""
        return self.workdir / "hosts" / name

    def program(self, name: str) -> bytes:
        """The installed program's bytes."""
        return (self.home(name) / "opt" / "falcon-agent").read_bytes()

    def pid(self, name: str) -> int:
        """The agent's PID, from supervisord."""
        return int(self.sup.info(name)["pid"])

    def __enter__(self) -> Fleet:
        self.sup.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.sup.stop()


def agent_command(home: Path) -> list[str]:
    """The falcon agent installed in ``home/opt``, run under ``selfupgrade guard``."""
    opt = home / "opt"
    return guard_command(home / "state", [str(opt / "falcon-agent"), "-c", str(opt / "cfg.json")])


def agent_env(
    home: Path, name: str, hbs: str, restarter: str, labels: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The environment of agent ``name`` in ``home``: its hbs address, restarter and labels;
    its own HTTP API off."""
    return {
        "FALCON_AGENT_HOSTNAME": name,
        "FALCON_AGENT_HBS": hbs,
        "FALCON_AGENT_STATE_DIR": str(home / "state"),
        "FALCON_AGENT_HTTP": "off",
        "FALCON_AGENT_RESTARTER": restarter,
        "FALCON_AGENT_PROGRAM": name,
        "FALCON_AGENT_LABELS": ",".join(f"{k}={v}" for k, v in (labels or {}).items()),
    }


def serve_release(server: ArtifactServer, built: Built, **faults: Any) -> str:
    """Serve ``bin_<v>`` and ``cfg_<v>`` under ``/file/open-falcon``; return the wgeturl."""
    server.add(f"file/open-falcon/bin_{built.version}", built.program, fault=faults.get("bin"))
    server.add(f"file/open-falcon/cfg_{built.version}", built.config, fault=faults.get("cfg"))
    return f"{server.base_url}/file/open-falcon"
