"""The guard and the watcher: the known-good code that judges a new version from outside it.

A new version may be unable to run any Python code at all (a broken binary, a syntax error),
so the decision to roll it back cannot live in it. The guard runs *before* the daemon, from the
selfupgrade installed beside it (which upgrades of the daemon's files do not replace)::

    python -m selfupgrade guard --state-dir /opt/agent/.selfupgrade -- /opt/agent/agent -c cfg.json

At each start it finishes or undoes an interrupted install, counts the start of a version on
trial, rolls back once the count exceeds the limit, and then ``exec``\\ s the daemon (same PID,
so systemd's ``Type=notify`` and supervisord see the daemon itself). While a version is on
trial it first leaves a *watcher* process behind: if the daemon neither confirms nor dies before
the deadline (it hangs), the watcher rolls back and stops it, and the supervisor's restart
brings up the old version through the guard.

The guard never keeps the daemon from starting because of the updater's own files. When it
cannot recover or count a start (the state or install directory is read-only or full, the
journal is unreadable), it starts the version whose files are all on disk byte for byte as
the journal records them, and tells the daemon what it could not do in
``$SELFUPGRADE_GUARD_PROBLEM``, which the updater reports in its next heartbeat. Only when no
complete version is on disk does it refuse to start (exit 1, saying which files to look at).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import psutil

from .errors import SelfUpgradeError
from .install import open_installer
from .install._journal import JournaledInstaller
from .install.triple import TripleInstaller

__all__ = ["GUARD_PROBLEM_ENV", "guard", "guard_command", "watch"]

GUARD_PROBLEM_ENV = "SELFUPGRADE_GUARD_PROBLEM"
"""The environment variable in which the guard tells the daemon what it could not do."""

log = logging.getLogger("selfupgrade.guard")


def guard_command(state_dir: str | Path, argv: Sequence[str]) -> list[str]:
    """The command line that starts ``argv`` through the guard, with this interpreter."""
    return [
        sys.executable,
        "-m",
        "selfupgrade",
        "guard",
        "--state-dir",
        str(state_dir),
        "--",
        *argv,
    ]


def guard(state_dir: Path, command: Sequence[str], *, watch_trial: bool = True) -> int:
    """Recover, count this start, roll back if needed, then exec ``command`` (if given).

    Returns the exit status when there is no command to exec (``ExecStartPre=`` use).
    """
    installer = _open(state_dir)
    try:
        report = installer.boot(now=time.time(), claim=False)
    except SelfUpgradeError as exc:
        return _start_what_is_whole(installer, exc, command)
    for message in report.messages:
        print(f"selfupgrade guard: {message}", file=sys.stderr, flush=True)
    if not command:
        return 0
    if report.status.pending is not None and watch_trial:
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "selfupgrade",
                "watch",
                "--state-dir",
                str(state_dir),
                "--pid",
                str(os.getpid()),
            ],
            start_new_session=True,
            stdin=subprocess.DEVNULL,
            close_fds=True,
        )
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvp(command[0], list(command))


def _open(state_dir: Path) -> JournaledInstaller:
    """The installer the journal names; a triple installer when the journal is unreadable
    (its boot then fails on the journal, and the guard starts what is whole on disk)."""
    try:
        return open_installer(state_dir)
    except SelfUpgradeError:
        return TripleInstaller(state_dir)


def _start_what_is_whole(
    installer: JournaledInstaller, exc: SelfUpgradeError, command: Sequence[str]
) -> int:
    """The guard could not recover or count this start: exec the version that is whole on
    disk, telling it why; refuse (1) when none is."""
    try:
        version = installer.version_on_disk()
    except SelfUpgradeError as unreadable:
        version, why = "unknown", f"{exc}; the journal is unreadable too ({unreadable})"
    else:
        why = str(exc)
    if version is None:
        print(
            f"selfupgrade guard: {exc}; and no version's files are all on disk as "
            f"{installer.state_dir / 'state.json'} records them: not starting a mix (look at "
            "the files it names, then start again)",
            file=sys.stderr,
            flush=True,
        )
        return 1
    problem = f"{why}; started {version}, the version whose files are whole on disk"
    print(f"selfupgrade guard: {problem}", file=sys.stderr, flush=True)
    if not command:
        return 0
    os.environ[GUARD_PROBLEM_ENV] = problem
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvp(command[0], list(command))


def watch(state_dir: Path, pid: int, *, poll_s: float = 0.25, stop_grace_s: float = 10.0) -> int:
    """Wait until the version on trial confirms, or ``pid`` dies, or the deadline passes.

    On a missed deadline: roll back, then stop ``pid`` (SIGTERM, then SIGKILL after
    ``stop_grace_s``) so that its supervisor starts the restored version.
    """
    installer = _open(state_dir)
    try:
        proc = psutil.Process(pid)
        born = proc.create_time()
    except psutil.Error:
        return 0
    while True:
        status = installer.status()
        pending = status.pending
        if pending is None:
            return 0
        try:
            if not proc.is_running() or proc.create_time() != born:
                return 0
        except psutil.Error:
            return 0
        if pending.deadline is not None and time.time() > pending.deadline:
            break
        time.sleep(poll_s)
    reason = f"{pending.version} did not confirm its health before its deadline"
    print(f"selfupgrade watch: {reason}; rolling back and stopping pid {pid}", file=sys.stderr)
    installer.rollback(reason, if_on_trial=pending.version)
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(stop_grace_s)
    except psutil.TimeoutExpired:
        proc.kill()
    except psutil.Error:
        pass
    return 0
