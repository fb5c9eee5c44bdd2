"""Shared fixtures. Servers come from the selfupgrade pytest plugin (``artifact_server``,
``control_server``); this file adds what only our own suite needs."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from selfupgrade.server import MemoryStore, SqliteStore, Store
from selfupgrade.testing import RedisServer, find_redis_server


@pytest.fixture(autouse=True)
def _quiet_httpx() -> None:
    logging.getLogger("httpx").setLevel(logging.WARNING)


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port on 127.0.0.1 that accepts connections and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


@pytest.fixture
def closed_port() -> int:
    """A port on 127.0.0.1 where nothing listens (connections are refused)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A real redis-server on a free port, for the whole session (tests flush it).

    Skipped when redis-server is not installed, unless SELFUPGRADE_REQUIRE_REDIS=1 (as in CI),
    where a missing server is a failure.
    """
    if find_redis_server() is None:
        if os.environ.get("SELFUPGRADE_REQUIRE_REDIS") == "1":
            pytest.fail("redis-server is required (SELFUPGRADE_REQUIRE_REDIS=1) but not installed")
        pytest.skip("redis-server is not installed (Debian: apt-get install redis-server)")
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The URL of a freshly flushed redis-server."""
    import redis

    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url


def make_store(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> Store:
    """A fresh store of ``kind``: ``memory``, ``sqlite`` or ``redis``."""
    if kind == "memory":
        return MemoryStore()
    if kind == "sqlite":
        return SqliteStore(tmp_path / "hbs.db")
    from selfupgrade.server.stores.redis import RedisStore

    return RedisStore(request.getfixturevalue("redis_url"))


@pytest.fixture(params=["memory", "sqlite", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """Each store in turn (the Redis one on the session's redis-server)."""
    s = make_store(request.param, tmp_path, request)
    yield s
    s.close()


# ---- real systemd: what a unit with ProtectHome= and PrivateTmp= can reach -------------


def host_python() -> str:
    """An interpreter a ``ProtectHome=true`` unit can run that can import this checkout."""
    from examples.http_daemon.drive import systemd_python

    python = systemd_python()
    if python is None:
        pytest.skip(
            "needs /usr/bin/python3 of this interpreter's version (ProtectHome hides others)"
        )
    return python


@pytest.fixture
def place() -> Iterator[Path]:
    """The test's directories, outside /tmp (the unit's PrivateTmp hides /tmp)."""
    base = Path(__file__).resolve().parent.parent / ".test-systemd"
    base.mkdir(exist_ok=True)
    path = Path(tempfile.mkdtemp(dir=base))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)
