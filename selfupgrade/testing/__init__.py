"""Test helpers that ship with selfupgrade, importable without pytest.

* Fakes for every role: :class:`FakeTransport`, :class:`FakeFetcher`, :class:`FakeRestarter`,
  and :class:`RecordingSystem` / :class:`CrashingSystem` to observe or crash file effects.
* Real servers on 127.0.0.1: :class:`ArtifactServer` (with :class:`Fault` injection) and
  :class:`ControlServer` (one published order, every heartbeat recorded).
* Real supervisors: :class:`ServiceHarness` (systemd-like ``Restart=always`` with a real
  ``NOTIFY_SOCKET``) and :class:`Supervisord`.
* A real ``redis-server`` on a free port: :class:`RedisServer`.
* A TCP proxy on 127.0.0.1 that delays, resets and partitions: :class:`FaultProxy`.
* A toy daemon triple to upgrade: :func:`toy_release`; releases of your own files, signed or
  not: :class:`ReleaseFactory`.
* The real control server in-process: :class:`HbsServer` (``selfupgrade[server]``), and a
  fleet of agents beating to it: :class:`Fleet` (simulated in-process, or real processes).

Every server and supervisor is a context manager that stops what it started.
"""

from typing import Any

from .artifact_server import ArtifactServer, Fault, ServedRequest
from .control_server import HEARTBEAT_PATH, ControlServer
from .fakes import CrashingSystem, FakeFetcher, FakeRestarter, FakeTransport, RecordingSystem
from .fault_proxy import FaultProxy, ProxyStats
from .fleet import AgentHome, Fleet
from .harness import Notification, ServiceHarness, Supervisord, stop_pid
from .processes import marked, new_mark, stop_marked, with_mark
from .redis_server import RedisServer, find_redis_server, free_port
from .releases import ReleaseFactory
from .toy import TOY_FILES, ToyRelease, toy_release, toy_version

__all__ = [
    "HEARTBEAT_PATH",
    "TOY_FILES",
    "AgentHome",
    "ArtifactServer",
    "ControlServer",
    "CrashingSystem",
    "FakeFetcher",
    "FakeRestarter",
    "FakeTransport",
    "Fault",
    "FaultProxy",
    "Fleet",
    "HbsServer",
    "Notification",
    "ProxyStats",
    "RecordingSystem",
    "RedisServer",
    "ReleaseFactory",
    "ServedRequest",
    "ServiceHarness",
    "Supervisord",
    "ToyRelease",
    "find_redis_server",
    "free_port",
    "marked",
    "new_mark",
    "stop_marked",
    "stop_pid",
    "toy_release",
    "toy_version",
    "with_mark",
]


def __getattr__(name: str) -> Any:
    # HbsServer needs the server extra; import it only when asked for
    if name == "HbsServer":
        from .hbs import HbsServer

        return HbsServer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
