"""The ``selfupgrade`` command: the guard and watcher, and host-side inspection.

::

    selfupgrade guard --state-dir DIR [--no-watch] [-- COMMAND ...]
    selfupgrade status --state-dir DIR
    selfupgrade confirm --state-dir DIR
    selfupgrade rollback --state-dir DIR [--reason TEXT]
    selfupgrade rollout start|status|watch|pause|resume|abort|rollback [--server URL] ...
    selfupgrade release keygen|sign|verify|patch ...
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from . import __version__, _release_cli, _rollout_cli
from .errors import SelfUpgradeError

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="selfupgrade", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"selfupgrade {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser(
        "guard",
        help="run before the daemon: recover, count the start, roll back a failing version",
        description="Finish or undo an interrupted install, count this start of a version on "
        "trial, roll back when it failed too often, then exec COMMAND (same PID).",
    )
    g.add_argument("--state-dir", type=Path, required=True, help="the installer's state directory")
    g.add_argument("--no-watch", action="store_true", help="do not leave a deadline watcher")
    g.add_argument("cmd", nargs=argparse.REMAINDER, help="-- then the daemon's command line")

    w = sub.add_parser("watch", help="(internal) roll back a version that misses its deadline")
    w.add_argument("--state-dir", type=Path, required=True)
    w.add_argument("--pid", type=int, required=True)

    for name, text in (
        ("status", "print the current, previous and pending generations as JSON"),
        ("confirm", "declare the version on trial healthy"),
        ("rollback", "restore the previous generation"),
    ):
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("--state-dir", type=Path, required=True)
        if name == "rollback":
            p.add_argument("--reason", default="rolled back by an operator")
    _rollout_cli.add_parser(sub)
    _release_cli.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    args = _parser().parse_args(argv)
    from . import guard as guard_mod
    from .install import open_installer

    if args.command == "rollout":
        return _rollout_cli.run(args)
    if args.command == "release":
        return _release_cli.run(args)
    try:
        if args.command == "guard":
            cmd = list(args.cmd)
            if cmd and cmd[0] == "--":
                cmd = cmd[1:]
            return guard_mod.guard(args.state_dir, cmd, watch_trial=not args.no_watch)
        if args.command == "watch":
            return guard_mod.watch(args.state_dir, args.pid)
        installer = open_installer(args.state_dir)
        if args.command == "status":
            print(json.dumps(asdict(installer.status()), indent=2))
        elif args.command == "confirm":
            installer.confirm()
        elif args.command == "rollback":
            print(installer.rollback(args.reason))
    except SelfUpgradeError as exc:
        print(f"selfupgrade {args.command}: {exc}", file=sys.stderr)
        return 2
    return 0
