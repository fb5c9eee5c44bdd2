"""pytest fixtures for simulating upgrades, registered through the ``pytest11`` entry point.

* ``artifact_server``: an :class:`~selfupgrade.testing.ArtifactServer`, fresh for each test.
* ``control_server``: a :class:`~selfupgrade.testing.ControlServer`, fresh for each test.

Errors raised in the servers' threads are re-raised in the test when it ends.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .artifact_server import ArtifactServer
from .control_server import ControlServer

__all__ = ["artifact_server", "control_server"]


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
