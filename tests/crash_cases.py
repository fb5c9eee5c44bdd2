"""What the SIGKILL-at-every-checkpoint tests share (tests/test_crash.py for the triple,
tests/test_release_dirs.py for release directories): the child that dies at a checkpoint,
the in-process stand-in for SIGKILL used to record checkpoints, and the real guard run."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

CHILD = str(Path(__file__).with_name("crash_child.py"))


class Killed(BaseException):
    """Stands for SIGKILL in the in-process probe: nothing catches it."""


def die(step: str) -> None:
    """``CrashingSystem``'s ``on_crash`` for the in-process probe."""
    raise Killed(step)


def cases(steps: Mapping[str, Sequence[str]], mode: str) -> list[object]:
    """One pytest case per checkpoint of ``mode``, named by its index and step."""
    return [pytest.param(i, id=f"{i}-{step}") for i, step in enumerate(steps[mode])]


def run_child(
    mode: str, state: Path, install: Path, crash_at: int, layout: str = "triple"
) -> subprocess.CompletedProcess[str]:
    """``crash_child.py``: one installer operation, SIGKILLed at checkpoint ``crash_at``."""
    return subprocess.run(
        [sys.executable, CHILD, mode, str(state), str(install), str(crash_at), layout],
        capture_output=True,
        text=True,
        timeout=60,
    )


def run_guard(state: Path) -> subprocess.CompletedProcess[str]:
    """The real guard, in a fresh process, as at the daemon's next start; it must succeed."""
    result = subprocess.run(
        [sys.executable, "-m", "selfupgrade", "guard", "--state-dir", str(state)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result
