#!/usr/bin/env python3
"""httpd: an HTTP daemon that upgrades itself without refusing or failing a request.

    httpd --listen 127.0.0.1:8080 --control http://127.0.0.1:6031/selfupgrade/v1/heartbeat \\
          --state /var/lib/httpd --handoff exec

It answers ``GET /`` with its version and PID, heartbeats to hbs, and upgrades itself when
hbs says so. ``--handoff`` chooses how the listening socket reaches the new version:

* ``exec``: the daemon drains and ``exec``\\ s the new version through the guard, the socket
  inherited (same PID: under any process manager, or none);
* ``overlap``: the new version starts beside the old one with the socket; the old one drains
  and leaves only once the new one is ready, and serves on if it is not (no process manager,
  or systemd, which is told the new main PID);
* ``systemd-socket``: systemd owns the socket (``httpd.socket``); the daemon drains and exits
  on SIGTERM, and ``Restart=always`` starts the new version on the same socket;
* ``systemd-fdstore``: the daemon binds the socket and gives systemd a copy to keep
  (``FileDescriptorStoreMax=1`` in ``httpd.service``); then as ``systemd-socket``;
* ``none``: no hand-off, for comparison: a plain ``exec`` that closes the socket and binds it
  again.

While the socket stays open, a client that connects during the switch waits in its backlog.
The version is baked into this file (``VERSION``), as a compiled daemon's would be.
"""

from __future__ import annotations

VERSION = "1.0"
STARTS = True  # a build for tests can make a release that exits before it is ready

import argparse  # noqa: E402 - VERSION stays the first statement, where the build stamps it
import logging  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import selfupgrade as su  # noqa: E402
from selfupgrade.sockets import DrainAwareHandler, DrainingHTTPServer, listeners  # noqa: E402

log = logging.getLogger("httpd")
HANDOFFS = ("exec", "overlap", "systemd-socket", "systemd-fdstore", "none")


class Handler(DrainAwareHandler):
    """``GET /``: the version and PID that answered."""

    def do_GET(self) -> None:
        body = f"{VERSION} {os.getpid()}\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="httpd", description=__doc__.splitlines()[1])
    parser.add_argument("--listen", default="127.0.0.1:8080", help="HOST:PORT")
    parser.add_argument("--control", required=True, help="hbs's heartbeat URL")
    parser.add_argument("--state", type=Path, required=True, help="the guard's state directory")
    parser.add_argument("--handoff", choices=HANDOFFS, default="exec")
    parser.add_argument("--host", default="", help="the name to heartbeat (default: hostname)")
    parser.add_argument("--interval", type=float, default=60.0, help="heartbeat interval, s")
    parser.add_argument("--drain-s", type=float, default=5.0, help="time to finish requests")
    parser.add_argument("-v", "--version", action="version", version=VERSION)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Serve until SIGTERM; upgrade when told."""
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format=f"%(asctime)s httpd {VERSION} %(message)s"
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if not STARTS:
        log.error("a broken build: exiting before it listens")
        return 3
    host, _, port = args.listen.rpartition(":")
    sockets = listeners({"http": (host, int(port))}, store=args.handoff == "systemd-fdstore")
    server = DrainingHTTPServer(sockets["http"], Handler)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    def drain() -> None:
        started = time.monotonic()
        left = server.drain(args.drain_s)
        log.info("drained in %.2f s, %d connection(s) left", time.monotonic() - started, left)

    restarter: su.Restarter
    if args.handoff == "exec":
        restarter = su.ExecRestarter(guard_state_dir=args.state, sockets=sockets, before_exec=drain)
    elif args.handoff == "overlap":
        restarter = su.OverlapRestarter(sockets, guard_state_dir=args.state, drain=drain)
    elif args.handoff == "none":
        restarter = su.ExecRestarter(guard_state_dir=args.state)
    else:
        restarter = su.SystemdRestarter(grace_s=args.drain_s + 5)
    here = Path(sys.argv[0]).resolve()
    updater = su.Updater(
        version=VERSION,
        layout=su.Layout(here.parent, {su.Role.BIN: here.name}),
        transport=su.HttpTransport(args.control),
        installer=su.TripleInstaller(args.state),
        restarter=restarter,
        config=su.UpdaterConfig(host=args.host or os.uname().nodename, interval_s=args.interval),
        verifier=su.DigestVerifier(),
        health_check=lambda: not server.draining.is_set(),
    )
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    updater.start()
    log.info("serving on %s:%d (hand-off: %s)", *server.server_address[:2], args.handoff)
    su.notify_ready(f"httpd {VERSION}")
    while not stop.wait(1.0):  # timed: a signal taken by another thread waits for a timeout
        pass
    log.info("stopping: draining for at most %g s", args.drain_s)
    updater.stop()
    drain()
    return 0


if __name__ == "__main__":
    sys.exit(main())
