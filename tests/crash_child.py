"""Child process for test_crash.py: one installer operation, SIGKILLed at a chosen checkpoint.

Usage: crash_child.py MODE STATE_DIR INSTALL_DIR CRASH_AT [LAYOUT]
MODE is install (1.0 -> 1.1), install-cfg (only the config of 1.1), rollback, recover, or
boot (a guard start). LAYOUT is triple (the default: INSTALL_DIR holds the files) or releases
(INSTALL_DIR is the root of releases/ and current).
Prints the checkpoints it passed, as JSON, if it was not killed.
"""

import json
import sys
import time
from pathlib import Path

from selfupgrade import ConfirmPolicy, ReleaseInstaller, Role, TripleInstaller
from selfupgrade.testing import CrashingSystem, toy_release

mode, state_dir, install_dir, crash_at = (
    sys.argv[1],
    Path(sys.argv[2]),
    Path(sys.argv[3]),
    int(sys.argv[4]),
)
layout = sys.argv[5] if len(sys.argv) > 5 else "triple"
system = CrashingSystem(crash_at)
installer: TripleInstaller | ReleaseInstaller
if layout == "releases":
    installer = ReleaseInstaller(install_dir, state_dir=state_dir, keep=2, system=system)
    files_dir = install_dir / "current"
else:
    installer = TripleInstaller(state_dir, system=system)
    files_dir = install_dir
if mode in ("install", "install-cfg"):
    roles = [Role.CFG] if mode == "install-cfg" else None
    staged = toy_release("1.1").stage(installer, files_dir, roles)
    installer.install("1.1", staged, from_version="1.0", confirm=ConfirmPolicy(max_starts=1))
elif mode == "rollback":
    installer.rollback("crash test")
elif mode == "recover":
    installer.recover()
elif mode == "boot":
    installer.boot(now=time.time(), claim=False)
print(json.dumps(system.passed))
