"""The examples in the docs run."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from selfupgrade import Role
from selfupgrade.guard import guard_command
from selfupgrade.testing import (
    ServiceHarness,
    free_port,
    new_mark,
    stop_marked,
    toy_release,
    with_mark,
)

pytest_plugins = ["pytester"]
DOCS = Path(__file__).resolve().parent.parent / "docs"


def block_after(page: str, heading: str) -> str:
    text = (DOCS / page).read_text()
    section = text.split(heading, 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)  # type: ignore[union-attr]


def test_the_users_test_in_testing_md_passes(pytester: pytest.Pytester) -> None:
    """The page's commands as written (``python3`` is this interpreter), its test as written."""
    code = block_after("testing.md", "## A test of your own daemon")
    commands = re.search(r"```sh\n(.*?)```", (DOCS / "testing.md").read_text(), re.S)
    assert commands is not None and len(code.strip().splitlines()) < 30
    make, run = commands.group(1).strip().splitlines()
    assert make.startswith("python3 -c ") and run == "python3 -m pytest -q test_my_daemon.py"
    made = subprocess.run(
        make.replace("python3", sys.executable, 1), shell=True, cwd=pytester.path, check=False
    )
    assert made.returncode == 0
    assert (pytester.path / "dist" / "toyd").read_bytes() == toy_release("1.0").files[Role.BIN]
    pytester.makepyfile(test_my_daemon=code)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q", "test_my_daemon.py")
    result.assert_outcomes(passed=1)


# ---- README: each block that claims to run, run as written (ports and paths filled) ------

README = DOCS.parent / "README.md"


def readme_blocks(heading: str, lang: str) -> list[str]:
    """The ``lang`` code blocks of the README section under ``heading``."""
    section = README.read_text().split(heading, 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"```{lang}\n(.*?)```", section, re.S)


def test_the_quickstart_installs_nox_with_debians_externally_managed_python(
    tmp_path: Path,
) -> None:
    """The quickstart's first part, with Debian's own python3 (externally managed, pip 23):
    the venv and nox install, as written; the demo and tests themselves are run by CI and by
    test_teardown."""
    debian = Path("/usr/bin/python3")
    managed = list(Path("/usr/lib").glob("python3.*/EXTERNALLY-MANAGED"))
    if not debian.exists() or not managed:
        pytest.skip("needs a Debian or Ubuntu system python3 (externally managed) in /usr/bin")
    lines = [x for x in readme_blocks("## Quickstart", "sh")[0].splitlines() if x.strip()]
    assert len(lines) == 2 and lines[1].startswith(lines[0].split(" && .venv/bin/nox")[0])
    install = lines[0].split(" && .venv/bin/nox")[0]
    env = {**os.environ, "PATH": "/usr/bin:/bin"}
    assert (
        subprocess.run(
            ["/usr/bin/python3", "-m", "pip", "install", "--dry-run", "nox"],
            env=env,
            capture_output=True,
            check=False,
        ).returncode
        != 0
    ), "this python3 is not externally managed: the test would show nothing"
    done = subprocess.run(
        ["bash", "-c", install], cwd=tmp_path, env=env, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    version = subprocess.run(
        [str(tmp_path / ".venv/bin/nox"), "--version"], capture_output=True, text=True, check=False
    )
    print(f"{install}\n-> nox {version.stdout.strip() or version.stderr.strip()}")
    assert version.returncode == 0


@pytest.mark.real
def test_the_hand_run_section_upgrades_an_agent_to_6_0_1(tmp_path: Path) -> None:
    """The README's hand-run block end to end: hbs from the package, two builds of the example
    agent, a file server, the agent through the guard, the article's publish, 6.0.1."""
    if shutil.which("curl") is None:
        pytest.skip("needs curl (apt-get install curl)")
    block = readme_blocks("## Running hbs and an agent by hand", "sh")[1]
    script = block
    for port in ("6031", "6030", "8000"):
        script = script.replace(port, str(free_port()))
    script = script.replace("/tmp/", f"{tmp_path}/").replace(".venv/bin/", f"{sys.prefix}/bin/")
    mark = new_mark()
    try:
        done = subprocess.run(
            ["bash", "-e", "-c", script],
            cwd=DOCS.parent,
            env=with_mark(dict(os.environ), mark),
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
    finally:
        left = stop_marked(mark)
    print(done.stdout[-1500:])
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert '"6.0.1"' in done.stdout and "COMPLETE" in done.stdout
    assert left == []


@pytest.mark.real
def test_the_embedding_snippet_is_a_daemon_that_upgrades_itself(
    tmp_path: Path, hbs: Any, artifact_server: Any
) -> None:
    """The README's embedding block, saved as the file it says, run through the guard (under
    a systemd-like harness), upgraded by hbs through the seed's md5 publish."""
    code = readme_blocks("## Embedding the updater in your daemon", "python")[0]
    code = (
        code.replace("#!/usr/bin/env python3", f"#!{sys.executable}")
        .replace("/opt/mydaemon", str(tmp_path / "opt"))
        .replace("/var/lib/mydaemon/selfupgrade", str(tmp_path / "state"))
        .replace("http://127.0.0.1:6031", hbs.url)
        .replace("interval_s=60", "interval_s=0.3")
    )
    (tmp_path / "opt").mkdir()
    program = tmp_path / "opt" / "mydaemon"
    program.write_text(code)
    program.chmod(0o755)
    new = code.replace('VERSION = "1.0"', 'VERSION = "1.1"').encode()
    artifact_server.add("bin_1.1", new)
    command = guard_command(tmp_path / "state", [str(program)])
    with ServiceHarness(command, log_path=tmp_path / "mydaemon.log") as svc:
        svc.wait_for_notification("READY=1\nSTATUS=mydaemon 1.0", timeout_s=30)
        host = socket.gethostname()
        deadline = time.monotonic() + 30
        while hbs.versions().get(host) != "1.0":
            assert time.monotonic() < deadline, (tmp_path / "mydaemon.log").read_text()
            time.sleep(0.2)
        md5 = hashlib.md5(new).hexdigest()
        hbs.publish({"wgeturl": artifact_server.base_url, "version": "1.1", "binfile_md5": md5})
        svc.wait_for_notification("READY=1\nSTATUS=mydaemon 1.1", timeout_s=60)
        deadline = time.monotonic() + 30
        while hbs.versions().get(host) != "1.1":
            assert time.monotonic() < deadline, (tmp_path / "mydaemon.log").read_text()
            time.sleep(0.2)
    print(f"the README's daemon: 1.0 -> 1.1 through hbs, {svc.starts} starts")
    assert program.read_bytes() == new
