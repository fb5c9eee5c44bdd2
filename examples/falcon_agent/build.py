"""Build falcon-agent releases as the seed's file server holds them: ``bin_<version>`` and
``cfg_<version>``, with their md5s.

    python -m examples.falcon_agent.build 6.0.1 /srv/files/open-falcon

prints the ``curl`` that publishes it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
_VERSION_LINE = re.compile(r'^VERSION = "[^"]*"$', re.MULTILINE)


@dataclass(frozen=True)
class Built:
    """One release: the program and config bytes and their md5s."""

    version: str
    program: bytes
    config: bytes

    @property
    def bin_md5(self) -> str:
        """md5 of the program, as ``binfile_md5``."""
        return hashlib.md5(self.program, usedforsecurity=False).hexdigest()

    @property
    def cfg_md5(self) -> str:
        """md5 of the config, as ``cfgfile_md5``."""
        return hashlib.md5(self.config, usedforsecurity=False).hexdigest()

    def write(self, directory: Path) -> None:
        """Write ``bin_<version>`` and ``cfg_<version>`` into ``directory``, and their md5s
        beside them (``bin_<version>.md5``, for scripts that publish)."""
        directory.mkdir(parents=True, exist_ok=True)
        (directory / f"bin_{self.version}").write_bytes(self.program)
        (directory / f"cfg_{self.version}").write_bytes(self.config)
        (directory / f"bin_{self.version}.md5").write_text(self.bin_md5 + "\n")
        (directory / f"cfg_{self.version}.md5").write_text(self.cfg_md5 + "\n")

    def install(self, directory: Path) -> None:
        """Install as a first install would: ``falcon-agent`` and ``cfg.json``."""
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "falcon-agent").write_bytes(self.program)
        (directory / "falcon-agent").chmod(0o755)
        (directory / "cfg.json").write_bytes(self.config)


def build(
    version: str,
    *,
    python: str | None = None,
    config: Mapping[str, Any] | None = None,
    crash_at_start: bool = False,
    unhealthy: bool = False,
    hang_before_ready: bool = False,
    stops_watchdog: bool = False,
) -> Built:
    """Stamp ``version`` into the agent and its ``#!`` line; merge ``config`` into cfg.json.

    ``crash_at_start`` builds a broken release that exits with status 3 before doing anything;
    ``unhealthy`` one that runs but never passes its health check, ``hang_before_ready`` one
    that never tells systemd ``READY=1``, ``stops_watchdog`` one that never pets its watchdog
    (for demos and tests of automatic rollback and of
    halting).
    """
    source = (HERE / "agent.py").read_text()
    if not _VERSION_LINE.search(source):
        raise RuntimeError("agent.py has no VERSION line to stamp")
    source = _VERSION_LINE.sub(f'VERSION = "{version}"', source, count=1)
    source = source.replace("#!/usr/bin/env python3", f"#!{python or sys.executable}", 1)
    if unhealthy:
        source = source.replace("HEALTHY = True", "HEALTHY = False", 1)
    if hang_before_ready:
        source = source.replace("SAYS_READY = True", "SAYS_READY = False", 1)
    if stops_watchdog:
        source = source.replace("PETS_WATCHDOG = True", "PETS_WATCHDOG = False", 1)
    if crash_at_start:
        source = source.replace(
            f'VERSION = "{version}"\n', f'VERSION = "{version}"\nraise SystemExit(3)\n', 1
        )
    cfg = json.loads((HERE / "cfg.json").read_text())
    for key, value in (config or {}).items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key].update(value)
        else:
            cfg[key] = value
    return Built(version, source.encode(), (json.dumps(cfg, indent=2) + "\n").encode())


def main(argv: list[str] | None = None) -> int:
    """Build one release into a directory and print how to publish it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("version")
    parser.add_argument("directory", type=Path)
    parser.add_argument("--python", help="interpreter for the #! line (default: this one)")
    parser.add_argument(
        "--interval", type=float, help="heartbeat interval in seconds (default 60, as the seed)"
    )
    args = parser.parse_args(argv)
    config = {"heartbeat": {"interval": args.interval}} if args.interval else None
    built = build(args.version, python=args.python, config=config)
    built.write(args.directory)
    print(
        f"wrote bin_{args.version} (md5 {built.bin_md5}) and cfg_{args.version} "
        f"(md5 {built.cfg_md5}) to {args.directory}, with their .md5 files"
    )
    body = {
        "wgeturl": "http://<file server>/<path>",
        "version": args.version,
        "binfile_md5": built.bin_md5,
    }
    print(f"publish: curl -X POST http://127.0.0.1:6031/agent/upgrade -d '{json.dumps(body)}'")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
