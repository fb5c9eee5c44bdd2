"""A fleet of agents for tests: simulated in-process, or real processes of the user's daemon.

::

    with Fleet(hbs.heartbeat_url, tmp_dir, release=factory.toy("1.0"), n=5) as fleet:
        hbs.publish(...)
        fleet.wait_until(version="1.1", timeout_s=30)
        fleet.kill("agent-2"); fleet.crash_next_start("agent-3")

**In-process** (the default), each agent is a real :class:`~selfupgrade.Updater` with the real
HTTP transport and fetcher, verifier and :class:`~selfupgrade.TripleInstaller` on real files in
its own directory; only the process is simulated: a restart stops the updater, runs the guard's
start counting (``boot``), reads the installed program's version, and starts a new updater.
``crash_next_start`` makes the next start die after the guard counted it, as a new version that
cannot start would. Cheap enough for dozens of agents in one test.

**Processes** (``mode="process"``), each agent is the user's own daemon, started through the
guard by a :class:`~selfupgrade.testing.ServiceHarness` (``Restart=always`` with a real
``NOTIFY_SOCKET``); ``kill`` sends SIGKILL, ``crash_next_start`` makes the next start a process
that exits with status 3 after the guard counted it.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import httpx

from ..guard import guard_command
from ..install.base import ConfirmPolicy
from ..install.triple import TripleInstaller
from ..models import Role
from ..transport.http import HttpSettings, HttpTransport
from ..updater import Layout, Updater, UpdaterConfig
from ..verify.base import Verifier
from ..verify.digest import DigestVerifier
from ._base import Managed
from .harness import ServiceHarness
from .toy import ToyRelease, toy_version

__all__ = ["AgentHome", "Fleet"]

_HEARTBEAT_PATH = "/selfupgrade/v1/heartbeat"


@dataclass
class AgentHome:
    """One agent's identity and directories.

    Attributes:
        name: its host name in heartbeats.
        install_dir: where its files are installed.
        state_dir: the installer's state (the guard's ``--state-dir``).
    """

    name: str
    install_dir: Path
    state_dir: Path
    version: str = ""
    starts: int = 0
    crashes: int = 0
    crash_pending: int = 0
    updater: Updater | None = field(default=None, repr=False)
    harness: ServiceHarness | None = field(default=None, repr=False)


class _SimRestarter:
    def __init__(self, fleet: Fleet, home: AgentHome) -> None:
        self.fleet = fleet
        self.home = home

    def restart(self) -> None:
        self.fleet._restarts.put(self.home.name)


class Fleet(Managed):
    """N agents beating to one control server.

    Args:
        heartbeat_url: the control server's heartbeat URL.
        directory: where each agent's directories go.
        release: what every agent has installed at first.
        n: how many agents (named ``agent-1`` ... ``agent-N``).
        mode: ``inprocess`` or ``process``.
        interval_s: heartbeat interval of in-process agents.
        labels: per-agent labels, by name.
        verifier: makes each in-process agent's verifier (default: digests, md5 allowed).
        confirm: how a new version proves itself.
        version_of: reads the version from an installed program (default: the toy's line).
        command: in process mode, the daemon's command line for an agent (run through the
            guard); ``{install}`` and ``{state}`` in it are replaced.
        env: in process mode, extra environment; ``{host}``, ``{hbs}``, ``{install}`` and
            ``{state}`` in values are replaced.
    """

    def __init__(
        self,
        heartbeat_url: str,
        directory: str | Path,
        *,
        release: ToyRelease,
        n: int = 3,
        mode: Literal["inprocess", "process"] = "inprocess",
        interval_s: float = 0.2,
        labels: Mapping[str, Mapping[str, str]] | None = None,
        verifier: Callable[[], Verifier] | None = None,
        confirm: ConfirmPolicy | None = None,
        version_of: Callable[[bytes], str | None] = toy_version,
        command: Sequence[str] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.heartbeat_url = heartbeat_url
        self.directory = Path(directory)
        self.release = release
        self.mode = mode
        self.interval_s = interval_s
        self.labels = dict(labels or {})
        self._verifier = verifier or (lambda: DigestVerifier(allow_md5=True))
        self.confirm = confirm or ConfirmPolicy(max_starts=2, timeout_s=10)
        self.version_of = version_of
        self.command = list(command) if command is not None else None
        self.env = dict(env or {})
        if mode == "process" and self.command is None:
            raise ValueError("mode='process' needs the daemon's command")
        self.agents = {
            f"agent-{i}": AgentHome(
                f"agent-{i}",
                self.directory / f"agent-{i}" / "opt",
                self.directory / f"agent-{i}" / "state",
            )
            for i in range(1, n + 1)
        }
        self._restarts: queue.Queue[str] = queue.Queue()
        self._stop = threading.Event()
        self._supervisor: threading.Thread | None = None
        self._lock = threading.Lock()

    # ---- life cycle --------------------------------------------------------------------

    def start(self) -> Fleet:
        """Install the release on every agent and start them all."""
        for home in self.agents.values():
            self.release.install(home.install_dir)
            if self.mode == "process":
                self._start_process(home)
            else:
                self._start_inprocess(home)
        if self.mode == "inprocess":
            self._supervisor = threading.Thread(target=self._supervise, name="fleet", daemon=True)
            self._supervisor.start()
        return self

    def stop(self) -> None:
        """Stop every agent (processes by PID)."""
        self._stop.set()
        if self._supervisor is not None:
            self._supervisor.join(10)
            self._supervisor = None
        for home in self.agents.values():
            if home.updater is not None:
                home.updater.stop(timeout_s=5)
                home.updater = None
            if home.harness is not None:
                home.harness.stop()
                home.harness = None

    # ---- in-process agents -------------------------------------------------------------

    def _start_inprocess(self, home: AgentHome) -> None:
        installer = TripleInstaller(home.state_dir)
        while True:
            installer.boot(now=time.time(), claim=False)  # what the guard does at each start
            home.starts += 1
            program = (home.install_dir / self.release.names[Role.BIN]).read_bytes()
            home.version = self.version_of(program) or self.release.version
            with self._lock:
                crash = home.crash_pending > 0
                if crash:
                    home.crash_pending -= 1
                    home.crashes += 1
            if not crash:
                break
        updater = Updater(
            version=home.version,
            layout=Layout(home.install_dir, self.release.names),
            transport=HttpTransport(
                self.heartbeat_url,
                settings=HttpSettings(connect_timeout_s=2, read_timeout_s=5, backoff_base_s=0.05),
            ),
            installer=installer,
            restarter=_SimRestarter(self, home),
            config=UpdaterConfig(
                host=home.name,
                interval_s=self.interval_s,
                jitter=0.1,
                labels=self.labels.get(home.name, {}),
                failure_backoff_s=1.0,
                download_timeout_s=30,
                confirm=self.confirm,
                confirm_poll_s=min(0.2, self.interval_s),
            ),
            verifier=self._verifier(),
        )
        home.updater = updater
        updater.start()

    def _supervise(self) -> None:
        while not self._stop.is_set():
            try:
                name = self._restarts.get(timeout=0.05)
            except queue.Empty:
                continue
            home = self.agents[name]
            if home.updater is not None:
                home.updater.stop(timeout_s=5)
                home.updater = None
            if not self._stop.is_set():
                self._start_inprocess(home)

    # ---- real processes ----------------------------------------------------------------

    def _fill(self, text: str, home: AgentHome) -> str:
        base = self.heartbeat_url
        return (
            text.replace("{host}", home.name)
            .replace("{hbs}", base)
            .replace("{install}", str(home.install_dir))
            .replace("{state}", str(home.state_dir))
        )

    def _start_process(self, home: AgentHome) -> None:
        assert self.command is not None
        argv = [self._fill(a, home) for a in self.command]
        env = {k: self._fill(v, home) for k, v in self.env.items()}
        home.harness = ServiceHarness(
            guard_command(home.state_dir, argv),
            env=env,
            log_path=home.install_dir.parent / "daemon.log",
            restart_sec=0.2,
        ).start()

    # ---- what tests do -----------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        """The agents' host names."""
        return list(self.agents)

    def versions(self) -> dict[str, str]:
        """Each agent's running version (in process mode: as the control server last heard)."""
        if self.mode == "inprocess":
            return {n: h.version for n, h in self.agents.items()}
        base = self.heartbeat_url.removesuffix(_HEARTBEAT_PATH)
        reported = httpx.get(f"{base}/agentversions", timeout=5, trust_env=False).json()["data"]
        return {n: reported.get(n, "") for n in self.agents}

    def confirmed(self, name: str) -> bool:
        """The agent's running version has confirmed its health (in-process mode)."""
        updater = self.agents[name].updater
        return updater is not None and not updater.on_trial

    def wait_until(
        self, *, version: str, timeout_s: float = 30.0, hosts: Sequence[str] | None = None
    ) -> None:
        """Block until every agent (or ``hosts``) runs ``version`` with its health confirmed.

        Raises:
            TimeoutError: naming each agent's version.
        """
        wanted = list(hosts or self.agents)
        deadline = time.monotonic() + timeout_s
        while True:
            versions = self.versions()
            done = all(versions[h] == version for h in wanted)
            if done and self.mode == "inprocess":
                done = all(self.confirmed(h) for h in wanted)
            if done:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"not all on {version} after {timeout_s}s: {versions}")
            time.sleep(0.05)

    def kill(self, name: str) -> None:
        """Kill the agent without warning; its supervisor starts it again, as ``Restart=`` would."""
        home = self.agents[name]
        if self.mode == "process":
            assert home.harness is not None
            pid = home.harness.pid
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
            return
        self._restarts.put(name)

    def crash_next_start(self, name: str) -> None:
        """Make the agent's next start fail right after the guard counted it."""
        home = self.agents[name]
        if self.mode == "process":
            assert home.harness is not None
            home.harness.next_argv = guard_command(
                home.state_dir, [sys.executable, "-c", "raise SystemExit(3)"]
            )
            return
        with self._lock:
            home.crash_pending += 1

    def installed(self, name: str) -> dict[Role, bytes]:
        """The files installed on agent ``name`` now."""
        home = self.agents[name]
        return {
            r: (home.install_dir / n).read_bytes()
            for r, n in self.release.names.items()
            if (home.install_dir / n).exists()
        }

    def describe(self) -> str:
        """One line per agent, for assertion messages."""
        return json.dumps(
            {
                n: {"version": h.version, "starts": h.starts, "crashes": h.crashes}
                for n, h in self.agents.items()
            }
        )
