"""pytest fixtures for simulating upgrades, registered through the ``pytest11`` entry point.

Installing selfupgrade makes them available with no conftest:

* ``release_factory`` (session): builds releases from your files or the toy daemon, signed on
  request (:class:`~selfupgrade.testing.ReleaseFactory`).
* ``artifact_server``: a real HTTP server on 127.0.0.1 with fault injection
  (:class:`~selfupgrade.testing.ArtifactServer`); ``artifact_server.publish(release)``.
* ``control_server``: a minimal server answering heartbeats with one order
  (:class:`~selfupgrade.testing.ControlServer`).
* ``hbs``: the real control server in-process with the embedded store, fresh for each test
  (:class:`~selfupgrade.testing.hbs.HbsServer`; needs ``selfupgrade[server]``).
* ``systemd``: a real systemd as PID 1 of its own namespaces
  (:class:`~selfupgrade.testing.systemd.Systemd`); skipped with the reason where it cannot run
  (not root, no systemd, no writable cgroup2), a failure with ``SELFUPGRADE_REQUIRE_SYSTEMD=1``.
* ``fleet``: three in-process agents of the toy daemon 1.0 beating to ``hbs``
  (:class:`~selfupgrade.testing.Fleet`); ``make_fleet(...)`` builds others (more agents, your
  release, your daemon as real processes).

Every fixture stops what it started, and errors raised in the servers' threads are re-raised
in the test when it ends.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .artifact_server import ArtifactServer
from .control_server import ControlServer
from .fleet import Fleet
from .releases import ReleaseFactory

__all__ = [
    "artifact_server",
    "control_server",
    "fleet",
    "hbs",
    "make_fleet",
    "release_factory",
    "systemd",
]


@pytest.fixture(scope="session")
def release_factory() -> ReleaseFactory:
    """Builds releases (toy or your files), with one signing key for the session."""
    return ReleaseFactory()


@pytest.fixture
def artifact_server() -> Iterator[ArtifactServer]:
    """A real HTTP artifact server on 127.0.0.1, with fault injection."""
    with ArtifactServer() as server:
        yield server


@pytest.fixture
def control_server() -> Iterator[ControlServer]:
    """A minimal control server on 127.0.0.1 that answers heartbeats with one order."""
    with ControlServer() as server:
        yield server


@pytest.fixture
def hbs(tmp_path: Path) -> Iterator[Any]:
    """The real control server (hbs) in-process, embedded store, fresh for each test."""
    from .hbs import HbsServer

    with HbsServer(tmp_path / "hbs") as server:
        yield server


@pytest.fixture
def make_fleet(
    hbs: Any, tmp_path: Path, release_factory: ReleaseFactory
) -> Iterator[Callable[..., Fleet]]:
    """Builds and starts fleets beating to ``hbs``: ``make_fleet(n=10, release=...)``; any
    :class:`Fleet` argument may be given. All are stopped when the test ends."""
    started: list[Fleet] = []

    def make(**kwargs: Any) -> Fleet:
        kwargs.setdefault("release", release_factory.toy("1.0"))
        directory = tmp_path / f"fleet-{len(started) + 1}"
        fleet = Fleet(hbs.heartbeat_url, directory, **kwargs)
        started.append(fleet)
        return fleet.start()

    yield make
    for fleet in started:
        fleet.stop()


@pytest.fixture
def fleet(make_fleet: Callable[..., Fleet]) -> Fleet:
    """Three in-process agents running the toy daemon 1.0, beating to ``hbs``."""
    return make_fleet(n=3)


@pytest.fixture
def systemd() -> Iterator[Any]:
    """A real systemd in namespaces, booted for the test and stopped after it."""
    import os

    from .systemd import Systemd, unavailable

    why = unavailable()
    if why:
        if os.environ.get("SELFUPGRADE_REQUIRE_SYSTEMD") == "1":
            pytest.fail(f"a real systemd is required (SELFUPGRADE_REQUIRE_SYSTEMD=1): {why}")
        pytest.skip(f"a real systemd cannot run here: {why}")
    with Systemd() as manager:
        yield manager
