"""Listening sockets that outlive the process: the daemon's side of an upgrade that refuses
no connection.

One protocol for every way a socket reaches a new version: systemd's socket activation
(``sd_listen_fds``): the sockets are file descriptors 3, 4, ... with ``LISTEN_FDS=<n>``,
``LISTEN_PID=<the pid they are for>`` and ``LISTEN_FDNAMES=<name>:<name>...``.

* Under systemd with a ``.socket`` unit, systemd passes them, and keeps them open (and queues
  new connections) while the service restarts.
* With :class:`~selfupgrade.ExecRestarter` given ``sockets=``, the process passes its own to the
  version it ``exec``\\ s (same PID), through the guard: :func:`hand_over` does that just before.

A daemon asks for its sockets by name with :func:`listeners`: those passed in are taken (and
the ``LISTEN_*`` variables removed, so that its children do not take them too); the others are
bound now. While the listening socket stays open, a client that connects during the upgrade
waits in its backlog instead of being refused.

Not here yet: systemd's file-descriptor store, the overlap hand-off of tableflip, adapters for
uvicorn or aiohttp (issue 14, points 3-5).
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
from collections.abc import Mapping

__all__ = ["FIRST_FD", "hand_over", "listeners"]

log = logging.getLogger("selfupgrade.sockets")

FIRST_FD = 3
"""``SD_LISTEN_FDS_START``: the first passed descriptor."""


def _passed() -> dict[str, socket.socket]:
    """The sockets passed to this process, by name (``LISTEN_FDNAMES``; ``fd<N>`` unnamed)."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return {}
    count = int(os.environ.get("LISTEN_FDS", "0") or 0)
    names = (os.environ.get("LISTEN_FDNAMES") or "").split(":")
    passed = {}
    for i in range(count):
        fd = FIRST_FD + i
        name = names[i] if i < len(names) and names[i] else f"fd{fd}"
        sock = socket.socket(fileno=fd)
        sock.set_inheritable(False)
        passed[name] = sock
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(key, None)
    return passed


def listeners(
    wanted: Mapping[str, tuple[str, int]], *, backlog: int = 1024
) -> dict[str, socket.socket]:
    """The listening TCP sockets named in ``wanted`` (``{"http": ("127.0.0.1", 8080)}``): the
    ones passed to this process under those names, and the others bound and listening now.

    Raises:
        OSError: a socket that was not passed could not be bound.
    """
    passed = _passed()
    out = {}
    for name, address in wanted.items():
        sock = passed.pop(name, None)
        if sock is not None:
            log.info("took the listening socket %r (%s) from the previous process", name, address)
        else:
            sock = socket.create_server(address, backlog=backlog, reuse_port=False)
        out[name] = sock
    for name, sock in passed.items():
        log.warning("closing passed socket %r: nobody asked for it", name)
        sock.close()
    return out


def hand_over(sockets: Mapping[str, socket.socket]) -> None:
    """Just before ``exec`` of this very process: put ``sockets`` on descriptors 3, 4, ...,
    inheritable, and set ``LISTEN_*`` for the PID that the exec'd program keeps."""
    spare = [fcntl.fcntl(s.fileno(), fcntl.F_DUPFD_CLOEXEC, 100) for s in sockets.values()]
    for i, fd in enumerate(spare):
        os.dup2(fd, FIRST_FD + i, inheritable=True)
        os.close(fd)
    os.environ["LISTEN_PID"] = str(os.getpid())
    os.environ["LISTEN_FDS"] = str(len(spare))
    os.environ["LISTEN_FDNAMES"] = ":".join(sockets)
