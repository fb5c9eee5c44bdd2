"""TripleInstaller in-process: swap, generations, start counting, confirm, rollback, lock."""

from __future__ import annotations

import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from selfupgrade import (
    ConfirmPolicy,
    HostNotReady,
    InstallFailed,
    InsufficientSpace,
    OperatorNeeded,
    RecoveryFailed,
    Role,
    StagedFile,
    TripleInstaller,
)
from selfupgrade._system import System
from selfupgrade.testing import TOY_FILES, toy_release

OLD = toy_release("1.0")
NEW = toy_release("1.1")


@pytest.fixture
def install_dir(tmp_path: Path) -> Path:
    d = tmp_path / "opt"
    OLD.install(d)
    (d / TOY_FILES[Role.CFG]).chmod(0o600)
    return d


def files(d: Path) -> dict[Role, bytes | None]:
    return {r: (d / n).read_bytes() if (d / n).exists() else None for r, n in TOY_FILES.items()}


def stage(installer: TripleInstaller, d: Path, release=NEW, roles=tuple(Role)) -> list[StagedFile]:  # type: ignore[no-untyped-def]
    return release.stage(installer, d, roles)


def strays(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if ".su-" in p.name and not p.name.endswith(".bak"))


def test_install_swaps_all_three_and_keeps_modes(tmp_path: Path, install_dir: Path) -> None:
    inst = TripleInstaller(tmp_path / "state")
    assert inst.install(
        "1.1", stage(inst, install_dir), from_version="1.0", confirm=ConfirmPolicy()
    )
    assert files(install_dir) == dict(NEW.files)
    assert stat.S_IMODE((install_dir / "toyd").stat().st_mode) == 0o755
    assert stat.S_IMODE((install_dir / "toy.json").stat().st_mode) == 0o600
    status = inst.status()
    assert (status.current_version, status.previous_version) == ("1.1", "1.0")
    assert status.pending is not None and status.pending.starts == 0
    assert strays(install_dir) == []
    backups = [p for p in install_dir.iterdir() if p.name.endswith(".bak")]
    assert sorted(p.read_bytes() for p in backups) == sorted(OLD.files.values())


def test_install_of_the_installed_version_does_nothing(tmp_path: Path, install_dir: Path) -> None:
    inst = TripleInstaller(tmp_path / "state")
    inst.install("1.1", stage(inst, install_dir), from_version="1.0", confirm=ConfirmPolicy())
    inst.confirm()
    again = stage(inst, install_dir)
    assert not inst.install("1.1", again, from_version="1.1", confirm=ConfirmPolicy())
    assert all(not f.staged.exists() for f in again)
    assert inst.status().previous_version == "1.0"


def test_install_while_another_version_is_on_trial_is_refused(
    tmp_path: Path, install_dir: Path
) -> None:
    inst = TripleInstaller(tmp_path / "state")
    inst.install("1.1", stage(inst, install_dir), from_version="1.0", confirm=ConfirmPolicy())
    with pytest.raises(InstallFailed, match=r"1\.1 is still on trial"):
        inst.install(
            "1.2",
            stage(inst, install_dir, toy_release("1.2")),
            from_version="1.1",
            confirm=ConfirmPolicy(),
        )
    assert files(install_dir) == dict(NEW.files)


def test_starts_are_counted_once_whether_guard_or_updater_counts(
    tmp_path: Path, install_dir: Path
) -> None:
    inst = TripleInstaller(tmp_path / "state")
    inst.install(
        "1.1",
        stage(inst, install_dir),
        from_version="1.0",
        confirm=ConfirmPolicy(max_starts=2, timeout_s=30),
    )
    r = inst.boot(now=1000.0, claim=False)  # the guard, start 1
    assert r.status.pending is not None and r.status.pending.starts == 1
    assert r.status.pending.deadline == 1030.0
    r = inst.boot(now=1001.0, claim=True)  # the daemon of that same start claims it
    assert r.status.pending is not None and r.status.pending.starts == 1
    r = inst.boot(now=1002.0, claim=True)  # a start without a guard counts itself
    assert r.status.pending is not None and r.status.pending.starts == 2
    r = inst.boot(now=1003.0, claim=False)  # third start: over the limit
    assert r.rolled_back and r.status.pending is None
    assert files(install_dir) == dict(OLD.files)
    assert r.status.current_version == "1.0"
    last = r.status.last_result
    assert last is not None and last.outcome == "rolled_back" and last.version == "1.1"
    assert "started 2 time(s) without confirming" in last.reason


def test_confirm_then_manual_rollback_then_nothing_left(tmp_path: Path, install_dir: Path) -> None:
    inst = TripleInstaller(tmp_path / "state")
    inst.install("1.1", stage(inst, install_dir), from_version="1.0", confirm=ConfirmPolicy())
    inst.boot(now=0.0, claim=True)
    inst.confirm()
    status = inst.status()
    assert status.pending is None and status.last_result is not None
    assert status.last_result.outcome == "confirmed"
    assert inst.rollback("operator said so") == "1.0"
    assert files(install_dir) == dict(OLD.files)
    assert stat.S_IMODE((install_dir / "toy.json").stat().st_mode) == 0o600
    with pytest.raises(OperatorNeeded, match="no previous generation"):
        inst.rollback("again")
    assert [p for p in install_dir.iterdir() if ".su-" in p.name] == []


