"""Issue 11, point 4: a flood of idle and trickling connections against a real hbs process
that may open 1,024 files (systemd's default), and real heartbeats on both ports meanwhile.

10,000 hostile connections in all: half on the HTTP port (each sends part of a request head
and stops), half on the JSON-RPC port (each sends part of a frame and stops). hbs keeps at
most a share of its descriptors for each port, closes the oldest connection that has not sent
a complete head or frame when a new one comes, and closes any that is too slow; real agents
are answered meanwhile.
"""

from __future__ import annotations

import resource
import socket
import time
from pathlib import Path

import httpx

from selfupgrade import Heartbeat, UpgradeState, parse_version

from .fleet import Hbs
from .server_helpers import rpc_report

HOSTILE = 10_000


def until_answered(what, attempt) -> float:  # type: ignore[no-untyped-def]
    """Seconds until ``attempt()`` succeeds (retrying as an agent would, every 0.2 s)."""
    started = time.monotonic()
    while True:
        try:
            attempt()
            return time.monotonic() - started
        except (OSError, httpx.HTTPError, ValueError):
            if time.monotonic() - started > 60:
                raise AssertionError(f"{what}: not answered within 60 s") from None
            time.sleep(0.2)


def test_real_heartbeats_are_answered_through_a_flood_at_1024_files(tmp_path: Path) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, HOSTILE + 1000)), hard))
    held: list[socket.socket] = []
    with Hbs(f"sqlite:{tmp_path / 'hbs.db'}", tmp_path / "hbs.log", rpc=True, nofile=1024) as hbs:
        assert hbs.rpc_port is not None
        wire = Heartbeat("real", parse_version("1.0"), UpgradeState.IDLE).to_wire()

        def http_beat() -> None:
            reply = httpx.post(f"{hbs.url}/selfupgrade/v1/heartbeat", json=wire, timeout=5)
            assert reply.status_code == 200

        try:
            started = time.monotonic()
            for i in range(HOSTILE):
                port = hbs.port if i % 2 == 0 else hbs.rpc_port
                s = socket.socket()
                s.setblocking(False)
                try:
                    s.connect_ex(("127.0.0.1", port))
                    s.send(
                        b"POST /selfupgrade/v1/heartbeat HTTP/1.1\r\nHost: x\r\n"
                        if i % 2 == 0
                        else b'{"method"'
                    )
                except OSError:
                    pass
                held.append(s)
            opened_s = time.monotonic() - started
            http_s = until_answered("an HTTP heartbeat", http_beat)
            rpc_s = until_answered(
                "a JSON-RPC heartbeat",
                lambda: rpc_report(hbs.rpc_port or 0, "real-rpc", timeout_s=5),
            )
            time.sleep(12)  # past the 10 s head and frame limits

            def still_open(s: socket.socket) -> bool:
                try:
                    return s.recv(1) != b""
                except BlockingIOError:
                    return True
                except OSError:
                    return False

            left = sum(1 for s in held if still_open(s))
            http_after_s = until_answered("an HTTP heartbeat after", http_beat)
        finally:
            for s in held:
                s.close()
        print(
            f"{HOSTILE} hostile connections opened in {opened_s:.1f} s; meanwhile an HTTP "
            f"heartbeat answered after {http_s:.2f} s, a JSON-RPC one after {rpc_s:.2f} s; "
            f"{left} hostile connections still open 12 s later; HTTP after {http_after_s:.2f} s"
        )
        assert hbs.proc is not None and hbs.proc.poll() is None  # hbs is alive
        assert left < 200  # nearly every hostile connection was closed by hbs
        assert "Too many open files" not in hbs.log()


def test_readers_that_never_read_do_not_grow_hbs(tmp_path: Path) -> None:
    """Issue 11, point 3: 40 clients ask for ``/agentversions`` of 200,000 hosts and never
    read the answer; hbs's memory and a real heartbeat's answer time are measured."""
    import psutil

    from selfupgrade.server import SqliteStore
    from selfupgrade.server.tasks import HostSeen

    db = tmp_path / "hbs.db"
    store = SqliteStore(db)
    now = time.time()
    store.save_hosts(HostSeen(f"n{i:07d}.example", "6.0.0", "idle", now) for i in range(200_000))
    store.close()
    held: list[socket.socket] = []
    with Hbs(f"sqlite:{db}", tmp_path / "hbs.log") as hbs:
        assert hbs.proc is not None
        proc = psutil.Process(hbs.proc.pid)
        wire = Heartbeat("real", parse_version("1.0"), UpgradeState.IDLE).to_wire()
        for _ in range(3):  # full reads, more than a second apart: hbs's steady state
            httpx.get(f"{hbs.url}/agentversions", timeout=60)
            time.sleep(1.1)
        before = proc.memory_info().rss
        try:
            for _ in range(40):
                s = socket.create_connection(("127.0.0.1", hbs.port))
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                s.sendall(
                    f"GET /agentversions HTTP/1.1\r\nHost: 127.0.0.1:{hbs.port}\r\n\r\n".encode()
                )
                held.append(s)
            time.sleep(3)
            started = time.monotonic()
            reply = httpx.post(f"{hbs.url}/selfupgrade/v1/heartbeat", json=wire, timeout=30)
            beat_s = time.monotonic() - started
            after = proc.memory_info().rss
        finally:
            for s in held:
                s.close()
        grown = (after - before) / 2**20
        print(
            f"40 readers that never read /agentversions of 200,000 hosts: hbs grew by "
            f"{grown:.1f} MB; a heartbeat meanwhile answered in {beat_s:.3f} s"
        )
        assert reply.status_code == 200
        assert grown < 40
