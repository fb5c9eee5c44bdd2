"""Child process for test_crash.py: one installer operation, SIGKILLed at a chosen checkpoint.

Usage: crash_child.py MODE STATE_DIR INSTALL_DIR CRASH_AT
MODE is install (1.0 -> 1.1), rollback, recover, or boot (a guard start).
Prints the checkpoints it passed, as JSON, if it was not killed.
"""

import json
import sys
import time
from pathlib import Path

from selfupgrade import ConfirmPolicy, TripleInstaller
from selfupgrade.testing import CrashingSystem, toy_release

mode, state_dir, install_dir, crash_at = (
    sys.argv[1],
    Path(sys.argv[2]),
    Path(sys.argv[3]),
    int(sys.argv[4]),
)
system = CrashingSystem(crash_at)
installer = TripleInstaller(state_dir, system=system)
if mode == "install":
    staged = toy_release("1.1").stage(installer, install_dir)
    installer.install("1.1", staged, from_version="1.0", confirm=ConfirmPolicy(max_starts=1))
elif mode == "rollback":
    installer.rollback("crash test")
elif mode == "recover":
    installer.recover()
elif mode == "boot":
    installer.boot(now=time.time(), claim=False)
print(json.dumps(system.passed))
