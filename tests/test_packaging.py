"""Issue 13, points 1 and 6: what a pip user gets.

The wheel and the sdist are built from this checkout. A fresh virtual environment with only
the wheel and its ``[server]`` extra (from the package index) runs ``selfupgrade-hbs`` and
upgrades a daemon that lives in that environment; the sdist carries the tests, examples and
docs its own tests need, and they run from the unpacked sdist.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import httpx
import pytest

from selfupgrade import Role
from selfupgrade.guard import guard_command
from selfupgrade.testing import ArtifactServer, ServiceHarness, free_port, toy_release

pytestmark = pytest.mark.real

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(ROOT)],
        check=True,
    )
    return next(out.glob("selfupgrade-*.whl"))


def test_the_wheel_carries_hbs_its_defaults_and_the_licence(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    entry_points = zipfile.ZipFile(wheel).read(
        next(n for n in names if n.endswith("entry_points.txt"))
    )
    assert "selfupgrade/server/hbs.py" in names and "selfupgrade/server/hbs.json" in names
    assert any(n.endswith("licenses/LICENSE") for n in names)
    assert b"selfupgrade-hbs = selfupgrade.server.__main__:run" in entry_points
    assert b"selfupgrade = selfupgrade.testing.pytest_plugin" in entry_points
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA")))
    assert b"Classifier: Framework :: Pytest" in metadata


def test_a_fresh_venv_with_only_the_wheel_runs_hbs_and_upgrades_a_daemon(
    wheel: Path, tmp_path: Path
) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    installed = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", f"{wheel}[server]"],
        capture_output=True,
        text=True,
        check=False,
    )
    if installed.returncode != 0 and "No matching distribution" in installed.stderr:
        pytest.skip(f"the package index cannot be reached: {installed.stderr[-300:]}")
    assert installed.returncode == 0, installed.stderr[-2000:]
    cwd = tmp_path / "elsewhere"  # not the checkout: nothing of it is importable
    cwd.mkdir()
    port = free_port()
    hbs_log = tmp_path / "hbs.log"
    with open(hbs_log, "wb") as log:
        hbs = subprocess.Popen(
            [
                str(venv / "bin" / "selfupgrade-hbs"),
                "--http",
                f"127.0.0.1:{port}",
                "--rpc",
                "off",
                "--store",
                f"sqlite:{tmp_path / 'hbs.db'}",
            ],
            cwd=cwd,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    old = toy_release("1.0", python=str(python))
    new = toy_release("1.1", python=str(python))
    install, state = tmp_path / "opt", tmp_path / "state"
    old.install(install)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert hbs.poll() is None and time.monotonic() < deadline, hbs_log.read_text()
            time.sleep(0.1)
        env = {
            "TOY_HOST": "pip-host",
            "TOY_HBS": f"{url}/selfupgrade/v1/heartbeat",
            "TOY_STATE_DIR": str(state),
        }
        guard = [str(python), *guard_command(state, [str(install / "toyd")])[1:]]
        with ArtifactServer() as files, ServiceHarness(guard, env=env, cwd=cwd) as svc:
            files.add("bin_1.1", new.files[Role.BIN])
            versions = _wait(url, "1.0")
            md5 = hashlib.md5(new.files[Role.BIN]).hexdigest()
            body = {"wgeturl": files.base_url, "version": "1.1", "binfile_md5": md5}
            reply = httpx.post(  # as the article's curl -d sends it
                f"{url}/agent/upgrade",
                content=json.dumps(body),
                headers={"Content-Type": "application/x-www-form-urlencoded"},
                timeout=10,
            )
            assert reply.status_code == 200, reply.text
            versions = _wait(url, "1.1")
            starts = svc.starts
    finally:
        hbs.terminate()
        hbs.wait(15)
    print(
        f"a venv with only the wheel: hbs from it upgraded its daemon: {versions}, {starts} starts"
    )
    assert versions == {"pip-host": "1.1"}
    assert (install / "toyd").read_bytes() == new.files[Role.BIN]


def _wait(url: str, version: str) -> dict[str, str]:
    deadline = time.monotonic() + 60
    while True:
        versions: dict[str, str] = httpx.get(f"{url}/agentversions", timeout=5).json()["data"]
        if versions.get("pip-host") == version:
            return versions
        assert time.monotonic() < deadline, versions
        time.sleep(0.2)


def test_the_sdist_carries_what_its_own_tests_need_and_they_run(tmp_path: Path) -> None:
    out = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "build", "--sdist", "-o", str(out), str(ROOT)],
        check=True,
        capture_output=True,
    )
    sdist = next(out.glob("selfupgrade-*.tar.gz"))
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
        tar.extractall(tmp_path / "src", filter="data")
    for needed in (
        "LICENSE",
        "CHANGELOG.md",
        "noxfile.py",
        "tests/test_docs.py",
        "examples/demo.py",
        "examples/falcon_agent/cfg.json",
        "docs/testing.md",
        "selfupgrade/server/hbs.json",
    ):
        assert needed in names, needed
    src = next((tmp_path / "src").iterdir())
    ran = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_models.py"],
        cwd=src,
        env={**os.environ, "PYTHONPATH": str(src)},
        capture_output=True,
        text=True,
        check=False,
    )
    print(f"{sdist.name}: {len(names)} files; its tests/test_models.py: {ran.stdout.strip()[-60:]}")
    assert ran.returncode == 0, ran.stdout[-2000:]
