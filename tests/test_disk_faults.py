"""Issue 12: the agent never dies of its own safety net.

Real read-only and full file systems (small tmpfs mounts made and removed by each test, as
root), the real guard and toy daemon as child processes, real SIGKILLs inside writes.
Without root (or where mounting is not allowed) the tests skip naming the reason; in CI
(``SELFUPGRADE_REQUIRE_MOUNT=1``) that is a failure.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from selfupgrade import ConfirmPolicy, Role, TripleInstaller, UpgradeState
from selfupgrade._download import download_artifact
from selfupgrade.errors import HostNotReady, InsufficientSpace
from selfupgrade.guard import guard_command
from selfupgrade.models import Artifact, Digest
from selfupgrade.testing import ArtifactServer, ControlServer, ServiceHarness, toy_release
from selfupgrade.verify.digest import DigestVerifier

pytestmark = pytest.mark.real

CFG = {"confirm_timeout_s": 30, "max_starts": 3, "interval_s": 0.3, "failure_backoff_s": 30}
OLD = toy_release("1.0", config=CFG)
NEW = toy_release("1.1", config=CFG)


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "4m") -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``path`` for the block; unmounted after, also on failure."""
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        why = f"cannot mount a tmpfs ({done.stderr.strip()}): run the tests as root"
        if os.environ.get("SELFUPGRADE_REQUIRE_MOUNT") == "1":
            pytest.fail(f"{why} (SELFUPGRADE_REQUIRE_MOUNT=1)")
        pytest.skip(why)
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False)


def read_only(path: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)


def fill(path: Path) -> None:
    """Write until the file system at ``path`` is full."""
    fd = os.open(path / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"\0" * 4096)
    finally:
        os.close(fd)


def toy(state: Path, install: Path, hbs: ControlServer, log: Path) -> ServiceHarness:
    env = {"TOY_HOST": "toy-1", "TOY_HBS": hbs.url, "TOY_STATE_DIR": str(state)}
    return ServiceHarness(guard_command(state, [str(install / "toyd")]), env=env, log_path=log)


def on_trial_of_new(state: Path, install: Path) -> None:
    """1.0 installed, then 1.1 swapped in and on trial (as after an upgrade's restart)."""
    OLD.install(install)
    installer = TripleInstaller(state)
    staged = NEW.stage(installer, install)
    installer.install("1.1", staged, from_version="1.0", confirm=ConfirmPolicy(max_starts=3))


def test_a_read_only_state_directory_still_starts_the_daemon(
    tmp_path: Path, control_server: ControlServer
) -> None:
    """Point 2: ``boot()`` opened ``<state>/lock`` for writing even with nothing to write;
    the guard crashed with a traceback and no version ran."""
    install = tmp_path / "opt"
    OLD.install(install)
    with tmpfs(tmp_path / "state") as state:
        TripleInstaller(state).recover()  # the lock file exists, as on a host that ran once
        read_only(state)
        with toy(state, install, control_server, tmp_path / "toy.log") as svc:
            beat = control_server.wait_for_version("toy-1", "1.0", timeout_s=20)
            uptime_from = time.monotonic()
            time.sleep(2)
            print(f"read-only state dir: 1.0 runs, {len(svc.exits)} exits in 2 s; {beat.error}")
            assert svc.exits == [], (tmp_path / "toy.log").read_text()
            assert time.monotonic() - uptime_from >= 2
        assert "Traceback" not in (tmp_path / "toy.log").read_text()


def test_a_full_state_directory_during_a_trial_starts_the_whole_version_and_says_why(
    tmp_path: Path, control_server: ControlServer
) -> None:
    """Point 2: with a version on trial, the start cannot be counted on a full disk."""
    install = tmp_path / "opt"
    with tmpfs(tmp_path / "state", "1m") as state:
        on_trial_of_new(state, install)
        fill(state)
        log = tmp_path / "toy.log"
        with toy(state, install, control_server, log) as svc:
            beats = control_server.wait_for(
                lambda bs: any(b.error and "file system is full" in b.error for b in bs),
                timeout_s=20,
            )
            time.sleep(1)
            exits = list(svc.exits)
        said = next(b for b in beats if b.error and "file system is full" in b.error)
        print(f"full state dir on trial: runs {said.version}, reported {said.error!r}")
        assert str(said.version) == "1.1" and exits == []
        assert "started 1.1, the version whose files are whole on disk" in log.read_text()
        assert "Traceback" not in log.read_text()


