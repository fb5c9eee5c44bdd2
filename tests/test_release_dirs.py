"""Release directories (issue 15, point 3): releases/<version>/, a ``current`` link flipped
atomically, the newest ``keep`` kept; the triple installer's guarantees and crash tests.

The crash tests run a real child process that performs one operation of
:class:`~selfupgrade.ReleaseInstaller` and SIGKILLs itself at checkpoint N, then the real guard
(``python -m selfupgrade guard``, which finds the layout in the journal), and check what the
daemon would start through ``current``: byte for byte the old release or the new one, with
nothing half-built or staged left over.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from selfupgrade import (
    ConfirmPolicy,
    HostNotReady,
    InstallFailed,
    ReleaseInstaller,
    Role,
    TripleInstaller,
    UpgradeState,
    Version,
)
from selfupgrade.errors import InsufficientSpace, OperatorNeeded
from selfupgrade.guard import guard_command
from selfupgrade.install import open_installer
from selfupgrade.testing import (
    TOY_FILES,
    ArtifactServer,
    ControlServer,
    CrashingSystem,
    RecordingSystem,
    ServiceHarness,
    toy_release,
)

from . import crash_cases
from .crash_cases import Killed, cases, die, run_guard

OLDEST = toy_release("0.9")
OLD = toy_release("1.0")
NEW = toy_release("1.1")
NEWER = toy_release("1.2")


def laid_out(root: Path, release=OLD) -> Path:  # type: ignore[no-untyped-def]
    """A host as an operator sets it up: one release directory and ``current`` naming it."""
    release.install(root / "releases" / release.version)
    (root / "current").symlink_to(f"releases/{release.version}")
    return root


def through_current(root: Path) -> dict[Role, bytes | None]:
    d = root / "current"
    return {r: (d / n).read_bytes() if (d / n).exists() else None for r, n in TOY_FILES.items()}


CFG_ONLY = {**OLD.files, Role.CFG: NEW.files[Role.CFG]}
"""What an order that brings only 1.1's config installs over 1.0."""


def which(root: Path, new: object = None) -> str:
    t = through_current(root)
    for name, files in (("old", dict(OLD.files)), ("new", new or dict(NEW.files))):
        if t == files:
            return name
    pytest.fail(f"current is neither release: { {r.value: (v or b'')[:40] for r, v in t.items()} }")


def leftovers(root: Path, state_dir: Path) -> list[str]:
    """Staged or temporary files in the root or releases/, and release directories the
    journal does not name."""
    inst = ReleaseInstaller(root, state_dir=state_dir, keep=2)
    state = inst._load()
    named = set(state.get("kept", [])) | {
        (state.get(g) or {}).get("dir") for g in ("current", "previous")
    }
    out = leftovers_in(root)
    out += [f"releases/{p.name}" for p in (root / "releases").iterdir() if p.is_dir()]
    return sorted(x for x in out if x.removeprefix("releases/") not in named)


def install(inst: ReleaseInstaller, root: Path, release=NEW, frm="1.0", roles=None) -> bool:  # type: ignore[no-untyped-def]
    staged = release.stage(inst, root / "current", roles)
    return inst.install(
        release.version, staged, from_version=frm, confirm=ConfirmPolicy(max_starts=1)
    )


guard = run_guard


# ---- the behaviour -----------------------------------------------------------------------


def test_an_install_builds_a_directory_and_flips_current(tmp_path: Path) -> None:
    root = laid_out(tmp_path / "opt")
    inst = ReleaseInstaller(root)
    assert install(inst, root) is True
    assert os.readlink(root / "current") == "releases/1.1"
    assert through_current(root) == dict(NEW.files)
    assert (root / "releases" / "1.0" / "toyd").read_bytes() == OLD.files[Role.BIN]
    status = inst.status()
    assert (status.current_version, status.previous_version) == ("1.1", "1.0")
    assert status.pending is not None and status.pending.version == "1.1"
    assert os.stat(root / "current" / "toyd").st_mode & 0o777 == 0o755
    assert leftovers_in(root) == []


