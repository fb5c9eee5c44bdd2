"""The control server in-process, for tests: the real hbs app on uvicorn, in a thread.

::

    with HbsServer(tmp_dir) as hbs:                    # or the ``hbs`` fixture
        agent_url = hbs.heartbeat_url
        hbs.publish({"wgeturl": ..., "version": "1.1", "binfile_md5": ...})
        hbs.start_rollout({"release": ..., "plan": {...}})

It is the same :class:`~selfupgrade.server.ControlPlane` and ASGI app hbs runs, with the
embedded (SQLite) store in the given directory, on 127.0.0.1 and a port the kernel picks. An
exception inside a request handler is recorded and re-raised by :meth:`HbsServer.check` (and
when the ``with`` block ends), so a server-side bug fails the test that caused it. Needs
``selfupgrade[server]``.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from pathlib import Path
from typing import Any

import httpx

from ..server.app import AppConfig, create_app
from ..server.plane import ControlPlane, PlaneConfig
from ..server.stores.sqlite import SqliteStore
from ..server.tasks import TaskLimits
from ._base import RecordsErrors

__all__ = ["HbsServer"]

_Scope = MutableMapping[str, Any]
_App = Callable[
    [_Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]
]


class HbsServer(RecordsErrors):
    """hbs in-process on ``http://127.0.0.1:<port>``.

    Args:
        directory: where the embedded store's file goes (a fresh directory per test).
        limits: limits of falcon-API tasks (queue length, lease, retries, failure limit;
            by default 5 slots, a 30 s lease, 2 s backoff and no probation).
        app: the HTTP front end's settings (tokens, ...); admin routes answer loopback callers.
        tick_s: how often leases are expired and waves promoted.

    Attributes:
        plane: the control plane, for direct inspection.
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        limits: TaskLimits | None = None,
        app: AppConfig | None = None,
        tick_s: float = 0.2,
    ) -> None:
        super().__init__()
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        # no probation: a test's agents often first beat after its publish
        self._limits = limits or TaskLimits(
            max_in_flight=5, lease_s=30, retry_backoff_s=2, probation_s=0
        )
        self._app_config = app or AppConfig(tick_s=tick_s)
        self.store: SqliteStore | None = None
        self.plane: ControlPlane | None = None
        self.port = 0
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._client = httpx.Client(timeout=10, trust_env=False)

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def heartbeat_url(self) -> str:
        """Where agents send heartbeats."""
        return f"{self.url}/selfupgrade/v1/heartbeat"

    def _record_errors(self, app: _App) -> _App:
        async def wrapped(scope: _Scope, receive: Any, send: Any) -> None:
            try:
                await app(scope, receive, send)
            except Exception as exc:
                self._error(exc)
                raise

        return wrapped

    def start(self) -> HbsServer:
        """Start serving; returns once the port is bound."""
        import uvicorn

        from ..server.http_limits import BoundedHttpToolsProtocol

        self.store = SqliteStore(self.directory / "hbs.db")
        self.plane = ControlPlane(self.store, PlaneConfig(limits=self._limits, task_cache_s=0.1))
        app = self._record_errors(create_app(self.plane, self._app_config))
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=0,
            log_level="warning",
            lifespan="on",
            http=BoundedHttpToolsProtocol,
            loop="asyncio",
            access_log=False,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=lambda: asyncio.run(self._server.serve()), name="hbs", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the in-process hbs did not start")
            time.sleep(0.01)
        self.port = self._server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        """Stop serving and close the store."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
        if self.store is not None:
            self.store.close()
            self.store = None
        self._client.close()

    # ---- the API, for tests --------------------------------------------------------------

    def _call(self, method: str, path: str, body: Mapping[str, Any] | None = None) -> Any:
        reply = self._client.request(
            method, f"{self.url}{path}", content=json.dumps(body) if body is not None else None
        )
        if reply.status_code >= 400:
            raise AssertionError(f"{method} {path} answered {reply.status_code}: {reply.text}")
        return reply.json()

    def publish(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """``POST /agent/upgrade`` (the falcon API); the task in its ``data``."""
        return dict(self._call("POST", "/agent/upgrade", body)["data"])

    def cancel(self) -> None:
        """``DELETE /agent/upgrade``."""
        self._call("DELETE", "/agent/upgrade")

    def start_rollout(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """``POST /selfupgrade/v1/rollouts``; the rollout's detail."""
        return dict(self._call("POST", "/selfupgrade/v1/rollouts", body))

    def rollout(self, rollout_id: str) -> dict[str, Any]:
        """``GET /selfupgrade/v1/rollouts/{id}``."""
        return dict(self._call("GET", f"/selfupgrade/v1/rollouts/{rollout_id}"))

    def versions(self) -> dict[str, str]:
        """``GET /agentversions``: host -> version."""
        return dict(self._call("GET", "/agentversions")["data"])

    def status(self) -> dict[str, Any]:
        """``GET /selfupgrade/v1/status``."""
        return dict(self._call("GET", "/selfupgrade/v1/status"))
