"""The sockets layer alone, for each server it adapts: a daemon's listening socket handed over
ten times, by ``execv`` and by an overlap, without an updater (tests/test_zero_downtime.py
has whole upgrades).

A small HTTP daemon (real process, real socket on 127.0.0.1) takes its socket with
``selfupgrade.sockets.listeners`` and serves it with ``DrainingHTTPServer`` (``http.server``),
``UvicornServing`` (an ASGI app on uvicorn) or ``AiohttpServing``; on SIGUSR1 it hands over
through the guard with ``ExecRestarter(sockets=...)`` or ``OverlapRestarter``. A load of 300
requests/s, half on keep-alive connections, runs throughout: no connection may be refused and
no request may fail.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from selfupgrade.testing import free_port, new_mark, stop_marked, with_mark
from selfupgrade.testing.load import HttpLoad

pytestmark = pytest.mark.real

DAEMON = textwrap.dedent(
    """
    import os, signal, sys, threading
    from pathlib import Path
    import selfupgrade as su
    from selfupgrade.sockets import listeners

    port, state, server_kind, way = sys.argv[1], sys.argv[3], sys.argv[4], sys.argv[5]
    counter = Path(sys.argv[2])
    generation = int(counter.read_text()) if counter.exists() else 0
    sockets = listeners({"http": ("127.0.0.1", int(port))})
    answer = f"{generation} {os.getpid()}".encode()

    if server_kind == "http.server":
        from selfupgrade.sockets import DrainAwareHandler, DrainingHTTPServer

        class Handler(DrainAwareHandler):
            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args):
                pass

        server = DrainingHTTPServer(sockets["http"], Handler)
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        drain = server.drain
    elif server_kind == "aiohttp":
        from aiohttp import web
        from selfupgrade.sockets import AiohttpServing

        async def hello(request):
            return web.Response(body=answer)

        app = web.Application()
        app.router.add_get("/", hello)
        drain = AiohttpServing(app, [sockets["http"]]).start().drain
    else:
        import uvicorn
        from selfupgrade.sockets import UvicornServing

        async def app(scope, receive, send):
            if scope["type"] != "http":
                return
            headers = [(b"content-length", str(len(answer)).encode())]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": answer})

        config = uvicorn.Config(app, lifespan="off", log_level="warning")
        drain = UvicornServing(uvicorn.Server(config), [sockets["http"]]).start().drain

    argv = [sys.executable, *sys.argv]
    if way == "exec":
        restarter = su.ExecRestarter(
            argv, guard_state_dir=state, sockets=sockets, before_exec=drain
        )
    else:
        restarter = su.OverlapRestarter(sockets, argv=argv, guard_state_dir=state, drain=drain)
    upgrade = threading.Event()
    signal.signal(signal.SIGUSR1, lambda *a: upgrade.set())
    su.notify_ready()  # to an OverlapRestarter's parent, when there is one
    print(f"generation {generation} pid {os.getpid()} serving", flush=True)
    while not upgrade.wait(0.2):  # a timed wait: a signal taken by another thread is
        pass  # handled at the next timeout, where an untimed one could wait for ever
    counter.write_text(str(generation + 1))
    restarter.restart()
    """
)

HANDOVERS = 10


@pytest.mark.timeout(180)
@pytest.mark.parametrize("way", ["exec", "overlap"])
@pytest.mark.parametrize("server", ["http.server", "uvicorn", "aiohttp"])
def test_ten_handovers_refuse_no_connection_and_fail_no_request(
    tmp_path: Path, server: str, way: str
) -> None:
    if server == "aiohttp" and importlib.util.find_spec("aiohttp") is None:
        pytest.skip("needs aiohttp (pip install aiohttp, or the package's test extra)")
    script = tmp_path / "daemon.py"
    script.write_text(DAEMON)
    port = free_port()
    mark = new_mark()
    argv = [sys.executable, str(script), str(port), str(tmp_path / "gen"), str(tmp_path / "state")]
    daemon = subprocess.Popen(
        [*argv, server, way],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=with_mark(dict(os.environ), mark),
    )
    pids = []
    try:
        assert daemon.stdout is not None
        line = daemon.stdout.readline()
        assert "generation 0" in line, line + daemon.stdout.read()
        pids.append(int(line.split()[3]))
        with HttpLoad(port, rate=300, keep_alive=0.5, workers=8) as load:
            time.sleep(0.5)
            started = time.monotonic()
            kicks = []
            for generation in range(1, HANDOVERS + 1):
                kicks.append(time.monotonic() - started)
                os.kill(pids[-1], signal.SIGUSR1)
                line = daemon.stdout.readline()
                assert f"generation {generation} pid" in line, line
                pids.append(int(line.split()[3]))
                time.sleep(0.3)
            took = time.monotonic() - started
        report = load.report()
    finally:
        left = stop_marked(mark)
        daemon.wait(10)
    print(
        f"{server}, {HANDOVERS} hand-offs by {way} in {took:.1f} s, pids {sorted(set(pids))}: "
        f"{report.summary()} {dict(report.errors)}"
    )
    lost = [r for r in report.requests if r.outcome != "ok"]
    if lost:  # when and how, against the hand-offs' times, for whoever reads a failure
        print(f"hand-offs at {[round(k, 2) for k in kicks]} s; not answered:")
        for r in lost:
            print(f"  at {r.start - started:.3f} s for {r.end - r.start:.3f} s, ", end="")
            print(f"retried {r.retried}: {r.error}")
    assert left == []
    assert report.refused == 0 and report.failed == 0
    assert report.answered > 300 and any(b.startswith(f"{HANDOVERS} ") for b in report.bodies)
    assert len(set(pids)) == (1 if way == "exec" else HANDOVERS + 1)