def leftovers_in(root: Path) -> list[str]:
    """Staged or temporary files in the root or releases/."""
    dirs = (root, root / "releases")
    return sorted(p.name for d in dirs for p in d.iterdir() if ".su-" in p.name)


def test_an_order_with_one_file_carries_the_others_over_as_copies(tmp_path: Path) -> None:
    root = laid_out(tmp_path / "opt")
    inst = ReleaseInstaller(root)
    install(inst, root, roles=[Role.CFG])
    new = root / "releases" / "1.1"
    assert (new / "toy.json").read_bytes() == NEW.files[Role.CFG]
    assert (new / "toyd").read_bytes() == OLD.files[Role.BIN]
    # a copy, not a second name: changing one release's file cannot change another's
    assert (new / "toyd").stat().st_ino != (root / "releases" / "1.0" / "toyd").stat().st_ino
    assert inst.status().pending is not None and inst.status().pending.roles == ("cfg",)


def test_the_newest_keep_releases_are_kept_never_current_or_previous(tmp_path: Path) -> None:
    root = laid_out(tmp_path / "opt", OLDEST)
    inst = ReleaseInstaller(root, keep=2)
    for release, frm in ((OLD, "0.9"), (NEW, "1.0"), (NEWER, "1.1")):
        install(inst, root, release, frm)
        inst.confirm()
    assert sorted(p.name for p in (root / "releases").iterdir()) == ["1.1", "1.2"]
    assert inst.status().previous_version == "1.1"
    assert inst.rollback("back") == "1.1"
    assert through_current(root) == dict(NEW.files)
    # the failed release is deleted with its rollback; what a rollback restores stays
    assert sorted(p.name for p in (root / "releases").iterdir()) == ["1.1"]


def test_a_rollback_at_the_guard_flips_back_and_drops_the_failed_release(tmp_path: Path) -> None:
    root = laid_out(tmp_path / "opt")
    inst = ReleaseInstaller(root)
    install(inst, root)
    guard(inst.state_dir)  # start 1 of 1, through the journal's layout
    out = guard(inst.state_dir)  # start 2: beyond max_starts
    assert "rolled back" in out.stderr
    assert os.readlink(root / "current") == "releases/1.0"
    assert through_current(root) == dict(OLD.files)
    assert not (root / "releases" / "1.1").exists()
    last = inst.status().last_result
    assert last is not None and last.outcome == "rolled_back" and last.version == "1.1"


def test_reinstalling_a_kept_version_gets_a_directory_of_its_own(tmp_path: Path) -> None:
    root = laid_out(tmp_path / "opt")
    inst = ReleaseInstaller(root, keep=4)
    install(inst, root)
    inst.confirm()
    install(inst, root, NEWER, "1.1")
    inst.confirm()
    install(inst, root, toy_release("1.0", config={"interval_s": 0.7}), "1.2")
    target = os.readlink(root / "current")
    assert target.startswith("releases/1.0~"), target
    assert (root / "releases" / "1.0" / "toy.json").read_bytes() == OLD.files[Role.CFG]


def test_the_installed_version_with_the_same_files_is_not_reinstalled(tmp_path: Path) -> None:
    root = laid_out(tmp_path / "opt")
    inst = ReleaseInstaller(root)
    install(inst, root)
    assert install(inst, root, NEW, "1.1") is False
    assert leftovers_in(root) == []


def test_a_layout_without_a_current_link_is_refused_with_what_to_do(tmp_path: Path) -> None:
    root = tmp_path / "opt"
    OLD.install(root / "current")  # a real directory, not a link
    (root / "releases").mkdir()
    inst = ReleaseInstaller(root)
    with pytest.raises(HostNotReady, match=r"must be a symbolic link to a directory in .*ln -s"):
        inst.preflight([(root / "current" / "toyd", 10)])
    before = sorted(str(p) for p in root.rglob("*"))
    with pytest.raises(HostNotReady):
        install(inst, root)
    assert sorted(str(p) for p in root.rglob("*") if ".su-" not in p.name) == before


