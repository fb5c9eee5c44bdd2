"""Restart under supervisord, through its XML-RPC interface or by exiting into ``autorestart``.

A process cannot ask supervisord to stop and then start *itself* in one call: the stop kills
the caller before it could ask for the start. So in ``"rpc"`` mode the restarter first checks,
over XML-RPC, that supervisord runs this very process under ``program`` (a clear error
otherwise), then leaves a small detached helper
(``python -m selfupgrade.restart._supervisor_helper``) that calls ``supervisor.stopProcess``
and ``supervisor.startProcess`` and exits. This works whatever ``autorestart`` says. If the
process is still alive ``grace_s`` later (the helper failed), it exits, so that autorestart
and the guard take over rather than leaving it half-way. In ``"exit"`` mode it just exits and
relies on ``autorestart=true``.

Only the standard library's ``xmlrpc.client`` is used; ``unix://`` and ``http://`` server URLs
are both understood.
"""

from __future__ import annotations

import http.client
import logging
import os
import socket
import subprocess
import sys
import threading
import xmlrpc.client
from typing import Any, Literal

from .._system import System
from ..errors import RestartFailed

__all__ = ["SupervisorRestarter", "supervisor_proxy"]

log = logging.getLogger("selfupgrade.restart")


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


class _UnixTransport(xmlrpc.client.Transport):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__()
        self._path = path
        self._timeout = timeout

    def make_connection(self, host: Any) -> http.client.HTTPConnection:
        return _UnixConnection(self._path, self._timeout)


class _TimeoutTransport(xmlrpc.client.Transport):
    def __init__(self, timeout: float) -> None:
        super().__init__()
        self._timeout = timeout

    def make_connection(self, host: Any) -> http.client.HTTPConnection:
        conn = super().make_connection(host)
        conn.timeout = self._timeout
        return conn


def supervisor_proxy(url: str, *, timeout_s: float = 10.0) -> xmlrpc.client.ServerProxy:
    """An XML-RPC proxy to supervisord at ``unix:///path/to.sock`` or ``http://host:port``."""
    if url.startswith("unix://"):
        return xmlrpc.client.ServerProxy(
            "http://localhost/RPC2", transport=_UnixTransport(url[len("unix://") :], timeout_s)
        )
    return xmlrpc.client.ServerProxy(
        url.rstrip("/") + "/RPC2", transport=_TimeoutTransport(timeout_s)
    )


class SupervisorRestarter:
    """Restarts a program run by supervisord.

    Args:
        program: the name of the ``[program:x]`` section (``group:name`` for groups).
        server_url: supervisord's XML-RPC address; default ``$SUPERVISOR_SERVER_URL``, which
            supervisord sets for the programs it runs.
        how: ``"rpc"`` (stop and start through XML-RPC) or ``"exit"`` (rely on autorestart).
        exit_code: the code for ``"exit"`` mode and for the exit after ``grace_s``.
        timeout_s: for each XML-RPC call.
        grace_s: how long to wait for supervisord to stop this process in ``"rpc"`` mode.
        system: the seam for exits.
    """

    def __init__(
        self,
        program: str,
        *,
        server_url: str | None = None,
        how: Literal["rpc", "exit"] = "rpc",
        exit_code: int = 0,
        timeout_s: float = 10.0,
        grace_s: float = 60.0,
        system: System | None = None,
    ) -> None:
        self.program = program
        self._grace_s = grace_s
        self.server_url = server_url or os.environ.get("SUPERVISOR_SERVER_URL", "")
        self._how = how
        self._exit_code = exit_code
        self._timeout_s = timeout_s
        self._sys = system or System()

    def restart(self) -> None:
        """Restart the program; see the class docstring.

        Raises:
            RestartFailed: supervisord cannot be reached, or does not run this process as
                ``program``.
        """
        if self._how == "exit":
            log.info(
                "exiting with %d so supervisord's autorestart starts the new version",
                self._exit_code,
            )
            self._sys.exit_now(self._exit_code)
        if not self.server_url:
            raise RestartFailed(
                "no supervisord address: pass server_url or run under supervisord "
                "(it sets SUPERVISOR_SERVER_URL)"
            )
        try:
            proxy = supervisor_proxy(self.server_url, timeout_s=self._timeout_s)
            info = proxy.supervisor.getProcessInfo(self.program)
        except (OSError, xmlrpc.client.Error) as exc:
            raise RestartFailed(f"supervisord at {self.server_url} did not answer: {exc}") from exc
        pid = info.get("pid") if isinstance(info, dict) else None
        if pid != os.getpid():
            raise RestartFailed(
                f"supervisord runs {self.program!r} as pid {pid}, not as this "
                f"process ({os.getpid()}); check the program name"
            )
        log.info("asking supervisord at %s to restart %s", self.server_url, self.program)
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "selfupgrade.restart._supervisor_helper",
                self.server_url,
                self.program,
                str(self._timeout_s),
            ],
            start_new_session=True,
            stdin=subprocess.DEVNULL,
            close_fds=True,
        )
        timer = threading.Timer(self._grace_s, self._gave_up)
        timer.daemon = True
        timer.start()

    def _gave_up(self) -> None:
        log.error(
            "supervisord did not restart %s within %gs; exiting so autorestart takes over",
            self.program,
            self._grace_s,
        )
        self._sys.exit_now(self._exit_code)
