"""The detached helper :class:`~selfupgrade.restart.SupervisorRestarter` leaves behind.

Run as ``python -m selfupgrade.restart._supervisor_helper URL PROGRAM OLD_PID GRACE_S
TIMEOUT_S``. It writes ``watching`` on its stdout once it runs; the daemon (``OLD_PID``) waits
for that line, then exits unexpectedly, and supervisord's ``autorestart`` normally starts the
program again on its own: then the helper sees a new PID and exits having done nothing, and
killing it changes nothing. Only when supervisord leaves the program ``EXITED``
(``autorestart=false``) or ``FATAL`` does it call ``startProcess``; a program an operator
``STOPPED`` meanwhile stays stopped.
"""

from __future__ import annotations

import os
import sys
import time
import xmlrpc.client

from .supervisor import HELPER_WATCHING, supervisor_proxy

SETTLE_S = 3.0
"""How long a program may stay ``EXITED`` before the helper starts it (supervisord's own
autorestart acts within a tick, about a second)."""


def start_if_left_down(
    url: str, program: str, old_pid: int, grace_s: float, timeout_s: float
) -> int:
    """Watch ``program`` for ``grace_s``; start it if supervisord leaves it down. The exit
    status: 0 when it runs again (or an operator stopped it), 1 when it could not be started."""
    proxy = supervisor_proxy(url, timeout_s=timeout_s)
    deadline = time.monotonic() + grace_s
    down_since: float | None = None
    while time.monotonic() < deadline:
        try:
            info = proxy.supervisor.getProcessInfo(program)
        except (OSError, xmlrpc.client.Error):
            time.sleep(0.2)
            continue
        if not isinstance(info, dict):
            time.sleep(0.2)
            continue
        state, pid = info.get("statename"), info.get("pid")
        if state in ("STARTING", "RUNNING", "BACKOFF") and pid != old_pid:
            return 0
        if state in ("STOPPED", "STOPPING"):
            return 0  # an operator's stop
        if state in ("EXITED", "FATAL"):
            now = time.monotonic()
            down_since = down_since if down_since is not None else now
            if now - down_since >= SETTLE_S:
                try:
                    proxy.supervisor.startProcess(program, False)
                    print(f"selfupgrade: started {program} again ({state})", file=sys.stderr)
                    return 0
                except xmlrpc.client.Fault as fault:
                    if "ALREADY_STARTED" in fault.faultString:
                        return 0
                except OSError:
                    pass
        time.sleep(0.2)
    print(f"selfupgrade: {program} did not run again within {grace_s:g} s", file=sys.stderr)
    return 1


def _say_watching() -> None:
    """Tell the daemon (which waits for it before it exits) that this helper runs, then let go
    of the pipe so the daemon's exit cannot break a later write."""
    sys.stdout.write(HELPER_WATCHING + "\n")
    sys.stdout.flush()
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)


if __name__ == "__main__":
    _say_watching()
    raise SystemExit(
        start_if_left_down(
            sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
        )
    )
