"""The real, unmodified Go falcon-agent, built for the tests and run under supervisord.

The source is ``../shared/falcon-plus-agent`` beside the checkout, or the folder named by
``SELFUPGRADE_FALCON_AGENT_SRC`` (a user's clone has no ``../shared``). Builds go through its
own ``build.sh`` and are cached under ``~/.cache/selfupgrade/falcon-agent/<hash of the
source>/`` (or ``$SELFUPGRADE_FALCON_AGENT_CACHE``), so each version is built once per source.
Nothing of the agent is committed to this project.

Without the Go toolchain or the source the tests that need the agent skip, naming what to
install; with ``SELFUPGRADE_REQUIRE_FALCON_AGENT=1`` (as in CI) they fail instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from selfupgrade.testing import Supervisord

ROOT = Path(__file__).resolve().parent.parent
INSTALL = (
    "apt-get install golang-go golang-github-sirupsen-logrus-dev golang-github-op-go-logging-dev"
)


def source_dir() -> Path:
    """Where the agent's source and build.sh are."""
    given = os.environ.get("SELFUPGRADE_FALCON_AGENT_SRC")
    return Path(given) if given else ROOT.parent / "shared" / "falcon-plus-agent"


def _source_hash(src: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(src)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def _unavailable(why: str) -> None:
    if os.environ.get("SELFUPGRADE_REQUIRE_FALCON_AGENT") == "1":
        pytest.fail(
            f"the real falcon-agent is required (SELFUPGRADE_REQUIRE_FALCON_AGENT=1): {why}"
        )
    pytest.skip(why)


def build_agents(*versions: str) -> dict[str, Path]:
    """The agent's binary at each version (built once per source, then cached)."""
    src = source_dir()
    if not (src / "build.sh").is_file():
        _unavailable(
            f"no falcon-agent source at {src} (set SELFUPGRADE_FALCON_AGENT_SRC to the folder "
            "holding build.sh and src/)"
        )
    if shutil.which("go") is None:
        _unavailable(f"the Go toolchain is not installed (Debian: {INSTALL})")
    base = os.environ.get("SELFUPGRADE_FALCON_AGENT_CACHE")
    cache = Path(base) if base else Path.home() / ".cache" / "selfupgrade" / "falcon-agent"
    out = cache / _source_hash(src)
    missing = [v for v in versions if not (out / f"falcon-agent-{v}").is_file()]
    if missing:
        done = subprocess.run(
            ["sh", str(src / "build.sh"), str(out), *missing],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        if done.returncode != 0:
            _unavailable(f"build.sh failed ({INSTALL}?):\n{done.stderr[-2000:]}")
    return {v: out / f"falcon-agent-{v}" for v in versions}


class GoFleet:
    """``n`` real Go agents, each in a directory of its own with its ``cfg.json``, under a
    real supervisord with ``autorestart=true`` (what the seed's ``Restart=always`` does)."""

    def __init__(self, workdir: Path, n: int, binary: Path, rpc_port: int) -> None:
        self.names = [f"n0-000-{i:03d}" for i in range(1, n + 1)]
        self.workdir = workdir
        self.sup = Supervisord(workdir / "supervisor")
        self.rpc_port = rpc_port
        self.cfg = self.config()
        for name in self.names:
            home = self.home(name)
            home.mkdir(parents=True)
            shutil.copy(binary, home / "falcon-agent")
            (home / "falcon-agent").chmod(0o755)
            (home / "cfg.json").write_bytes(self.cfg)
            self.sup.add_program(
                name,
                [str(home / "falcon-agent"), "-c", str(home / "cfg.json")],
                directory=home,
                # the name from the environment, so that one cfg.json (a config task's) fits all
                env={"FALCON_ENDPOINT": name},
            )

    def config(self, **changes: object) -> bytes:
        """A ``cfg.json`` every agent of the fleet can run with (``changes``: top-level keys).

        ``app_base_dir`` is ``.``: supervisord starts each agent in its own directory, where
        the upgrade replaces ``./falcon-agent`` and ``./cfg.json``.
        """
        cfg = {
            "debug": True,
            "hostname": "",
            "ip": "",
            "heartbeat": {
                "enabled": True,
                "addr": f"127.0.0.1:{self.rpc_port}",
                "interval": 2,
                "timeout": 1000,
            },
            "plugin": {"enabled": False},
            "transfer": {"enabled": False, "addrs": []},
            "http": {"enabled": False, "listen": ""},
            "app_base_dir": ".",
            **changes,
        }
        return json.dumps(cfg).encode()

    def orders(self, name: str) -> int:
        """How many upgrade orders the agent took (from its own log, every start together)."""
        return self.output(name).count("AgentSelfUpgrade_channel")

    def output(self, name: str) -> str:
        """What the agent printed, every start together."""
        return "".join(
            p.read_text(errors="replace") for p in sorted(self.sup.workdir.glob(f"{name}*.log"))
        )

    def home(self, name: str) -> Path:
        """The agent's ``app_base_dir``."""
        return self.workdir / "hosts" / name

    def program(self, name: str) -> bytes:
        """The agent's binary as it is on disk now."""
        return (self.home(name) / "falcon-agent").read_bytes()

    def starts(self, name: str) -> int:
        """How many times supervisord started the agent (from its log)."""
        log = (self.sup.workdir / "supervisord.log").read_text()
        return log.count(f"spawned: '{name}'")

    def __enter__(self) -> GoFleet:
        self.sup.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.sup.stop()


class SystemdGoFleet(GoFleet):
    """The same agents, each a unit of a real systemd (``falcon-agent@<name>.service``, the
    seed's ``Restart=always``), instead of supervisord programs."""

    def __init__(self, workdir: Path, n: int, binary: Path, rpc_port: int, systemd: Any) -> None:
        super().__init__(workdir, n, binary, rpc_port)
        self.systemd = systemd

    @staticmethod
    def unit(name: str) -> str:
        return f"falcon-agent-{name}.service"

    def __enter__(self) -> SystemdGoFleet:
        for name in self.names:
            home = self.home(name)
            self.systemd.install_unit(
                self.unit(name),
                "[Unit]\nDescription=open-falcon agent (as the seed runs it)\n"
                "[Service]\n"
                f"WorkingDirectory={home}\n"
                f"ExecStart={home}/falcon-agent -c {home}/cfg.json\n"
                f"Environment=FALCON_ENDPOINT={name}\n"
                "Restart=always\nRestartSec=1\n",
            )
            started = self.systemd.systemctl("start", self.unit(name))
            assert started.returncode == 0, started.stderr
        return self

    def __exit__(self, *exc: object) -> None:
        for name in self.names:
            self.systemd.systemctl("stop", self.unit(name))

    def output(self, name: str) -> str:
        """What the agent printed, every start together (its journal)."""
        return str(self.systemd.journal(self.unit(name)))

    def starts(self, name: str) -> int:
        """How many times systemd started the agent."""
        return 1 + int(self.systemd.state(self.unit(name))["NRestarts"])
