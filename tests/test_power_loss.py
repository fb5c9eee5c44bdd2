"""Issue 16, point 2: power loss, checked state by state (the checker: tests/power_loss.py).

For an install (1.0 -> 1.1), a rollback and a guard's recovery of a killed install, with
each installer: every file operation is recorded through the ``System`` seam; at every point
of the run, every state a power cut could leave under POSIX's rules is written to disk, the
real guard runs on it (``selfupgrade.guard.guard``, the code ``selfupgrade guard`` runs), and
the daemon's files must then be exactly 1.0 or exactly 1.1, bytes and modes (the program
executable), with the journal recovered (not the guard's fallback for an unreadable one).
Then each fsync in turn is left out, and the checker reports for which it finds a state that
breaks that, and which this model and the recovery do not need (it must find some).

The trees live on /dev/shm where there is one (a power cut is simulated, so the disk's own
fsync costs nothing here), else in the test's temporary directory.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from selfupgrade import ConfirmPolicy, ReleaseInstaller, Role, TripleInstaller
from selfupgrade.guard import guard
from selfupgrade.install._journal import JournaledInstaller
from selfupgrade.testing import CrashingSystem, toy_release

from .crash_cases import Killed, die
from .power_loss import Model, TracingSystem

OLD, NEW = toy_release("1.0"), toy_release("1.1")


@dataclass
class Layout:
    """Where the files are, for one installer: the trees to model, and how to make one."""

    name: str
    base: Path

    @property
    def state(self) -> Path:
        return self.base / "state"

    @property
    def install(self) -> Path:
        return self.base / "opt"

    @property
    def files_dir(self) -> Path:
        return self.install / "current" if self.name == "releases" else self.install

    def installer(self, system: object = None) -> JournaledInstaller:
        if self.name == "releases":
            return ReleaseInstaller(self.install, state_dir=self.state, keep=2, system=system)  # type: ignore[arg-type]
        return TripleInstaller(self.state, system=system)  # type: ignore[arg-type]

    def lay_out_old(self) -> None:
        for path in (self.state, self.install):
            if os.path.lexists(path):
                shutil.rmtree(path)
        if self.name == "releases":
            OLD.install(self.install / "releases" / "1.0")
            (self.install / "current").symlink_to("releases/1.0")
        else:
            OLD.install(self.install)
        self.state.mkdir(parents=True)

    def install_new(self, system: object = None) -> None:
        inst = self.installer(system)
        staged = NEW.stage(inst, self.files_dir)
        inst.install("1.1", staged, from_version="1.0", confirm=ConfirmPolicy(max_starts=1))

    def version_found(self) -> str | None:
        """1.0 or 1.1 when the files are exactly that release's, bytes and modes (the
        program 0755, the others 0644, as first installed)."""
        for release in (OLD, NEW):
            if all(
                _is(self.files_dir / release.names[r], data, 0o755 if r == Role.BIN else 0o644)
                for r, data in release.files.items()
            ):
                return release.version
        return None


def _is(path: Path, data: bytes, mode: int) -> bool:
    return (
        path.is_file() and stat.S_IMODE(path.stat().st_mode) == mode and path.read_bytes() == data
    )


# ---- the operations: each prepares the trees, then runs the traced work ----------------------


def op_install(layout: Layout, system: TracingSystem | None) -> Callable[[], None]:
    layout.lay_out_old()
    inst = layout.installer(system)
    staged = NEW.stage(inst, layout.files_dir)  # the download: its bytes were fsynced

    def run() -> None:
        inst.install("1.1", staged, from_version="1.0", confirm=ConfirmPolicy(max_starts=1))

    return run


def op_rollback(layout: Layout, system: TracingSystem | None) -> Callable[[], None]:
    layout.lay_out_old()
    layout.install_new()
    inst = layout.installer(system)
    return lambda: inst.rollback("power-loss test")


def recovery(late: bool) -> Callable[[Layout, TracingSystem | None], Callable[[], None]]:
    """The guard's start after a SIGKILL at the middle of an install's checkpoints (it
    undoes the install) or at its last one (it finishes it)."""

    def prepare(layout: Layout, system: TracingSystem | None) -> Callable[[], None]:
        layout.lay_out_old()
        probe = CrashingSystem(10**6)
        layout.install_new(probe)  # counts the checkpoints
        layout.lay_out_old()
        at = len(probe.passed) - 1 if late else len(probe.passed) // 2
        with contextlib.suppress(Killed):
            layout.install_new(CrashingSystem(at, on_crash=die))
        inst = layout.installer(system)
        return lambda: inst.boot(now=time.time(), claim=False)

    return prepare


OPERATIONS: dict[str, Callable[[Layout, TracingSystem | None], Callable[[], None]]] = {
    "install": op_install,
    "rollback": op_rollback,
    "guard recovery of an early kill": recovery(late=False),
    "guard recovery of a late kill": recovery(late=True),
}
EXPECTED = {  # the version once the operation has run to its end
    "install": "1.1",
    "rollback": "1.0",
    "guard recovery of an early kill": "1.0",
    "guard recovery of a late kill": "1.1",
}


# ---- the checker ------------------------------------------------------------------------------


@dataclass
class Outcome:
    points: int = 0
    states: int = 0
    old: int = 0
    new: int = 0
    fallbacks: int = 0
    bad: list[str] | None = None


def trace(
    layout: Layout, operation: str, drop_fsync: int | None = None
) -> tuple[Model, TracingSystem]:
    """Prepare the trees, take the model of them, run the operation traced."""
    system = TracingSystem(drop_fsync)
    run = OPERATIONS[operation](layout, system)
    model = Model.of([layout.install, layout.state])
    run()
    return model, system


def check(
    layout: Layout, model: Model, ops: list[tuple[object, ...]], *, stop_at_bad: bool
) -> Outcome:
    """Every state a power cut could leave at each point of ``ops``, through the real guard."""
    out = Outcome(bad=[])
    replay = model.copy()
    for point in range(len(ops) + 1):
        if point:
            replay.apply(ops[point - 1])
        out.points += 1
        for state in replay.crash_states():
            out.states += 1
            state.write()
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                code = guard(layout.state, [], watch_trial=False)
            found = layout.version_found()
            fell_back = "the version whose files are whole on disk" in err.getvalue()
            out.fallbacks += fell_back
            if code != 0 or found is None or fell_back:
                assert out.bad is not None
                out.bad.append(
                    f"after {point} of {len(ops)} operations ({ops[point - 1] if point else '-'}): "
                    f"guard exit {code}, files {'a mix' if found is None else found}"
                    f"{' (the guard could not recover)' if fell_back else ''}; "
                    f"{err.getvalue().strip()[-300:]}"
                )
                if stop_at_bad:
                    return out
            elif found == "1.0":
                out.old += 1
            else:
                out.new += 1
    return out


@pytest.fixture
def base() -> Iterator[Path]:
    shm = Path("/dev/shm")
    with tempfile.TemporaryDirectory(
        prefix="su-power-", dir=shm if shm.is_dir() and os.access(shm, os.W_OK) else None
    ) as tmp:
        yield Path(tmp)


@pytest.mark.parametrize("operation", list(OPERATIONS))
@pytest.mark.parametrize("layout_name", ["triple", "releases"])
def test_every_state_a_power_cut_could_leave_starts_as_exactly_old_or_new(
    layout_name: str, operation: str, base: Path
) -> None:
    layout = Layout(layout_name, base)
    model, system = trace(layout, operation)
    if not operation.startswith("guard"):  # (a guard's recovery was the guard's start)
        with contextlib.redirect_stderr(io.StringIO()):
            assert guard(layout.state, [], watch_trial=False) == 0
    assert layout.version_found() == EXPECTED[operation]  # no power cut: what it is for
    out = check(layout, model, system.ops, stop_at_bad=False)
    fsyncs = sum(1 for op in system.ops if op[0] in ("fsync", "fsync_dir"))
    print(
        f"{layout_name} {operation}: {len(system.ops)} file operations ({fsyncs} fsyncs), "
        f"{out.points} crash points, {out.states} states checked: {out.old} start 1.0, "
        f"{out.new} start 1.1, {len(out.bad or [])} bad"
    )
    assert out.bad == [], "\n".join((out.bad or [])[:5])


@pytest.mark.parametrize("operation", list(OPERATIONS))
@pytest.mark.parametrize("layout_name", ["triple", "releases"])
def test_leaving_out_any_one_fsync_is_found(layout_name: str, operation: str, base: Path) -> None:
    layout = Layout(layout_name, base)
    _, full = trace(layout, operation)
    found, unneeded = [], []
    for k in range(full.fsyncs):
        model, system = trace(layout, operation, drop_fsync=k)
        dropped = [op for op in full.ops if op[0] in ("fsync", "fsync_dir")][k]
        out = check(layout, model, system.ops, stop_at_bad=True)
        (found if out.bad else unneeded).append(f"#{k} {dropped[0]} {Path(str(dropped[1])).name}")
    print(
        f"{layout_name} {operation}: {full.fsyncs} fsyncs; without each in turn, a bad state "
        f"found for {len(found)}; none for {unneeded}"
    )
    assert found, "no fsync is needed: the checker cannot fail"