def test_a_target_outside_current_is_refused(tmp_path: Path) -> None:
    root = laid_out(tmp_path / "opt")
    with pytest.raises(HostNotReady, match="installs only files inside"):
        ReleaseInstaller(root).preflight([(tmp_path / "elsewhere" / "toyd", 10)])


def test_preflight_counts_the_copies_of_the_files_carried_over(tmp_path: Path) -> None:
    root = laid_out(tmp_path / "opt")
    big = root / "releases" / "1.0" / "data.bin"
    with open(big, "wb") as f:
        f.truncate(1 << 40)  # sparse: a TiB that a copy would need
    with pytest.raises(InsufficientSpace, match="not enough space"):
        ReleaseInstaller(root).preflight([(root / "current" / "toyd", 10)])


def test_keep_below_two_and_a_state_dir_inside_releases_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 2"):
        ReleaseInstaller(tmp_path, keep=1)
    with pytest.raises(ValueError, match="inside"):
        ReleaseInstaller(tmp_path, state_dir=tmp_path / "releases" / "state")


def test_the_journal_names_its_installer_and_a_mismatch_is_refused(tmp_path: Path) -> None:
    root = laid_out(tmp_path / "opt")
    inst = ReleaseInstaller(root, state_dir=tmp_path / "state", keep=4)
    install(inst, root)
    opened = open_installer(tmp_path / "state")
    assert isinstance(opened, ReleaseInstaller)
    assert (opened.root, opened.keep) == (root, 4)
    with pytest.raises(OperatorNeeded, match="journal of a releases installer"):
        TripleInstaller(tmp_path / "state").status()
    assert isinstance(open_installer(tmp_path / "empty"), TripleInstaller)


def test_a_failing_build_is_undone_and_current_is_untouched(tmp_path: Path) -> None:
    root = laid_out(tmp_path / "opt")

    class Full(CrashingSystem):
        def checkpoint(self, step: str) -> None:
            if step == "place:cfg":
                raise OSError(28, "No space left on device")

    inst = ReleaseInstaller(root, system=Full(-1))
    with pytest.raises(InstallFailed, match="undone"):
        install(inst, root)
    assert os.readlink(root / "current") == "releases/1.0"
    assert sorted(p.name for p in (root / "releases").iterdir()) == ["1.0"]
    assert leftovers_in(root) == []


def test_the_version_on_disk_is_the_release_current_names_while_it_is_whole(
    tmp_path: Path,
) -> None:
    """What a guard that cannot write the journal would start (``version_on_disk``)."""
    root = laid_out(tmp_path / "opt")
    inst = ReleaseInstaller(root)
    install(inst, root)
    assert inst.version_on_disk() == "1.1"
    (root / "releases" / "1.1" / "toy.json").write_bytes(b"altered")
    assert inst.version_on_disk() is None


# ---- SIGKILL at every checkpoint ---------------------------------------------------------


def run_child(
    mode: str, state: Path, root: Path, crash_at: int
) -> subprocess.CompletedProcess[str]:
    return crash_cases.run_child(mode, state, root, crash_at, "releases")


def fresh(base: Path) -> tuple[Path, Path]:
    """1.0 is current and 0.9 is kept (keep=2), so that installing 1.1 also prunes 0.9."""
    root = laid_out(base / "opt", OLDEST)
    inst = ReleaseInstaller(root, state_dir=base / "state", keep=2)
    install(inst, root, OLD, "0.9")
    inst.confirm()
    return base / "state", root


def installed(base: Path, system: RecordingSystem | None = None) -> tuple[Path, Path]:
    state, root = fresh(base)
    install(ReleaseInstaller(root, state_dir=state, keep=2, system=system), root)
    return state, root


