"""The sockets layer alone: a daemon's listening socket handed over across ``execv``.

A small HTTP daemon (real process, real socket on 127.0.0.1) takes its socket with
``selfupgrade.sockets.listeners`` and serves with ``DrainingHTTPServer``; on SIGUSR1 it drains
and execs itself through the guard with ``ExecRestarter(sockets=...)``, without an updater
(tests/test_zero_downtime.py has the whole upgrades). A client opens a new connection for every
request, as fast as it can, through 10 such execs: no connection may be refused and no request
may fail.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from selfupgrade.testing import free_port

pytestmark = pytest.mark.real

DAEMON = textwrap.dedent(
    """
    import os, signal, sys, threading
    from pathlib import Path
    from selfupgrade.restart.execv import ExecRestarter
    from selfupgrade.sockets import DrainAwareHandler, DrainingHTTPServer, listeners

    port, counter, state = int(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    generation = int(counter.read_text()) if counter.exists() else 0
    sockets = listeners({"http": ("127.0.0.1", port)})

    class Handler(DrainAwareHandler):
        def do_GET(self):
            body = f"{generation} {os.getpid()}".encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = DrainingHTTPServer(sockets["http"], Handler)
    restarter = ExecRestarter(
        [sys.executable, *sys.argv],
        guard_state_dir=state,
        sockets=sockets,
        before_exec=server.drain,
    )
    upgrade = threading.Event()
    signal.signal(signal.SIGUSR1, lambda *a: upgrade.set())

    def upgrader():
        upgrade.wait()
        counter.write_text(str(generation + 1))
        restarter.restart()

    threading.Thread(target=upgrader, daemon=True).start()
    print(f"generation {generation} pid {os.getpid()} serving", flush=True)
    server.serve_forever(poll_interval=0.05)
    threading.Event().wait()  # the upgrader execs this process
    """
)


def ask(port: int) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(b"GET / HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := conn.recv(4096):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith((b"HTTP/1.0 200", b"HTTP/1.1 200")):
        raise RuntimeError(f"answered {head[:40]!r}")
    return body.decode()


def test_ten_execs_refuse_no_connection_and_fail_no_request(tmp_path: Path) -> None:
    script = tmp_path / "daemon.py"
    script.write_text(DAEMON)
    port = free_port()
    daemon = subprocess.Popen(
        [sys.executable, str(script), str(port), str(tmp_path / "gen"), str(tmp_path / "state")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    counts = {"ok": 0, "refused": 0, "failed": 0}
    seen: set[str] = set()
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            try:
                seen.add(ask(port).split()[0])
                counts["ok"] += 1
            except ConnectionRefusedError:
                counts["refused"] += 1
            except (OSError, RuntimeError):
                counts["failed"] += 1

    try:
        assert daemon.stdout is not None
        assert "generation 0" in daemon.stdout.readline()
        load = threading.Thread(target=client)
        load.start()
        started = time.monotonic()
        for generation in range(1, 11):
            os.kill(daemon.pid, signal.SIGUSR1)
            line = daemon.stdout.readline()
            assert f"generation {generation} pid {daemon.pid}" in line, line
            time.sleep(0.2)
        stop.set()
        load.join(30)
        took = time.monotonic() - started
    finally:
        stop.set()
        daemon.kill()
        daemon.wait()
    print(
        f"10 execs in {took:.1f} s (same pid {daemon.pid}): {counts['ok']} requests answered, "
        f"{counts['refused']} refused, {counts['failed']} failed; generations seen {sorted(seen)}"
    )
    assert counts["refused"] == 0 and counts["failed"] == 0
    assert counts["ok"] > 100 and "10" in seen