def test_a_new_file_is_removed_by_rollback(tmp_path: Path, install_dir: Path) -> None:
    (install_dir / "toy.service").unlink()
    inst = TripleInstaller(tmp_path / "state")
    inst.install("1.1", stage(inst, install_dir), from_version="1.0", confirm=ConfirmPolicy())
    assert stat.S_IMODE((install_dir / "toy.service").stat().st_mode) == 0o644
    inst.rollback("test")
    assert not (install_dir / "toy.service").exists()
    assert files(install_dir)[Role.BIN] == OLD.files[Role.BIN]


def test_only_one_generation_of_backups_is_kept(tmp_path: Path, install_dir: Path) -> None:
    inst = TripleInstaller(tmp_path / "state")
    for old, new in (("1.0", "1.1"), ("1.1", "1.2"), ("1.2", "1.3")):
        inst.install(
            new,
            stage(inst, install_dir, toy_release(new)),
            from_version=old,
            confirm=ConfirmPolicy(),
        )
        inst.confirm()
    backups = sorted(p.read_bytes() for p in install_dir.iterdir() if p.name.endswith(".bak"))
    assert backups == sorted(toy_release("1.2").files.values())


class FailingAt(System):
    """A system whose steps fail: each ``(prefix, error)`` raises ``error`` at the steps
    whose name starts with ``prefix``."""

    def __init__(self, *faults: tuple[str, OSError]) -> None:
        super().__init__()
        self._faults = faults

    def checkpoint(self, step: str) -> None:
        for prefix, error in self._faults:
            if step.startswith(prefix):
                raise error


DISK_FULL = OSError(28, "No space left on device")


def test_a_failing_swap_is_undone(tmp_path: Path, install_dir: Path) -> None:
    inst = TripleInstaller(tmp_path / "state", system=FailingAt(("swap:cfg", DISK_FULL)))
    staged = stage(inst, install_dir)
    with pytest.raises(InstallFailed, match="No space left"):
        inst.install("1.1", staged, from_version="1.0", confirm=ConfirmPolicy())
    assert files(install_dir) == dict(OLD.files)
    assert inst.status().current_version is None
    assert [p for p in install_dir.iterdir() if ".su-" in p.name] == []


def test_a_failing_undo_says_so_with_both_causes(tmp_path: Path, install_dir: Path) -> None:
    """Issue 12, point 5: when the undo of a failed swap fails too (the disk went read-only
    in between), the error names both causes and the journal, not a bare ``OSError``."""
    read_only = OSError(30, "Read-only file system")
    system = FailingAt(("swap:cfg", DISK_FULL), ("restore:", read_only))
    inst = TripleInstaller(tmp_path / "state", system=system)
    staged = stage(inst, install_dir)
    with pytest.raises(RecoveryFailed) as info:
        inst.install("1.1", staged, from_version="1.0", confirm=ConfirmPolicy())
    said = str(info.value)
    print(said)
    assert "No space left" in said and "undoing it failed too" in said
    assert "Read-only file system" in said and "state.json" in said


def test_preflight_refuses_a_directory_that_cannot_be_written(tmp_path: Path) -> None:
    inst = TripleInstaller(tmp_path / "state")
    with pytest.raises(HostNotReady, match="/sys is not writable") as info:
        inst.preflight([(Path("/sys/toyd"), 10)])  # sysfs refuses new files, even to root
    assert info.value.path == "/sys"
    with pytest.raises(HostNotReady, match="does not exist"):
        inst.preflight([(tmp_path / "missing" / "toyd", 10)])


def test_preflight_refuses_when_space_is_short(tmp_path: Path, install_dir: Path) -> None:
    inst = TripleInstaller(tmp_path / "state")
    with pytest.raises(InsufficientSpace) as info:
        inst.preflight([(install_dir / "toyd", 10**15), (install_dir / "toy.json", 10)])
    assert info.value.needed == 10**15 + 10
    assert info.value.free < info.value.needed
    inst.preflight([(install_dir / "toyd", 1000)])


def test_two_threads_racing_install_once(tmp_path: Path, install_dir: Path) -> None:
    results: list[bool] = []
    barrier = threading.Barrier(2)

    def run() -> None:
        inst = TripleInstaller(tmp_path / "state")
        staged = stage(inst, install_dir)
        barrier.wait()
        results.append(inst.install("1.1", staged, from_version="1.0", confirm=ConfirmPolicy()))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False, True]
    status = TripleInstaller(tmp_path / "state").status()
    assert status.previous_version == "1.0"  # installed twice would have made it 1.1
    assert files(install_dir) == dict(NEW.files)
    assert strays(install_dir) == []


RACER = """
import sys, time
from pathlib import Path
from selfupgrade import TripleInstaller, ConfirmPolicy
from selfupgrade.testing import toy_release
state, d, go = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
inst = TripleInstaller(state)
staged = toy_release("1.1").stage(inst, d)
while not go.exists():
    time.sleep(0.001)
print(inst.install("1.1", staged, from_version="1.0", confirm=ConfirmPolicy()))
"""


def test_two_processes_racing_install_once(tmp_path: Path, install_dir: Path) -> None:
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, str(tmp_path / "state"), str(install_dir), str(go)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        go.touch()
        outs = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert outs == ["False", "True"]
    assert TripleInstaller(tmp_path / "state").status().previous_version == "1.0"
    assert files(install_dir) == dict(NEW.files)
    assert strays(install_dir) == []
