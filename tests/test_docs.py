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

import httpx
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


UBUNTU_PIP = "24.0"
"""The pip of Ubuntu 24.04's python3-pip (its Python is 3.12)."""


def _debians_python3(tmp_path: Path) -> Path:
    """Debian 12's own python3 (3.11, pip 23.0.1, externally managed), as installed."""
    if not list(Path("/usr/lib").glob("python3.*/EXTERNALLY-MANAGED")):
        pytest.skip("needs a Debian system python3 (externally managed) in /usr/bin")
    return Path("/usr/bin")


def _an_ubuntu_like_python3(tmp_path: Path) -> Path:
    """Ubuntu 24.04's combination, which this machine can only approximate: a copy of a
    Python 3.12 with pip 24.0, marked externally managed, and no ``python`` alias."""
    source = Path.home() / ".pyenv/versions/3.12.1"
    if not (source / "bin/python3.12").exists():
        pytest.skip("needs a Python 3.12 to copy (pyenv install 3.12.1)")
    root = tmp_path / "ubuntu"
    stdlib = root / "lib/python3.12"
    shutil.copytree(
        source / "lib/python3.12",
        stdlib,
        symlinks=True,
        ignore=lambda d, names: [n for n in names if n in ("test", "site-packages", "idlelib")],
    )
    (stdlib / "site-packages").mkdir()
    (root / "bin").mkdir()
    shutil.copy2(source / "bin/python3.12", root / "bin/python3.12")
    (root / "bin/python3").symlink_to("python3.12")
    python = str(root / "bin/python3")
    for step in (["-m", "ensurepip"], ["-m", "pip", "install", "-q", f"pip=={UBUNTU_PIP}"]):
        done = subprocess.run([python, *step], capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stderr[-2000:]
    for name in ("pip", "pip3", "pip3.12"):
        (root / "bin" / name).unlink(missing_ok=True)
    (stdlib / "EXTERNALLY-MANAGED").write_text(
        "[externally-managed]\nError=use a virtual environment (as Ubuntu says)\n"
    )
    return root / "bin"


@pytest.mark.parametrize(
    "system", [_debians_python3, _an_ubuntu_like_python3], ids=["debian12", "ubuntu24.04-like"]
)
def test_the_quickstart_installs_nox_with_an_externally_managed_python(
    tmp_path: Path, system: Any
) -> None:
    """The quickstart's first part with an externally managed python3 and no ``python`` on the
    PATH: the venv and nox install, as written; the demo and tests themselves are run by CI and
    by test_teardown."""
    bin_dir: Path = system(tmp_path)
    lines = [x for x in readme_blocks("## Quickstart", "sh")[0].splitlines() if x.strip()]
    assert len(lines) == 2 and lines[1].startswith(lines[0].split(" && .venv/bin/nox")[0])
    install = lines[0].split(" && .venv/bin/nox")[0]
    env = {**os.environ, "PATH": f"{bin_dir}:/bin"}
    env.pop("VIRTUAL_ENV", None)
    assert shutil.which("python", path=env["PATH"]) is None, "a python alias: nothing shown"
    refused = subprocess.run(
        ["python3", "-m", "pip", "install", "--dry-run", "nox"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert refused.returncode != 0 and "externally-managed" in refused.stderr, (
        "this python3 is not externally managed: the test would show nothing"
    )
    pip = subprocess.run(
        ["python3", "-m", "pip", "--version"], env=env, capture_output=True, text=True, check=False
    ).stdout.split(" from ")[0]
    work = tmp_path / "checkout"
    work.mkdir()
    done = subprocess.run(
        ["bash", "-c", install], cwd=work, env=env, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    version = subprocess.run(
        [str(work / ".venv/bin/nox"), "--version"], capture_output=True, text=True, check=False
    )
    print(f"{bin_dir}/python3 ({pip}): {install}\n-> nox {version.stdout or version.stderr}")
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


@pytest.mark.real
def test_the_operators_guide_publishes_watches_and_cancels(tmp_path: Path) -> None:
    """The guide's Publish, Watch and Cancel blocks as written, against hbs from the package
    (its port, the artifact URL and the md5 of the served build filled in)."""
    from examples.falcon_agent.build import build
    from examples.fleet import Hbs, serve_release
    from selfupgrade.testing import ArtifactServer

    if shutil.which("curl") is None:
        pytest.skip("needs curl (apt-get install curl)")
    guide = [b for b in blocks(DOCS / "operators-guide.md") if b[0] in RUNNABLE]
    publish, watch, cancel = guide[1][1], guide[2][1], guide[3][1]
    new = build("6.0.1")
    with (
        ArtifactServer() as files,
        Hbs(f"sqlite:{tmp_path / 'hbs.db'}", tmp_path / "hbs.log") as hbs,
    ):
        wgeturl = serve_release(files, new)
        beat = {"host": "h-1", "version": "6.0.0"}
        assert httpx.post(f"{hbs.url}/selfupgrade/v1/heartbeat", json=beat).status_code == 200
        out = {}
        for name, block in (("publish", publish), ("watch", watch), ("cancel", cancel)):
            script = (
                block.replace("http://files.example/file/open-falcon", wgeturl)
                .replace(re.search(r'"binfile_md5":"(\w+)"', publish).group(1), new.bin_md5)  # type: ignore[union-attr]
                .replace("http://127.0.0.1:6031", hbs.url)
            )
            done = subprocess.run(
                ["bash", "-e", "-o", "pipefail", "-c", script],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert done.returncode == 0, f"{name}: {done.stdout}{done.stderr}"
            out[name] = done.stdout
            if name == "publish":
                status = hbs.status()
                assert status["task"]["order"]["version"] == "6.0.1", status
        cancelled = hbs.status()
    print({k: v[:300] for k, v in out.items()})
    assert '"task_id"' in out["publish"]
    assert '"h-1": "6.0.0"' in out["watch"] and '"in_flight"' in out["watch"]
    assert cancelled["task"] is None or cancelled["task"]["status"] == "CANCELLED", cancelled


# ---- every block that claims to run is run ------------------------------------------------

RUNNABLE = ("sh", "bash", "python")
SKETCH = "<!-- sketch:"
PAGES = [README, *sorted(DOCS.glob("*.md")), *sorted((DOCS / "roles").glob("*.md"))]

RUN_BY = {
    ("README.md", 0): "test_the_quickstart_installs_nox_with_an_externally_managed_python"
    " (its install), .ci/run (its test command), test_teardown (the demo it starts)",
    ("README.md", 1): "test_teardown.test_each_demo_scenario_stops_every_process_it_started",
    ("README.md", 2): "test_the_quickstart_installs_nox_with_an_externally_managed_python",
    ("README.md", 3): "test_the_hand_run_section_upgrades_an_agent_to_6_0_1",
    ("README.md", 4): "test_the_embedding_snippet_is_a_daemon_that_upgrades_itself",
    ("docs/testing.md", 0): "test_the_users_test_in_testing_md_passes",
    ("docs/testing.md", 1): "test_the_users_test_in_testing_md_passes",
    ("docs/testing.md", 2): "test_the_examples_without_pytest_in_testing_md_run",
    ("docs/testing.md", 3): "test_the_examples_without_pytest_in_testing_md_run",
    ("docs/security.md", 0): "test_the_signing_commands_in_security_md_run",
    ("docs/operators-guide.md", 1): "test_the_operators_guide_publishes_watches_and_cancels",
    ("docs/operators-guide.md", 2): "test_the_operators_guide_publishes_watches_and_cancels",
    ("docs/operators-guide.md", 3): "test_the_operators_guide_publishes_watches_and_cancels",
    ("docs/rollouts.md", 0): "test_the_rollout_commands_in_rollouts_md_run",
    ("docs/rollouts.md", 1): "test_the_rollout_commands_in_rollouts_md_run",
}


def blocks(page: Path) -> list[tuple[str, str, bool]]:
    """``(language, text, marked as a sketch)`` of each fenced block of ``page``."""
    found = []
    for match in re.finditer(
        r"(?:(<!-- sketch:[^>]*-->)\n)?```(\w*)\n(.*?)```", page.read_text(), re.S
    ):
        found.append((match.group(2), match.group(3), match.group(1) is not None))
    return found


def test_every_block_that_claims_to_run_is_run_by_a_test() -> None:
    """Issue 13, point 2: a block in README.md or docs/ in a language that runs is either run
    by the test named in RUN_BY, or says it is a sketch (``<!-- sketch: why -->`` above it)."""
    unaccounted, counted = [], {"run": 0, "sketch": 0}
    for page in PAGES:
        name = str(page.relative_to(DOCS.parent))
        runnable = [b for b in blocks(page) if b[0] in RUNNABLE]
        for index, (_, text, sketch) in enumerate(runnable):
            if (name, index) in RUN_BY:
                assert not sketch, f"{name} block {index} is run by a test: drop its sketch mark"
                counted["run"] += 1
            elif sketch:
                counted["sketch"] += 1
            else:
                unaccounted.append(f"{name} block {index}: {text.strip().splitlines()[0]}")
    print(f"code blocks: {counted['run']} run by tests, {counted['sketch']} marked as sketches")
    assert unaccounted == [], "blocks neither run nor marked as sketches:\n" + "\n".join(
        unaccounted
    )
    names = {n.split(" (", 1)[0].split(".")[-1] for n in RUN_BY.values()}
    here = (Path(__file__).parent / "test_docs.py").read_text()
    teardown = (Path(__file__).parent / "test_teardown.py").read_text()
    assert all(f"def {n}(" in here + teardown or n.startswith(".ci") for n in names), names


def test_the_signing_commands_in_security_md_run(tmp_path: Path) -> None:
    commands = next(b for b in blocks(DOCS / "security.md") if b[0] in RUNNABLE)[1]
    from examples.falcon_agent.build import build

    build("6.0.1").write(tmp_path / "files")
    for stale in (tmp_path / "files").glob("*.md5"):
        stale.unlink()
    bin_dir = Path(sys.executable).parent
    script = commands.replace("selfupgrade ", f"{bin_dir}/selfupgrade ")
    done = subprocess.run(
        ["bash", "-e", "-c", script], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    print(done.stdout)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ok: falcon-agent 6.0.1 for linux-x86_64, 2 artifact(s)" in done.stdout
    assert oct((tmp_path / "keys" / "release-2026a.key").stat().st_mode & 0o777) == "0o600"


@pytest.mark.real
def test_the_rollout_commands_in_rollouts_md_run(tmp_path: Path) -> None:
    """The plan and both ways to start it, then pause, resume and abort, against a real hbs
    (its port and the artifacts' URLs filled in; a host of dc=bj heard from first)."""
    from examples.falcon_agent.build import build
    from examples.fleet import Hbs, serve_release
    from selfupgrade.testing import ArtifactServer

    start, controls = [b[1] for b in blocks(DOCS / "rollouts.md") if b[0] in RUNNABLE][:2]
    new = build("6.0.1")
    bin_dir = Path(sys.executable).parent
    with (
        ArtifactServer() as files,
        Hbs(f"sqlite:{tmp_path / 'hbs.db'}", tmp_path / "hbs.log") as hbs,
    ):
        wgeturl = serve_release(files, new)  # .../file/open-falcon
        beat = {"host": "bj-1", "version": "6.0.0", "labels": {"dc": "bj"}}
        assert httpx.post(f"{hbs.url}/selfupgrade/v1/heartbeat", json=beat).status_code == 200
        sha = hashlib.sha256(new.program).hexdigest()
        script = (
            start.replace("https://files.example/open-falcon", wgeturl)
            .replace("<hex>", sha)
            .replace("<md5>", new.bin_md5)
            .replace("http://127.0.0.1:6031", hbs.url)
            .replace("selfupgrade rollout start", f"selfupgrade rollout --server {hbs.url} start")
            .replace("selfupgrade rollout", f"{bin_dir}/selfupgrade rollout")
        )
        done = subprocess.run(
            ["bash", "-e", "-c", script], cwd=tmp_path, capture_output=True, text=True, check=False
        )
        assert done.returncode == 0, done.stdout + done.stderr
        rollout_id = hbs.status()["task"]["id"]
        steps = []
        for line in controls.strip().splitlines():
            command = line.split("#", 1)[0].strip()
            if " rollback " in f" {command} ":
                continue  # needs a rollout with upgraded hosts; test_e2e_rollouts rolls back
            command = re.sub(r"\[.*?\]", "", command).replace("ID", rollout_id).strip()
            argv = command.split()
            argv[:2] = [f"{bin_dir}/selfupgrade", "rollout", "--server", hbs.url]
            ran = subprocess.run(argv, capture_output=True, text=True, check=False)
            steps.append((argv[4], ran.returncode, hbs.rollout(rollout_id)["status"]))
    print(f"rollouts.md: started twice ({done.stdout.count('rollout')} lines), then {steps}")
    assert [s[0] for s in steps] == ["pause", "resume", "abort"]
    assert [s[2] for s in steps] == ["paused", "active", "aborted"], steps


@pytest.mark.real
def test_the_examples_without_pytest_in_testing_md_run(tmp_path: Path) -> None:
    """A fleet of five through a rollout without pytest, and the 20,000-host simulation."""
    fleet, simulation = [b[1] for b in blocks(DOCS / "testing.md") if b[0] == "python"][1:3]
    fleet = fleet.replace('"/tmp/hbs"', repr(str(tmp_path / "hbs")))
    fleet = fleet.replace('"/tmp/fleet"', repr(str(tmp_path / "fleet")))
    for code in (fleet, simulation):
        done = subprocess.run(
            [sys.executable, "-c", code],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=240,
            check=False,
        )
        print(done.stdout[-600:])
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
