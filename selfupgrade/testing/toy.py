"""A toy daemon packaged as a real bin/cfg/service triple, and releases built from it.

The toy is a small Python program that embeds :class:`~selfupgrade.Updater`: it heartbeats to a
control server, upgrades itself, and confirms its health. Its version and behaviour are baked
into the program text, as a compiled daemon's would be, so version 1.1 is a different file from
1.0. Behaviours for failure tests:

* ``ok``: starts, says ``READY=1``, confirms after its first heartbeat;
* ``crash``: exits with status 3 before any selfupgrade code runs;
* ``hang``: starts and does nothing (never heartbeats, never confirms);
* ``unhealthy``: heartbeats, but its health check always fails.

Host-specific settings come from the environment (``TOY_HOST``, ``TOY_HBS``, ``TOY_STATE_DIR``,
``TOY_RESTARTER`` = systemd|supervisor|exec, ``TOY_PROGRAM``, ``TOY_SUPERVISOR_HOW`` = rpc|exit,
and ``TOY_RELEASES``: the root of release directories, for a
:class:`~selfupgrade.ReleaseInstaller` instead of the triple installer), so one config file
serves every host.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..install.base import Installer, StagedFile
from ..models import Artifact, Digest, HashAlgorithm, Release, Role, UpgradeOrder, parse_version

__all__ = ["TOY_FILES", "ToyRelease", "toy_release", "toy_version"]

Behaviour = Literal["ok", "crash", "hang", "unhealthy"]

TOY_FILES: Mapping[Role, str] = {
    Role.BIN: "toyd",
    Role.CFG: "toy.json",
    Role.SERVICE: "toy.service",
}
"""Where the toy's three files live in its install directory."""

_PROGRAM = '''#!{python}
"""toyd: a toy daemon that upgrades itself with selfupgrade."""
VERSION = "{version}"
BEHAVIOUR = "{behaviour}"
import sys

if BEHAVIOUR == "crash":
    sys.exit(3)

import json
import logging
import os
import signal
import threading
import time
from pathlib import Path

import selfupgrade as su


def main() -> int:
    here = Path(__file__).resolve().parent
    cfg = json.loads((here / "toy.json").read_text())
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr,
        format="%(asctime)s toyd " + VERSION + " [%(process)d] %(name)s: %(message)s",
    )
    log = logging.getLogger("toyd")
    log.info("starting version %s (%s)", VERSION, BEHAVIOUR)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    if BEHAVIOUR == "hang":
        stop.wait(3600)
        return 0
    state_dir = os.environ["TOY_STATE_DIR"]
    kind = os.environ.get("TOY_RESTARTER", "systemd")
    if kind == "supervisor":
        restarter = su.SupervisorRestarter(
            os.environ.get("TOY_PROGRAM", "toy"), how=os.environ.get("TOY_SUPERVISOR_HOW", "rpc")
        )
    elif kind == "exec":
        restarter = su.ExecRestarter(guard_state_dir=state_dir)
    else:
        restarter = su.SystemdRestarter()
    releases = os.environ.get("TOY_RELEASES")
    if releases:
        installer = su.ReleaseInstaller(releases, state_dir=state_dir)
        files_dir = Path(releases) / "current"
    else:
        installer = su.TripleInstaller(state_dir)
        files_dir = here
    updater = su.Updater(
        version=VERSION,
        layout=su.Layout(files_dir, {{su.Role.BIN: "toyd", su.Role.CFG: "toy.json",
                                      su.Role.SERVICE: "toy.service"}}),
        transport=su.HttpTransport(
            os.environ["TOY_HBS"],
            settings=su.HttpSettings(connect_timeout_s=2, read_timeout_s=5, backoff_base_s=0.1),
        ),
        installer=installer,
        restarter=restarter,
        config=su.UpdaterConfig(
            host=os.environ["TOY_HOST"],
            interval_s=float(cfg.get("interval_s", 0.5)),
            jitter=0.1,
            download_timeout_s=float(cfg.get("download_timeout_s", 30)),
            failure_backoff_s=float(cfg.get("failure_backoff_s", 2)),
            confirm=su.ConfirmPolicy(
                max_starts=int(cfg.get("max_starts", 2)),
                timeout_s=float(cfg.get("confirm_timeout_s", 10)),
            ),
        ),
        verifier=su.DigestVerifier(allow_md5=True),
        health_check=(lambda: False) if BEHAVIOUR == "unhealthy" else None,
    )
    updater.start()
    su.notify_ready("toyd " + VERSION)
    while not stop.wait(0.2):
        pass
    log.info("stopping version %s", VERSION)
    updater.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
'''

_SERVICE = """[Unit]
Description=toyd {version}

[Service]
Type=notify
ExecStart={python} -m selfupgrade guard --state-dir /var/lib/toyd -- /opt/toyd/toyd
Restart=always
RestartSec=1
"""


