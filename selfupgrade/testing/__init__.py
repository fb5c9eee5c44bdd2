"""Test helpers that ship with selfupgrade, importable without pytest.

* Fakes for every role: :class:`FakeTransport`, :class:`FakeFetcher`, :class:`FakeRestarter`,
  and :class:`RecordingSystem` / :class:`CrashingSystem` to observe or crash file effects.
* Real servers on 127.0.0.1: :class:`ArtifactServer` (with :class:`Fault` injection) and
  :class:`ControlServer` (one published order, every heartbeat recorded).
* Real supervisors: :class:`ServiceHarness` (systemd-like ``Restart=always`` with a real
  ``NOTIFY_SOCKET``) and :class:`Supervisord`.
* A real ``redis-server`` on a free port: :class:`RedisServer`.
* A toy daemon triple to upgrade: :func:`toy_release`.

Every server and supervisor is a context manager that stops what it started.
"""

from .artifact_server import ArtifactServer, Fault, ServedRequest
from .control_server import HEARTBEAT_PATH, ControlServer
from .fakes import CrashingSystem, FakeFetcher, FakeRestarter, FakeTransport, RecordingSystem
from .harness import Notification, ServiceHarness, Supervisord, stop_pid
from .redis_server import RedisServer, find_redis_server, free_port
from .toy import TOY_FILES, ToyRelease, toy_release

__all__ = [
    "HEARTBEAT_PATH",
    "TOY_FILES",
    "ArtifactServer",
    "ControlServer",
    "CrashingSystem",
    "FakeFetcher",
    "FakeRestarter",
    "FakeTransport",
    "Fault",
    "Notification",
    "RecordingSystem",
    "RedisServer",
    "ServedRequest",
    "ServiceHarness",
    "Supervisord",
    "ToyRelease",
    "find_redis_server",
    "free_port",
    "stop_pid",
    "toy_release",
]
