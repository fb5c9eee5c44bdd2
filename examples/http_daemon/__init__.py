"""httpd: the example HTTP daemon whose upgrades refuse no connection (see ``httpd.py``)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from selfupgrade import Role
from selfupgrade.testing.toy import ToyRelease

HERE = Path(__file__).resolve().parent
PROGRAM = "httpd"


def release(version: str, *, python: str | None = None, starts: bool = True) -> ToyRelease:
    """``httpd.py`` with ``version`` stamped in and ``python`` in its ``#!`` line, as a
    one-file release (``bin_<version>``); ``starts=False`` builds one that exits before it
    is ready."""
    source = (HERE / "httpd.py").read_text()
    source = source.replace("#!/usr/bin/env python3", f"#!{python or sys.executable}", 1)
    source, stamped = re.subn(
        r'^VERSION = "[^"]*"$', f'VERSION = "{version}"', source, count=1, flags=re.M
    )
    if not stamped:
        raise RuntimeError("httpd.py has no VERSION line to stamp")
    if not starts:
        source = source.replace("\nSTARTS = True", "\nSTARTS = False", 1)
    return ToyRelease(version, {Role.BIN: source.encode()}, {Role.BIN: PROGRAM})