@dataclass(frozen=True)
class ToyRelease:
    """The files of one release, as bytes (the toy daemon's, or a user's own).

    Attributes:
        version: the release's version.
        files: the bytes of each role it carries.
        names: the file name of each role in an install directory.
        manifest: its signed manifest, when it was signed (sent with the order).
    """

    version: str
    files: Mapping[Role, bytes] = field(repr=False)
    names: Mapping[Role, str] = field(default_factory=lambda: dict(TOY_FILES), repr=False)
    manifest: bytes | None = field(default=None, repr=False)

    def install(self, install_dir: Path) -> None:
        """Write the files into ``install_dir`` as a first install would."""
        install_dir.mkdir(parents=True, exist_ok=True)
        for role, data in self.files.items():
            path = install_dir / self.names[role]
            path.write_bytes(data)
            path.chmod(0o755 if role == Role.BIN else 0o644)

    def stage(
        self, installer: Installer, install_dir: Path, roles: Iterable[Role] | None = None
    ) -> list[StagedFile]:
        """Put this release's files where ``installer`` stages downloads, as a download would."""
        staged = []
        for role in roles if roles is not None else self.files:
            target = install_dir / self.names[role]
            path = installer.staging_path(target)
            path.write_bytes(self.files[role])
            staged.append(StagedFile(role, target, path))
        return staged

    def artifact_name(self, role: Role) -> str:
        """The seed's naming on the file server: ``bin_<version>``, ``cfg_<version>``..."""
        return f"{role.value}_{self.version}"

    def digest(self, role: Role, algorithm: HashAlgorithm = "sha256") -> Digest:
        """The digest of one file."""
        return Digest(algorithm, hashlib.new(algorithm, self.files[role]).hexdigest())

    def order(
        self,
        base_url: str,
        *,
        roles: tuple[Role, ...] | None = None,
        algorithm: HashAlgorithm = "sha256",
        task_id: str = "",
        allow_downgrade: bool = False,
        with_sizes: bool = True,
    ) -> UpgradeOrder:
        """An order for this release whose artifacts are at ``<base_url>/<role>_<version>``
        (all its roles by default; its manifest, if signed)."""
        base = base_url.rstrip("/")
        roles = roles if roles is not None else tuple(self.files)
        return UpgradeOrder(
            release=Release(
                parse_version(self.version),
                tuple(
                    Artifact(
                        role=role,
                        url=f"{base}/{self.artifact_name(role)}",
                        digest=self.digest(role, algorithm),
                        size=len(self.files[role]) if with_sizes else None,
                    )
                    for role in roles
                ),
            ),
            task_id=task_id,
            allow_downgrade=allow_downgrade,
            manifest=self.manifest,
        )

    def rollout(
        self, base_url: str, plan: Mapping[str, Any] | None = None, **order: Any
    ) -> dict[str, Any]:
        """The body of ``POST /selfupgrade/v1/rollouts`` for this release, whose artifacts are at
        ``<base_url>/<role>_<version>`` (what :meth:`ArtifactServer.publish` returns), with
        ``plan`` and its signed manifest, if any; ``order`` goes to :meth:`order`."""
        wire = self.order(base_url, **order).to_wire()
        body: dict[str, Any] = {
            "release": {"version": self.version, "artifacts": wire["artifacts"]}
        }
        if plan is not None:
            body["plan"] = dict(plan)
        if self.manifest is not None:
            body["manifest"] = json.loads(self.manifest)
        return body


def toy_version(program: bytes) -> str | None:
    """The version baked into a toy program (its ``VERSION = "..."`` line), if any."""
    for line in program.decode("utf-8", "replace").splitlines():
        if line.startswith("VERSION = "):
            return line.split("=", 1)[1].strip().strip("\"'")
    return None


def toy_release(
    version: str,
    *,
    behaviour: Behaviour = "ok",
    config: Mapping[str, object] | None = None,
    python: str | None = None,
) -> ToyRelease:
    """Build the triple of toy ``version``.

    Args:
        version: baked into the program.
        behaviour: ``ok``, ``crash``, ``hang`` or ``unhealthy``.
        config: the config file's content (intervals, confirmation limits).
        python: the interpreter in the program's ``#!`` line (default: this one).
    """
    python = python or sys.executable
    program = _PROGRAM.format(python=python, version=version, behaviour=behaviour)
    cfg = {"version": version, "interval_s": 0.5, **(config or {})}
    return ToyRelease(
        version=version,
        files={
            Role.BIN: program.encode(),
            Role.CFG: (json.dumps(cfg, indent=1, sort_keys=True) + "\n").encode(),
            Role.SERVICE: _SERVICE.format(version=version, python=python).encode(),
        },
    )
