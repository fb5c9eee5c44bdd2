"""Issue 13, point 5: ``selfupgrade-hbs`` fails in one line that names the fix, and says its
settings when it starts."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from selfupgrade.testing import free_port

pytestmark = pytest.mark.real


def hbs(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "selfupgrade.server", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("which", ["--http", "--rpc"])
def test_a_busy_port_is_one_line_naming_the_flag(tmp_path: Path, which: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        ports = {"--http": f"127.0.0.1:{free_port()}", "--rpc": f"127.0.0.1:{free_port()}"}
        ports[which] = f"127.0.0.1:{busy}"
        done = hbs(*(x for kv in ports.items() for x in kv), "--store", "sqlite:h.db", cwd=tmp_path)
    lines = done.stderr.strip().splitlines()
    print(f"{which} busy: exit {done.returncode}: {lines[-1]}")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert f"cannot listen on 127.0.0.1:{busy}" in lines[-1] and which in lines[-1]


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--store", "bogus:/x"], "store URL 'bogus:/x' is not one of"),
        (["-c", "missing.json"], "cannot read missing.json"),
        (["-c", "bad.json"], "cannot read bad.json"),
        (["--queue", "0"], "invalid setting"),
    ],
)
def test_bad_settings_are_one_line(tmp_path: Path, args: list[str], says: str) -> None:
    (tmp_path / "bad.json").write_text("{not json")
    port = f"127.0.0.1:{free_port()}"
    done = hbs("--http", port, "--rpc", "off", *args, cwd=tmp_path)
    print(f"{' '.join(args)}: {done.stderr.strip()}")
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert says in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_hbs_says_its_settings_when_it_starts(tmp_path: Path) -> None:
    """A fresh hbs with no flags but its addresses: the defaults, in one line."""
    port = f"127.0.0.1:{free_port()}"
    argv = [sys.executable, "-m", "selfupgrade.server", "--http", port, "--rpc", "off"]
    proc = subprocess.Popen(
        [*argv, "--store", "sqlite:hbs.db"], cwd=tmp_path, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stderr is not None
        line = next(x for x in proc.stderr if "settings (" in x or "Traceback" in x)
    finally:
        proc.terminate()
        proc.wait(15)
    print(line.strip())
    assert "20 slots" in line and "halt after 3 failed attempts" in line
    assert "artifact check on" in line and "probation 300s" in line


def test_the_library_configures_no_logging() -> None:
    """Issue 13, point 6: with nothing configured, a library warning goes nowhere (Python's
    last-resort handler would print it to stderr without the NullHandler)."""
    code = "import logging, selfupgrade; logging.getLogger('selfupgrade.install').warning('hi')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0 and done.stderr == ""
    bare = subprocess.run(
        [sys.executable, "-c", code.replace("selfupgrade;", "sys;")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert "hi" in bare.stderr  # the same warning without the package's handler: printed