def _checkpoints() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        rec = RecordingSystem()
        installed(base / "install", rec)
        out["install"] = rec.steps
        state, root = fresh(base / "install-cfg")
        rec = RecordingSystem()
        install(ReleaseInstaller(root, state_dir=state, keep=2, system=rec), root, roles=[Role.CFG])
        out["install-cfg"] = rec.steps
        state, root = installed(base / "rollback")
        rec = RecordingSystem()
        ReleaseInstaller(root, state_dir=state, keep=2, system=rec).rollback("probe")
        out["rollback"] = rec.steps
        state, root = installed(base / "boot")
        ReleaseInstaller(root, state_dir=state, keep=2).boot(now=time.time(), claim=False)
        rec = RecordingSystem()
        ReleaseInstaller(root, state_dir=state, keep=2, system=rec).boot(
            now=time.time(), claim=False
        )
        out["boot"] = rec.steps
        state, root = fresh(base / "recover")
        crash = CrashingSystem(out["install"].index("flip") + 1, on_crash=die)
        with contextlib.suppress(Killed):
            install(ReleaseInstaller(root, state_dir=state, keep=2, system=crash), root)
        rec = RecordingSystem()
        ReleaseInstaller(root, state_dir=state, keep=2, system=rec).recover()
        out["recover"] = rec.steps
    return out


STEPS = _checkpoints()


def _cases(mode: str) -> list[object]:
    return cases(STEPS, mode)


def test_an_install_has_the_journaled_steps() -> None:
    steps = STEPS["install"]
    for expected in (
        "journal:prepared",
        "mkdir:release",
        "place:bin",
        "journal:built",
        "flip",
        "journal:swapped",
        "journal:pruned",
        "drop:0.9",
    ):
        assert expected in steps, steps
    assert steps.index("journal:built") < steps.index("flip") < steps.index("journal:swapped")


@pytest.mark.parametrize("crash_at", _cases("install"))
def test_sigkill_during_an_install(tmp_path: Path, crash_at: int) -> None:
    steps = STEPS["install"]
    state, root = fresh(tmp_path)
    result = run_child("install", state, root, crash_at)
    assert result.returncode == -signal.SIGKILL, f"not killed at {steps[crash_at]}: {result.stderr}"
    guard(state)
    outcome = which(root)
    status = ReleaseInstaller(root, state_dir=state, keep=2).status()
    assert status.current_version == ("1.1" if outcome == "new" else "1.0")
    if outcome == "new":
        assert status.pending is not None and status.previous_version == "1.0"
    if crash_at > steps.index("journal:built"):
        assert outcome == "new", f"a crash at {steps[crash_at]} should roll forward"
    if crash_at <= steps.index("journal:prepared"):
        assert outcome == "old"
    assert leftovers(root, state) == []


@pytest.mark.parametrize("crash_at", _cases("install-cfg"))
def test_sigkill_during_an_install_that_carries_files_over(tmp_path: Path, crash_at: int) -> None:
    """Only the config is new: the program and the service file are copied into 1.1."""
    steps = STEPS["install-cfg"]
    assert "carry:toyd" in steps
    state, root = fresh(tmp_path)
    result = run_child("install-cfg", state, root, crash_at)
    assert result.returncode == -signal.SIGKILL, f"not killed at {steps[crash_at]}: {result.stderr}"
    guard(state)
    outcome = which(root, CFG_ONLY)
    assert outcome == ("new" if crash_at > steps.index("journal:built") else "old")
    assert leftovers(root, state) == []


@pytest.mark.parametrize("crash_at", _cases("rollback"))
def test_sigkill_during_a_rollback(tmp_path: Path, crash_at: int) -> None:
    steps = STEPS["rollback"]
    state, root = installed(tmp_path)
    result = run_child("rollback", state, root, crash_at)
    assert result.returncode == -signal.SIGKILL
    guard(state)
    outcome = which(root)
    status = ReleaseInstaller(root, state_dir=state, keep=2).status()
    if crash_at > steps.index("journal:rollback"):
        assert outcome == "old" and status.current_version == "1.0"
    else:
        assert outcome == "new"
    assert leftovers(root, state) == []


