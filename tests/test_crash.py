"""SIGKILL at every journaled step leaves exactly the old or exactly the new triple.

Each case runs a real child process that performs one installer operation and SIGKILLs itself
at checkpoint N (``CrashingSystem``). Then the real guard (``python -m selfupgrade guard``)
runs in a fresh process, as it would at the daemon's next start, and the test compares the
three files byte for byte with the old and the new release, and checks that the installer's
record agrees with the files and that no staged or temporary file is left behind.
"""

from __future__ import annotations

import contextlib
import signal
import tempfile
import time
from pathlib import Path

import pytest

from selfupgrade import ConfirmPolicy, Role, TripleInstaller
from selfupgrade.testing import TOY_FILES, CrashingSystem, RecordingSystem, toy_release

from .crash_cases import Killed, cases, die, run_child, run_guard

OLD = toy_release("1.0")
NEW = toy_release("1.1")
NEVER = 10_000
guard = run_guard


def triple(d: Path) -> dict[Role, bytes | None]:
    return {r: (d / n).read_bytes() if (d / n).exists() else None for r, n in TOY_FILES.items()}


def which(d: Path) -> str:
    t = triple(d)
    if t == dict(OLD.files):
        return "old"
    if t == dict(NEW.files):
        return "new"
    pytest.fail(f"mixed triple: { {r.value: (v or b'')[:40] for r, v in t.items()} }")


def leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.endswith((".new", ".tmp")))


def fresh(base: Path) -> tuple[Path, Path]:
    install = base / "opt"
    OLD.install(install)
    return base / "state", install


def installed(base: Path, system: RecordingSystem | None = None) -> tuple[Path, Path]:
    state, install = fresh(base)
    inst = TripleInstaller(state, system=system)
    inst.install(
        "1.1", NEW.stage(inst, install), from_version="1.0", confirm=ConfirmPolicy(max_starts=1)
    )
    return state, install


def _checkpoints() -> dict[str, list[str]]:
    """The checkpoints of each operation, recorded in-process with the real file effects."""
    out: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        rec = RecordingSystem()
        installed(Path(tmp) / "install", rec)
        out["install"] = rec.steps
        state, _ = installed(Path(tmp) / "rollback")
        rec = RecordingSystem()
        TripleInstaller(state, system=rec).rollback("probe")
        out["rollback"] = rec.steps
        state, _ = installed(Path(tmp) / "boot")
        TripleInstaller(state).boot(now=time.time(), claim=False)
        rec = RecordingSystem()
        TripleInstaller(state, system=rec).boot(now=time.time(), claim=False)
        out["boot"] = rec.steps
        state, install = fresh(Path(tmp) / "recover")
        crash = CrashingSystem(out["install"].index("swap:bin") + 1, on_crash=die)
        inst = TripleInstaller(state, system=crash)
        with contextlib.suppress(Killed):
            inst.install(
                "1.1", NEW.stage(inst, install), from_version="1.0", confirm=ConfirmPolicy()
            )
        rec = RecordingSystem()
        TripleInstaller(state, system=rec).recover()
        out["recover"] = rec.steps
    return out


STEPS = _checkpoints()


def _cases(mode: str) -> list[object]:
    return cases(STEPS, mode)


def test_install_has_journaled_steps() -> None:
    steps = STEPS["install"]
    for expected in (
        "journal:prepared",
        "backup:bin",
        "journal:backed_up",
        "swap:cfg",
        "journal:swapped",
    ):
        assert expected in steps
    assert len(steps) >= 11


@pytest.mark.parametrize("crash_at", _cases("install"))
def test_sigkill_during_install(tmp_path: Path, crash_at: int) -> None:
    steps = STEPS["install"]
    state, install = fresh(tmp_path / "case")
    result = run_child("install", state, install, crash_at)
    assert result.returncode == -signal.SIGKILL, f"not killed at {steps[crash_at]}: {result.stderr}"
    guard(state)
    outcome = which(install)
    status = TripleInstaller(state).status()
    assert status.current_version == (
        "1.1" if outcome == "new" else None if status.current_version is None else "1.0"
    )
    if outcome == "new":
        assert status.pending is not None and status.previous_version == "1.0"
    assert leftovers(install) == []
    # a crash after the backups exist must be finished, not undone
    if steps.index("journal:backed_up") < crash_at:
        assert outcome == "new", f"crash at {steps[crash_at]} should roll forward"
    if crash_at <= steps.index("journal:prepared"):
        assert outcome == "old"


@pytest.mark.parametrize("crash_at", _cases("rollback"))
def test_sigkill_during_rollback(tmp_path: Path, crash_at: int) -> None:
    steps = STEPS["rollback"]
    state, install = installed(tmp_path / "case")
    result = run_child("rollback", state, install, crash_at)
    assert result.returncode == -signal.SIGKILL
    guard(state)
    outcome = which(install)
    status = TripleInstaller(state).status()
    if crash_at > steps.index("journal:rollback"):
        assert outcome == "old" and status.current_version == "1.0"
    else:
        assert outcome == "new"
    assert leftovers(install) == []


@pytest.mark.parametrize("crash_at", _cases("recover"))
def test_sigkill_during_recovery_of_a_crashed_install(tmp_path: Path, crash_at: int) -> None:
    """Killed after swapping the program, then killed again while recovering."""
    first_swap = STEPS["install"].index("swap:bin")
    state, install = fresh(tmp_path / "case")
    assert run_child("install", state, install, first_swap + 1).returncode == -signal.SIGKILL
    result = run_child("recover", state, install, crash_at)
    assert result.returncode == -signal.SIGKILL
    guard(state)
    assert which(install) == "new"
    assert leftovers(install) == []


@pytest.mark.parametrize("crash_at", _cases("boot"))
def test_sigkill_during_a_guard_rollback(tmp_path: Path, crash_at: int) -> None:
    """max_starts=1: the second guard start rolls back; kill it anywhere in that."""
    state, install = installed(tmp_path / "case")
    guard(state)  # start 1 of 1.1
    result = run_child("boot", state, install, crash_at)  # start 2: over the limit
    assert result.returncode == -signal.SIGKILL
    guard(state)
    status = TripleInstaller(state).status()
    if status.pending is None:
        assert which(install) == "old" and status.current_version == "1.0"
        assert status.last_result is not None and status.last_result.outcome == "rolled_back"
    else:
        assert which(install) == "new"
    assert leftovers(install) == []
