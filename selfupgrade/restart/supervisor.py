"""Restart under supervisord: exit as a crash would, and let supervisord start the program.

A process cannot ask supervisord to stop and then start *itself*: the stop kills the caller
before it could ask for the start, and a helper that does both for it can be killed between
the two, leaving the program stopped on request, where ``autorestart`` does not apply. So in
``"rpc"`` mode the restarter never stops the program. It checks over XML-RPC that supervisord
runs this very process as ``program`` and reads the program's ``exitcodes``; then it exits with
a code that is not one of them. To supervisord that is an unexpected exit, and its
``autorestart`` (``unexpected``, the default, or ``true``) starts the program again itself: one
act that supervisord carries out, and a kill at any moment (of the daemon, or of anything
else) is an unexpected exit too. For ``autorestart=false``, which XML-RPC does not show, it
leaves a detached helper (``python -m selfupgrade.restart._supervisor_helper``) that starts
the program if supervisord leaves it ``EXITED`` (never one an operator ``STOPPED``); only
there does the restart depend on a second process. In ``"exit"`` mode it just exits with
``exit_code`` and relies on ``autorestart=true``.

Only the standard library's ``xmlrpc.client`` is used; ``unix://`` and ``http://`` server URLs
are both understood.
"""

from __future__ import annotations

import http.client
import logging
import os
import select
import socket
import subprocess
import sys
import xmlrpc.client
from collections.abc import Collection
from typing import Any, Literal

from .._system import System
from ..errors import RestartFailed

__all__ = ["SupervisorRestarter", "supervisor_proxy", "unexpected_exit_code"]

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
        how: ``"rpc"`` (check over XML-RPC, exit unexpectedly) or ``"exit"`` (just exit with
            ``exit_code``, for ``autorestart=true``).
        exit_code: the code for ``"exit"`` mode.
        timeout_s: for each XML-RPC call.
        grace_s: how long the helper watches for a program that supervisord left ``EXITED``.
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
        code = unexpected_exit_code(_exitcodes(proxy, self.program))
        helper = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "selfupgrade.restart._supervisor_helper",
                self.server_url,
                self.program,
                str(os.getpid()),
                str(self._grace_s),
                str(self._timeout_s),
            ],
            start_new_session=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            close_fds=True,
        )
        _wait_until_watching(helper, self._timeout_s)
        log.info(
            "exiting with %d, not one of %s's exitcodes: supervisord's autorestart starts the "
            "new version",
            code,
            self.program,
        )
        self._sys.exit_now(code)


HELPER_WATCHING = "watching"
"""The line the restart helper writes on its stdout once it runs."""


def _wait_until_watching(helper: subprocess.Popen[bytes], timeout_s: float) -> None:
    """Wait (at most ``timeout_s``) for the helper's line on its stdout that it runs and
    watches, so that the daemon exits only once the helper is up; a helper that fails to start
    is logged, and the exit goes ahead (``autorestart`` may still start the program)."""
    assert helper.stdout is not None
    ready, _, _ = select.select([helper.stdout], [], [], timeout_s)
    line = helper.stdout.readline() if ready else b""
    helper.stdout.close()
    if line.strip() != HELPER_WATCHING.encode():
        log.warning(
            "the restart helper (pid %d) did not report that it watches the program within "
            "%g s (exit status %s); exiting anyway",
            helper.pid,
            timeout_s,
            helper.poll(),
        )


def unexpected_exit_code(exitcodes: Collection[int]) -> int:
    """An exit code supervisord counts as unexpected for a program with ``exitcodes``: 75
    (``EX_TEMPFAIL``) unless it is listed."""
    candidates: list[int] = [75, *range(64, 126)]
    return next(c for c in candidates if c not in exitcodes)


def _exitcodes(proxy: xmlrpc.client.ServerProxy, program: str) -> list[int]:
    """The program's ``exitcodes`` (supervisord's default, ``[0]``, if it cannot tell)."""
    group, _, name = program.rpartition(":")
    try:
        infos = proxy.supervisor.getAllConfigInfo()
    except (OSError, xmlrpc.client.Error) as exc:
        log.warning("supervisord did not tell %s's exitcodes (%s); assuming [0]", program, exc)
        return [0]
    for info in infos if isinstance(infos, list) else []:
        if info.get("name") == name and (not group or info.get("group") == group):
            codes = info.get("exitcodes")
            if isinstance(codes, list) and all(isinstance(c, int) for c in codes):
                return codes
    return [0]
