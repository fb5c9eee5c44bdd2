"""The falcon heartbeat protocol: JSON-RPC 1.0 over TCP (port 6030), as falcon-plus agents speak it.

An unmodified falcon-plus 6.x agent keeps one connection and sends, one compact JSON object per
line: ``Agent.ReportStatus`` (the heartbeat), ``Agent.SyncServiceNames``,
``Agent.BuiltinMetrics`` and ``Agent.TrustableIps``. Each is answered with a result of the JSON
type the agent decodes, so it never drops the connection; ``ReportStatus`` goes through the
control plane and carries the upgrade instruction (``Args``) when the host is admitted.

The seed's request has no room for progress or failures (only ``InUpgrading``), so for such
agents a failure shows as a lease that runs out. selfupgrade's own
:class:`~selfupgrade.transport.falcon_rpc.FalconRpcTransport` adds keys a Go hbs ignores
(``State``, ``Error``, ``TaskId``, ``FailedVersion``, ``Failures``, ``Confirmed``, ``Files``,
``Labels``) and this server reads them.

Frames are capped at ``max_frame_bytes``; a malformed frame closes the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from ..models import Heartbeat, UpgradeState, parse_version
from .batch import HeartbeatBatcher
from .plane import ControlPlane

__all__ = ["heartbeat_from_report", "serve_falcon_rpc"]

log = logging.getLogger("selfupgrade.server.rpc")


def _get(params: Mapping[str, Any], key: str, default: Any = None) -> Any:
    """Go decodes JSON keys case-insensitively; so do we."""
    if key in params:
        return params[key]
    lowered = key.lower()
    for k, v in params.items():
        if isinstance(k, str) and k.lower() == lowered:
            return v
    return default


def heartbeat_from_report(params: Mapping[str, Any]) -> Heartbeat:
    """Turn an ``AgentReportRequest`` (plus selfupgrade's extra keys) into a heartbeat.

    Raises:
        ValueError: no ``Hostname``, or an ``AgentVersion`` that is not a version.
    """
    host = _get(params, "Hostname", "")
    if not isinstance(host, str) or not host:
        raise ValueError("Hostname is empty")
    state_text = _get(params, "State")
    if isinstance(state_text, str):
        state = UpgradeState(state_text)
    else:
        state = (
            UpgradeState.DOWNLOADING if _get(params, "InUpgrading") is True else UpgradeState.IDLE
        )
    failed = _get(params, "FailedVersion")
    data = {
        "host": host,
        "version": _get(params, "AgentVersion"),
        "state": state.value,
        "error": _get(params, "Error"),
        "task_id": _get(params, "TaskId") or "",
        "failed_version": failed or None,
        "labels": _get(params, "Labels") or {},
        "files": _get(params, "Files") or {},
        "confirmed": _get(params, "Confirmed", True),
        "failures": _get(params, "Failures", 0),
    }
    parse_version(data["version"])
    return Heartbeat.from_wire(data)


class _Connection:
    def __init__(
        self,
        beats: HeartbeatBatcher,
        max_frame_bytes: int,
        token_for: Callable[[str], str | None] | None,
    ) -> None:
        self.beats = beats
        self.max = max_frame_bytes
        self.token_for = token_for

    async def dispatch(self, method: object, params: object) -> Any:
        first = params[0] if isinstance(params, list) and params else {}
        if not isinstance(first, Mapping):
            first = {}
        if method == "Agent.ReportStatus":
            try:
                beat = heartbeat_from_report(first)
            except ValueError as exc:
                log.warning("bad ReportStatus: %s", exc)
                return {"code": 1, "Args": None}
            if self.token_for is not None:
                expected = self.token_for(beat.host)
                given = _get(first, "Token", "")
                if expected is None or (
                    expected and not hmac.compare_digest(str(given).encode(), expected.encode())
                ):
                    log.warning("ReportStatus of %s without its agent token", beat.host)
                    return {"code": 1, "Args": None}
            task = (await self.beats.answer(beat)).task
            args = task.seed_view() if task is not None else None
            if task is not None and args is None:
                log.warning(
                    "task %s cannot be sent to falcon agents (not md5/bin_<version>)", task.id
                )
            if args is not None and task is not None:
                args["task_id"] = task.id  # a Go agent ignores keys it does not know
            return {"code": 0, "Args": args}
        if method == "Agent.SyncServiceNames":
            return {"code": 0, "args": ""}
        if method == "Agent.BuiltinMetrics":
            return {"Metrics": [], "Checksum": "", "Timestamp": int(time.time())}
        if method == "Agent.TrustableIps":
            return ""
        if method == "Agent.MinePlugins":
            return {"Plugins": [], "Timestamp": int(time.time())}
        raise LookupError(f"rpc: can't find method {method}")

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    line = await reader.readuntil(b"\n")
                except asyncio.IncompleteReadError:
                    return  # closed (the agent's first connection sends nothing)
                except asyncio.LimitOverrunError:
                    log.warning("frame larger than %d bytes; closing", self.max)
                    return
                if not line.strip():
                    continue
                try:
                    frame = json.loads(line)
                    method, params, call_id = frame["method"], frame.get("params"), frame["id"]
                except (ValueError, KeyError, TypeError):
                    log.warning("malformed frame; closing the connection")
                    return
                try:
                    result = await self.dispatch(method, params)
                    reply = {"id": call_id, "result": result, "error": None}
                except LookupError as exc:
                    reply = {"id": call_id, "result": None, "error": str(exc)}
                except Exception as exc:
                    log.exception("%s failed", method)
                    reply = {"id": call_id, "result": None, "error": f"internal error: {exc}"}
                writer.write(json.dumps(reply, separators=(",", ":")).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, OSError):
            return
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


async def serve_falcon_rpc(
    plane: ControlPlane,
    host: str,
    port: int,
    *,
    max_frame_bytes: int = 64 * 1024,
    token_for: Callable[[str], str | None] | None = None,
    batcher: HeartbeatBatcher | None = None,
) -> asyncio.Server:
    """Listen for falcon agents on ``host:port``; return the started server.

    Args:
        batcher: how heartbeats reach ``plane`` (shared with the HTTP app); by default one
            of its own.
        token_for: when given, ``ReportStatus`` must carry ``Token`` equal to
            ``token_for(host)`` (``""``: none needed; ``None``: refused). An unmodified falcon
            agent cannot send one, so require tokens only for selfupgrade's own RPC agents.
    """
    beats = batcher or HeartbeatBatcher(lambda batch: plane.answer(batch))
    conn = _Connection(beats, max_frame_bytes, token_for)
    return await asyncio.start_server(conn.serve, host, port, limit=max_frame_bytes)
