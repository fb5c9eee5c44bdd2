"""Small builders shared by the server tests."""

from __future__ import annotations

import hashlib
import json
import socket
from typing import Any

from selfupgrade import (
    Artifact,
    Digest,
    Heartbeat,
    Release,
    Role,
    UpgradeOrder,
    UpgradeState,
    parse_version,
)
from selfupgrade.server import ControlPlane, HostProgress, Store, Task, TaskLimits

CFG = b'{"new": true}\n'


def task(
    version: str = "1.1",
    *,
    roles: tuple[Role, ...] = (Role.BIN,),
    limit: int = 2,
    lease_s: float = 30,
    attempts: int = 3,
    backoff_s: float = 10,
    failure_limit: int = 100,
    allow_downgrade: bool = False,
    task_id: str = "t1",
) -> Task:
    arts = tuple(
        Artifact(
            r,
            f"http://127.0.0.1:9/{r.value}_{version}",
            Digest("md5", hashlib.md5(CFG if r == Role.CFG else b"bin").hexdigest()),
        )
        for r in roles
    )
    return Task(
        id=task_id,
        release=Release(parse_version(version), arts),
        limits=TaskLimits(
            max_in_flight=limit,
            lease_s=lease_s,
            max_attempts=attempts,
            retry_backoff_s=backoff_s,
            failure_limit=failure_limit,
            probation_s=0,  # the rules of joining late are tested on their own
        ),
        allow_downgrade=allow_downgrade,
    )


def beat(
    host: str,
    version: str = "1.0",
    state: UpgradeState = UpgradeState.IDLE,
    *,
    confirmed: bool = True,
    task_id: str = "",
    failed_version: str | None = None,
    failures: int = 0,
    error: str | None = None,
    cfg: bytes | None = None,
) -> Heartbeat:
    files = {"cfg": {"md5": hashlib.md5(cfg).hexdigest()}} if cfg is not None else {}
    return Heartbeat(
        host=host,
        version=parse_version(version),
        state=state,
        confirmed=confirmed,
        task_id=task_id,
        failed_version=parse_version(failed_version) if failed_version else None,
        failures=failures,
        error=error,
        files=files,
    )


def send(plane: ControlPlane, b: Heartbeat) -> UpgradeOrder | None:
    """The order ``plane`` answers one heartbeat with (``None``: no order)."""
    return plane.answer([b])[0].order


def progress(store: Store, task_id: str, host: str) -> HostProgress | None:
    """What ``store`` holds of ``host`` in the rollout."""
    return store.read(task_id, [host])[0].progress


def rpc_report(
    port: int, host: str, timeout_s: float = 10, source: str = "127.0.0.1"
) -> dict[str, Any]:
    """One ``Agent.ReportStatus`` of an unmodified falcon agent on a connection of its own
    from the loopback address ``source``; the decoded reply."""
    frame = {
        "method": "Agent.ReportStatus",
        "params": [{"Hostname": host, "IP": "", "AgentVersion": "1.0", "InUpgrading": False}],
        "id": 0,
    }
    with socket.create_connection(
        ("127.0.0.1", port), timeout=timeout_s, source_address=(source, 0)
    ) as sock:
        sock.sendall(json.dumps(frame).encode() + b"\n")
        line = sock.makefile("rb").readline()
    return json.loads(line)  # type: ignore[no-any-return]
