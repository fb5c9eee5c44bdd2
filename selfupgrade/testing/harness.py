"""Real supervisors for tests: a systemd-like restart harness, and a real supervisord.

:class:`ServiceHarness` behaves like a systemd service with ``Restart=always``: it runs the
command, restarts it ``restart_sec`` after every exit, and gives it a real ``NOTIFY_SOCKET``
(an ``AF_UNIX`` datagram socket) whose messages it records with the sender's PID, as systemd
reads them with ``SO_PASSCRED``.

:class:`Supervisord` writes a config, starts a real ``supervisord`` (the ``supervisor``
package) on a unix socket in a temporary directory, and talks to it over XML-RPC.

Both stop everything they started, by PID, in :meth:`stop` and on ``__exit__``: every
process that carries their mark (:mod:`~selfupgrade.testing.processes`), the detached
helpers and watchers of their programs included, all at once; ``stop`` raises when one
could not be stopped.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import xmlrpc.client
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..restart.supervisor import supervisor_proxy
from ._base import Managed
from .processes import new_mark, stop_marked, with_mark

__all__ = ["Notification", "ServiceHarness", "Supervisord", "stop_pid"]


def stop_pid(pid: int, *, grace_s: float = 5.0, group: bool = False) -> None:
    """SIGTERM ``pid`` (or its process group), wait up to ``grace_s``, then SIGKILL."""
    kill = os.killpg if group else os.kill
    with contextlib.suppress(ProcessLookupError, PermissionError):
        kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done:
                return
        except ChildProcessError:  # not our child: poll for existence instead
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


@dataclass(frozen=True)
class Notification:
    """One sd_notify datagram: who sent it and what it said."""

    pid: int
    message: str
    at: float


class ServiceHarness(Managed):
    """Runs a command like a systemd unit with ``Type=notify`` and ``Restart=always``.

    Args:
        argv: the command.
        env: extra environment variables.
        cwd: the working directory.
        restart_sec: wait between an exit and the next start.
        log_path: append the service's stdout and stderr here.

    Attributes:
        exits: ``(pid, returncode)`` of every exit, in order.
        notifications: every datagram received on the notify socket.
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | Path | None = None,
        restart_sec: float = 0.1,
        log_path: str | Path | None = None,
    ) -> None:
        self.argv = list(argv)
        self.env = dict(env or {})
        self.cwd = cwd
        self.restart_sec = restart_sec
        self.log_path = Path(log_path) if log_path else None
        self.exits: list[tuple[int, int]] = []
        self.notifications: list[Notification] = []
        self.starts = 0
        self.next_argv: list[str] | None = None
        """When set, the next start runs this command instead (once)."""
        self._tmp = tempfile.TemporaryDirectory(prefix="su-notify-")
        self.notify_socket = str(Path(self._tmp.name) / "notify.sock")
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(self.notify_socket)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self._sock.settimeout(0.1)
        self._proc: subprocess.Popen[bytes] | None = None
        self._stopping = threading.Event()
        self._lock = threading.Condition()
        self._threads: list[threading.Thread] = []
        self.mark = new_mark()
        """The mark every process of this service carries (:mod:`.processes`)."""

    @property
    def pid(self) -> int | None:
        """The PID of the running process, if one runs."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def start(self) -> ServiceHarness:
        """Start the service and keep restarting it until :meth:`stop`."""
        for target in (self._supervise, self._receive):
            t = threading.Thread(target=target, daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def _spawn(self) -> subprocess.Popen[bytes]:
        argv, self.next_argv = self.next_argv or self.argv, None
        env = with_mark({**os.environ, **self.env, "NOTIFY_SOCKET": self.notify_socket}, self.mark)
        out: Any = subprocess.DEVNULL
        if self.log_path is not None:
            out = open(self.log_path, "ab")  # noqa: SIM115 - closed after the child exits
        try:
            return subprocess.Popen(
                argv,
                env=env,
                cwd=self.cwd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        finally:
            if out is not subprocess.DEVNULL:
                out.close()

    def _supervise(self) -> None:
        while not self._stopping.is_set():
            with self._lock:
                self._proc = self._spawn()
                self.starts += 1
                self._lock.notify_all()
            code = self._proc.wait()
            with self._lock:
                self.exits.append((self._proc.pid, code))
                self._lock.notify_all()
            if self._stopping.wait(self.restart_sec):
                return

    def _receive(self) -> None:
        size = socket.CMSG_SPACE(struct.calcsize("iII"))
        while not self._stopping.is_set():
            try:
                data, ancdata, _flags, _addr = self._sock.recvmsg(4096, size)
            except (TimeoutError, OSError):
                continue
            pid = 0
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("iII", payload[: struct.calcsize("iII")])[0]
            with self._lock:
                self.notifications.append(
                    Notification(pid, data.decode("utf-8", "replace"), time.time())
                )
                self._lock.notify_all()

    def wait_for_notification(
        self, text: str, *, after: int = 0, timeout_s: float = 30.0
    ) -> Notification:
        """Block until a datagram containing ``text`` arrives (index ``>= after``).

        Raises:
            TimeoutError: listing what was received.
        """
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while True:
                for n in self.notifications[after:]:
                    if text in n.message:
                        return n
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"no {text!r} notification in {timeout_s}s; got {self.notifications}"
                    )
                self._lock.wait(remaining)

    def stop(self, grace_s: float = 5.0) -> None:
        """Stop restarting, then stop the running process (SIGTERM, then SIGKILL)."""
        self._stopping.set()
        proc = self._proc
        left = stop_marked(self.mark, grace_s=grace_s)
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(grace_s)
        for t in self._threads:
            t.join(5)
        self._sock.close()
        self._tmp.cleanup()
        if left:
            raise RuntimeError(f"processes of the service could not be stopped: {left}")


@dataclass(frozen=True)
class Program:
    """A ``[program:x]`` section for :class:`Supervisord`."""

    name: str
    command: str
    environment: Mapping[str, str]
    directory: str | None = None
    autorestart: str = "true"
    startsecs: int = 0
    stopwaitsecs: int = 5


class Supervisord(Managed):
    """A real supervisord in a directory of its own, driven over XML-RPC.

    Args:
        workdir: where the config, socket and logs go (a temporary directory by default).

    Attributes:
        pid: supervisord's PID once started.
        server_url: ``unix://`` address of its XML-RPC interface.
    """

    def __init__(self, workdir: str | Path | None = None) -> None:
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="su-supervisord-")
        self.workdir = Path(workdir or self._tmp.name)  # type: ignore[union-attr]
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.socket_path = self.workdir / "supervisor.sock"
        self.server_url = f"unix://{self.socket_path}"
        self.programs: list[Program] = []
        self.pid: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self.mark = new_mark()
        """The mark supervisord and every process it starts carry (:mod:`.processes`)."""

    def add_program(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        directory: str | Path | None = None,
        autorestart: bool | str = True,
    ) -> None:
        """Add a program (before :meth:`start`); ``autorestart`` is ``True``, ``False`` or
        supervisord's word (``"unexpected"``, its own default)."""
        if isinstance(autorestart, bool):
            autorestart = "true" if autorestart else "false"
        if autorestart not in ("true", "false", "unexpected"):
            raise ValueError(f"autorestart must be true, false or unexpected: {autorestart!r}")
        for arg in argv:
            if any(c in arg for c in " \t\n'\"%"):
                raise ValueError(f"supervisord command arguments must be plain words: {arg!r}")
        self.programs.append(
            Program(
                name=name,
                command=" ".join(argv),
                environment=dict(env or {}),
                directory=str(directory) if directory else None,
                autorestart=autorestart,
            )
        )

    def config_text(self) -> str:
        """The supervisord.conf that :meth:`start` writes."""
        lines = [
            "[unix_http_server]",
            f"file={self.socket_path}",
            "[supervisord]",
            f"logfile={self.workdir / 'supervisord.log'}",
            f"pidfile={self.workdir / 'supervisord.pid'}",
            f"childlogdir={self.workdir}",
            "nodaemon=true",
            "loglevel=info",
            "[rpcinterface:supervisor]",
            "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface",
            "[supervisorctl]",
            f"serverurl={self.server_url}",
        ]
        for p in self.programs:
            env = ",".join(f'{k}="{v.replace("%", "%%")}"' for k, v in p.environment.items())
            lines += [
                f"[program:{p.name}]",
                f"command={p.command}",
                f"autorestart={p.autorestart}",
                f"startsecs={p.startsecs}",
                f"stopwaitsecs={p.stopwaitsecs}",
                "redirect_stderr=true",
                f"stdout_logfile={self.workdir / (p.name + '.log')}",
                "stopasgroup=true",
                "killasgroup=true",
            ]
            if env:
                lines.append(f"environment={env}")
            if p.directory:
                lines.append(f"directory={p.directory}")
        return "\n".join(lines) + "\n"

    def start(self, timeout_s: float = 30.0) -> Supervisord:
        """Write the config, start supervisord, and wait until it answers XML-RPC."""
        conf = self.workdir / "supervisord.conf"
        conf.write_text(self.config_text())
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "supervisor.supervisord", "-n", "-c", str(conf)],
            env=with_mark(dict(os.environ), self.mark),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
        )
        self.pid = self._proc.pid
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                state = self.proxy().supervisor.getState()
                if isinstance(state, dict) and state.get("statename") == "RUNNING":
                    return self
            except (OSError, xmlrpc.client.Error):
                pass
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"supervisord did not start; see {self.workdir}/supervisord.log")
            time.sleep(0.05)

    def proxy(self) -> xmlrpc.client.ServerProxy:
        """An XML-RPC proxy to this supervisord."""
        return supervisor_proxy(self.server_url, timeout_s=10)

    def info(self, name: str) -> dict[str, Any]:
        """``supervisor.getProcessInfo(name)``."""
        return dict(self.proxy().supervisor.getProcessInfo(name))  # type: ignore[arg-type]

    def log(self, name: str) -> str:
        """The program's output so far."""
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self, grace_s: float = 15.0) -> None:
        """Stop supervisord and every process it started (its programs, their children and
        detached helpers) all at once, by PID, SIGKILL after ``grace_s``.

        Raises:
            RuntimeError: naming the PIDs that could not be stopped.
        """
        left: list[int] = []
        if self._proc is not None:
            left = stop_marked(self.mark, grace_s=grace_s, first=[self._proc.pid])
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(5)
        self._proc = None
        if self._tmp is not None:
            self._tmp.cleanup()
        if left:
            raise RuntimeError(f"processes of supervisord could not be stopped: {left}")