def test_a_read_only_install_directory_with_an_interrupted_install_starts_the_old_version(
    tmp_path: Path, control_server: ControlServer
) -> None:
    """Point 3: recovery insisted on unlinking the staged files first, and the guard
    crash-looped although the old triple was whole on disk."""
    state = tmp_path / "state"
    with tmpfs(tmp_path / "opt") as install:
        OLD.install(install)
        installer = TripleInstaller(state)
        staged = NEW.stage(installer, install)
        spec = repr([(f.role.value, str(f.target), str(f.staged), f.mode) for f in staged])
        child = textwrap.dedent(
            f"""
            import os, signal, sys
            from pathlib import Path
            from selfupgrade import ConfirmPolicy, TripleInstaller, StagedFile, Role
            from selfupgrade._system import System

            class KillAtBackup(System):
                def checkpoint(self, step):
                    if step.startswith("backup:"):
                        os.kill(os.getpid(), signal.SIGKILL)

            staged = [StagedFile(Role(r), Path(t), Path(s), m) for r, t, s, m in {spec}]
            TripleInstaller({str(state)!r}, system=KillAtBackup()).install(
                "1.1", staged, from_version="1.0", confirm=ConfirmPolicy())
            """
        )
        killed = subprocess.run([sys.executable, "-c", child], check=False)
        assert killed.returncode == -9
        assert TripleInstaller(state).status().pending is None  # journal: "prepared"
        read_only(install)
        log = tmp_path / "toy.log"
        with toy(state, install, control_server, log) as svc:
            beat = control_server.wait_for(
                lambda bs: any(b.error and "read-only" in b.error for b in bs), timeout_s=20
            )[-1]
            time.sleep(1)
            exits = list(svc.exits)
        print(f"read-only install dir, interrupted install: runs {beat.version}; {beat.error!r}")
        assert str(beat.version) == "1.0" and exits == []
        assert {r: (install / n).read_bytes() for r, n in OLD.names.items()} == dict(OLD.files)


@pytest.mark.parametrize("where", ["journal", "preflight probe"])
def test_a_kill_inside_a_write_leaves_nothing_the_guard_does_not_remove(
    tmp_path: Path, where: str
) -> None:
    """Point 4: ``.state.json.*.tmp`` and ``.su-probe-*`` were left for good."""
    state, install = tmp_path / "state", tmp_path / "opt"
    on_trial_of_new(state, install)
    TripleInstaller(state).confirm()
    # SIGKILL inside the write: after the temporary file exists, before it is renamed away
    patch = "os.replace" if where == "journal" else "os.unlink"
    child = textwrap.dedent(
        f"""
        import os, signal
        from pathlib import Path
        from selfupgrade import TripleInstaller
        installer = TripleInstaller({str(state)!r})
        {patch} = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
        target = Path({str(install / "toyd")!r})
        if {where!r} == "journal":
            installer.rollback("a kill inside the journal write")
        else:
            installer.preflight([(target, 10)])
        """
    )
    assert subprocess.run([sys.executable, "-c", child], check=False).returncode == -9

    def temporary() -> list[str]:
        return sorted(p.name for d in (state, install) for p in d.iterdir() if ".tmp" in p.name)

    left = temporary()
    print(f"a kill inside the {where}: left {left}")
    assert left
    done = subprocess.run(
        guard_command(state, []), capture_output=True, text=True, check=False, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert temporary() == []


def test_a_full_disk_during_a_download_is_a_disk_error_not_a_network_one(tmp_path: Path) -> None:
    """Point 5: reported as ``GET ... failed in the fetcher: OSError: [Errno 28]``."""

    class NoLength:  # a server that sends no Content-Length
        def fetch(self, url: str, sink, *, deadline: float, max_bytes: int) -> None:  # type: ignore[no-untyped-def]
            for _ in range(64):
                sink.write(b"\0" * (1 << 20))

        def close(self) -> None:
            pass

    with tmpfs(tmp_path / "opt", "4m") as install:
        artifact = Artifact(Role.BIN, "http://127.0.0.1:9/bin", Digest("sha256", "0" * 64))
        with pytest.raises(InsufficientSpace) as caught:
            download_artifact(
                artifact,
                install / ".toyd.su-0.new",
                fetcher=NoLength(),  # type: ignore[arg-type]
                verifier=DigestVerifier(),
                max_bytes=1 << 30,
                timeout_s=60,
            )
        print("a full disk mid-download:", caught.value)
        assert "writing the download to" in str(caught.value)
        assert "the file system is full" in str(caught.value)
        assert not (install / ".toyd.su-0.new").exists()


def test_a_full_journal_is_a_disk_error_naming_the_journal(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "state", "1m") as state:
        installer = TripleInstaller(state)
        fill(state)
        with pytest.raises(HostNotReady) as caught:
            installer.staging_path(tmp_path / "opt" / "toyd")
        print("a full journal:", caught.value)
        assert "state.json" in str(caught.value) and "full" in str(caught.value)


def test_an_artifact_larger_than_the_free_space_is_refused_before_its_bytes(
    tmp_path: Path, artifact_server: ArtifactServer, control_server: ControlServer
) -> None:
    """Point 6: the falcon API sends no size; the artifact was downloaded until the disk was
    full although the server announced its length."""
    state = tmp_path / "state"
    with tmpfs(tmp_path / "opt", "4m") as install:
        OLD.install(install)
        for role in Role:
            artifact_server.add(NEW.artifact_name(role), NEW.files[role])
        big = 32 << 20
        artifact_server.add(NEW.artifact_name(Role.BIN), b"\0" * big)
        with toy(state, install, control_server, tmp_path / "toy.log"):
            control_server.wait_for_version("toy-1", "1.0", timeout_s=20)
            control_server.publish(NEW.order(artifact_server.base_url, with_sizes=False))
            beat = control_server.wait_for(
                lambda bs: any(b.state == UpgradeState.FAILED for b in bs), timeout_s=30
            )[-1]
        print(f"{big} bytes announced, 4 MiB tmpfs: {beat.error!r}")
        assert "not enough space in" in (beat.error or "")
        assert f"needs {big} bytes" in (beat.error or "")
        assert [p.name for p in install.iterdir() if ".su-" in p.name] == []