@pytest.mark.parametrize("crash_at", _cases("boot"))
def test_sigkill_during_a_guard_rollback(tmp_path: Path, crash_at: int) -> None:
    state, root = installed(tmp_path)
    guard(state)  # start 1 of 1.1
    result = run_child("boot", state, root, crash_at)  # start 2: over the limit
    assert result.returncode == -signal.SIGKILL
    guard(state)
    status = ReleaseInstaller(root, state_dir=state, keep=2).status()
    if status.pending is None:
        assert which(root) == "old" and status.current_version == "1.0"
    else:
        assert which(root) == "new"
    assert leftovers(root, state) == []


@pytest.mark.parametrize("crash_at", _cases("recover"))
def test_sigkill_during_the_recovery_of_a_crashed_install(tmp_path: Path, crash_at: int) -> None:
    """Killed just after the flip, then killed again while recovering."""
    state, root = fresh(tmp_path)
    flip = STEPS["install"].index("flip")
    assert run_child("install", state, root, flip + 1).returncode == -signal.SIGKILL
    result = run_child("recover", state, root, crash_at)
    assert result.returncode == -signal.SIGKILL
    guard(state)
    assert which(root) == "new"
    assert leftovers(root, state) == []


# ---- a real daemon -----------------------------------------------------------------------

E2E_CFG = {"confirm_timeout_s": 4, "max_starts": 2, "interval_s": 0.3, "failure_backoff_s": 30}


@pytest.mark.real
def test_a_real_daemon_upgrades_into_a_release_directory_and_a_crashing_one_is_rolled_back(
    tmp_path: Path, artifact_server: ArtifactServer, control_server: ControlServer
) -> None:
    """The toy daemon, under a restart-always harness, through the guard: 1.1 is installed in
    releases/1.1 and confirmed; 1.2, which crashes at start, is rolled back by the guard to
    1.1 and its directory deleted."""
    old, new = toy_release("1.0", config=E2E_CFG), toy_release("1.1", config=E2E_CFG)
    bad = toy_release("1.2", behaviour="crash", config=E2E_CFG)
    for release in (new, bad):
        for role in Role:
            artifact_server.add(release.artifact_name(role), release.files[role])
    root = laid_out(tmp_path / "opt", old)
    state = tmp_path / "state"
    env = {
        "TOY_HOST": "toy-1",
        "TOY_HBS": control_server.url,
        "TOY_STATE_DIR": str(state),
        "TOY_RELEASES": str(root),
    }
    command = guard_command(state, [str(root / "current" / "toyd")])
    with ServiceHarness(command, env=env, log_path=tmp_path / "toy.log") as svc:
        control_server.wait_for_version("toy-1", "1.0", timeout_s=20)
        control_server.publish(new.order(artifact_server.base_url, task_id="r1"))
        beat = control_server.wait_for_version("toy-1", "1.1", timeout_s=30)
        assert beat.confirmed or control_server.wait_for(
            lambda bs: any(b.version == Version("1.1") and b.confirmed for b in bs), timeout_s=20
        )
        assert os.readlink(root / "current") == "releases/1.1"
        assert through_current(root) == dict(new.files)
        control_server.publish(bad.order(artifact_server.base_url, task_id="r2"))
        beats = control_server.wait_for(
            lambda bs: any(b.state == UpgradeState.ROLLED_BACK for b in bs), timeout_s=60
        )
        starts = svc.starts
    back = next(b for b in beats if b.state == UpgradeState.ROLLED_BACK)
    print(f"rolled back: {back.version} (failed {back.failed_version}); {starts} starts")
    assert str(back.version) == "1.1" and str(back.failed_version) == "1.2"
    assert os.readlink(root / "current") == "releases/1.1"
    assert through_current(root) == dict(new.files)
    assert sorted(p.name for p in (root / "releases").iterdir()) == ["1.0", "1.1"]
    assert leftovers_in(root) == []
