"""Every process a fleet started, found and stopped: by a mark in the environment, by PID.

A fleet's processes do not stay one tree: supervisord starts the agents, an agent's guard
leaves a watcher in a new session, a restart helper outlives the daemon that started it, and
each of those is re-parented to PID 1 when its parent goes. What they all keep is their
environment. So whoever starts a fleet gives its first process a mark in
``SELFUPGRADE_MARK`` (:func:`with_mark`: space-separated, so that a fleet started inside a
marked run carries both marks), which every descendant inherits (supervisord passes its
environment to its programs; ``Popen`` and ``exec`` keep it), and at the end:

* :func:`marked` lists the live processes that carry the mark (read from ``/proc``);
* :func:`stop_marked` sends SIGTERM to all of them at once (not one at a time, as supervisord
  would), waits a bounded grace, SIGKILLs what is left, and returns what it could not stop.

Nothing is found or killed by name. A process that clears its environment, or one of another
user that this one may not read, is not found: the fleets of this package do neither.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import time
from collections.abc import Iterable

import psutil

__all__ = ["MARK_ENV", "marked", "new_mark", "stop_marked", "with_mark"]

MARK_ENV = "SELFUPGRADE_MARK"
"""The environment variable that marks the processes of one fleet."""


def new_mark() -> str:
    """A fresh, unguessable mark."""
    return secrets.token_hex(8)


def with_mark(env: dict[str, str], mark: str) -> dict[str, str]:
    """``env`` with ``mark`` added to its ``SELFUPGRADE_MARK``."""
    marks = env.get(MARK_ENV, "").split()
    return {**env, MARK_ENV: " ".join([*marks, mark])}


def marked(mark: str, *, besides: Iterable[int] = ()) -> list[psutil.Process]:
    """The live processes (zombies aside) whose environment has ``SELFUPGRADE_MARK=mark``,
    except this process and ``besides``."""
    skip = {os.getpid(), *besides}
    found = []
    for proc in psutil.process_iter(["pid", "status"]):
        if proc.pid in skip or proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        with contextlib.suppress(psutil.Error, OSError):
            if mark in proc.environ().get(MARK_ENV, "").split():
                found.append(proc)
    return found


def stop_marked(mark: str, *, grace_s: float = 10.0, first: Iterable[int] = ()) -> list[int]:
    """Stop every process carrying ``mark``: SIGTERM to ``first`` (a supervisor, so that it
    restarts nothing) and then to all the others at once, SIGKILL after ``grace_s`` to what
    is left. Return the PIDs still alive at the end (``[]``: none is left; a process that
    exited and waits for its parent to collect it is not alive)."""
    for pid in first:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    for proc in marked(mark):
        with contextlib.suppress(psutil.Error):
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if not marked(mark):
            return []
        time.sleep(0.05)
    for proc in marked(mark):
        with contextlib.suppress(psutil.Error):
            proc.kill()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        left = marked(mark)
        if not left:
            return []
        time.sleep(0.05)
    return [p.pid for p in left]
