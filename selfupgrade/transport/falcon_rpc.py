"""The falcon heartbeat protocol on the agent side: JSON-RPC 1.0 over one TCP connection.

Speaks what a falcon-plus agent speaks (``Agent.ReportStatus`` with ``Hostname``, ``IP``,
``AgentVersion``, ``PluginVersion``, ``InUpgrading``; the reply's ``Args`` is the upgrade
instruction), so it works against a Go hbs; with ``extended=True`` (the default) it also sends
the progress and failure keys selfupgrade's hbs reads and a Go hbs ignores. Like the Go client
it keeps one connection, serialises calls, and re-dials after any error.
"""

from __future__ import annotations

import json
import socket
import threading
from typing import Any

from ..errors import OrderRejected, TransportError
from ..models import Heartbeat, UpgradeOrder, UpgradeState, falcon_release

__all__ = ["FalconRpcTransport"]

_WORKING = {
    UpgradeState.DOWNLOADING,
    UpgradeState.VERIFYING,
    UpgradeState.INSTALLING,
    UpgradeState.RESTARTING,
}


class FalconRpcTransport:
    """Heartbeats as ``Agent.ReportStatus`` calls to ``host:port`` (hbs's RPC listener).

    Args:
        address: ``"host:port"``, for example ``"127.0.0.1:6030"``.
        timeout_s: connect and per-call timeout (the Go client's is 10 s).
        ip: the ``IP`` reported; default: the local address of the connection.
        extended: also send selfupgrade's progress keys.
        max_reply_bytes: the largest reply line read.
        token: sent as ``Token`` when hbs requires agent tokens.
    """

    def __init__(
        self,
        address: str,
        *,
        timeout_s: float = 10.0,
        ip: str | None = None,
        extended: bool = True,
        max_reply_bytes: int = 1 << 20,
        token: str | None = None,
    ) -> None:
        host, sep, port = address.rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"address must be host:port, got {address!r}")
        self.address = (host.strip("[]"), int(port))
        self._timeout = timeout_s
        self._ip = ip
        self._extended = extended
        self._max = max_reply_bytes
        self._token = token
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._file: Any = None
        self._next_id = 0

    def _connect(self) -> None:
        sock = socket.create_connection(self.address, timeout=self._timeout)
        sock.settimeout(self._timeout)
        self._sock = sock
        self._file = sock.makefile("rb")
        self._next_id = 0
        if self._ip is None:
            self._ip = sock.getsockname()[0]

    def call(self, method: str, params: dict[str, Any]) -> Any:
        """One JSON-RPC call; returns its ``result``.

        Raises:
            TransportError: the connection failed, timed out, or the server answered an error.
        """
        with self._lock:
            try:
                if self._sock is None:
                    self._connect()
                assert self._sock is not None
                call_id = self._next_id
                self._next_id += 1
                frame = {"method": method, "params": [params], "id": call_id}
                self._sock.sendall(json.dumps(frame, separators=(",", ":")).encode() + b"\n")
                line = self._file.readline(self._max + 1)
                if not line.endswith(b"\n"):
                    raise TransportError(
                        f"{method}: connection closed or reply too long", url=self._url()
                    )
                reply = json.loads(line)
            except (OSError, ValueError) as exc:
                self._drop()
                raise TransportError(
                    f"{method} to {self._url()} failed: {exc}", url=self._url()
                ) from exc
            except TransportError:
                self._drop()
                raise
        if not isinstance(reply, dict) or reply.get("id") != call_id:
            self._drop()
            raise TransportError(f"{method}: reply does not match the call", url=self._url())
        if reply.get("error"):
            raise TransportError(f"{method}: {reply['error']}", url=self._url())
        return reply.get("result")

    def heartbeat(self, beat: Heartbeat) -> UpgradeOrder | None:
        """Send ``Agent.ReportStatus``; return the order in ``Args``, if any.

        Raises:
            TransportError: the call failed.
            OrderRejected: ``Args`` is not a valid instruction.
        """
        params: dict[str, Any] = {
            "Hostname": beat.host,
            "IP": self._ip or "",
            "AgentVersion": str(beat.version),
            "PluginVersion": "plugin not enabled",
            "InUpgrading": beat.state in _WORKING,
        }
        if self._extended:
            params.update(
                State=beat.state.value,
                Error=beat.error,
                TaskId=beat.task_id,
                FailedVersion=str(beat.failed_version) if beat.failed_version else None,
                Failures=beat.failures,
                Confirmed=beat.confirmed,
                Files={k: dict(v) for k, v in beat.files.items()},
                Labels=dict(beat.labels),
            )
        if self._token:
            params["Token"] = self._token
        result = self.call("Agent.ReportStatus", params)
        args = result.get("Args") if isinstance(result, dict) else None
        if not args:
            return None
        if not isinstance(args, dict):
            raise OrderRejected("Agent.ReportStatus: Args is not an object")
        try:
            release = falcon_release(
                args.get("type", 0),
                args.get("wgeturl", ""),
                args.get("version", ""),
                args.get("binfile_md5", ""),
                args.get("cfgfile_md5", ""),
            )
        except ValueError as exc:
            raise OrderRejected(f"the upgrade instruction is not acceptable: {exc}") from exc
        return UpgradeOrder(release, task_id=str(args.get("task_id", "")))

    def _url(self) -> str:
        return f"tcp://{self.address[0]}:{self.address[1]}"

    def _drop(self) -> None:
        if self._sock is not None:
            try:
                self._file.close()
                self._sock.close()
            except OSError:
                pass
        self._sock = None
        self._file = None

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self._drop()
