"""The detached helper that SupervisorRestarter leaves behind: stop, then start, the program.

Run as ``python -m selfupgrade.restart._supervisor_helper URL PROGRAM TIMEOUT_S``.
"""

from __future__ import annotations

import sys
import time
import xmlrpc.client

from .supervisor import supervisor_proxy


def restart_program(url: str, program: str, timeout_s: float) -> int:
    """Stop ``program`` through supervisord's XML-RPC, then start it again; the exit status."""
    proxy = supervisor_proxy(url, timeout_s=timeout_s)
    deadline = time.monotonic() + 60
    try:
        proxy.supervisor.stopProcess(program, True)
    except xmlrpc.client.Fault as fault:
        if "NOT_RUNNING" not in fault.faultString:
            print(
                f"selfupgrade: stopProcess({program}) failed: {fault.faultString}", file=sys.stderr
            )
    while time.monotonic() < deadline:
        try:
            proxy.supervisor.startProcess(program, True)
            return 0
        except xmlrpc.client.Fault as fault:
            if "ALREADY_STARTED" in fault.faultString:
                return 0
            time.sleep(0.2)
        except OSError:
            time.sleep(0.2)
    print(f"selfupgrade: could not start {program} again through {url}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    raise SystemExit(restart_program(sys.argv[1], sys.argv[2], float(sys.argv[3])))
