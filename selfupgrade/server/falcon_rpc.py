"""The falcon heartbeat protocol: JSON-RPC 1.0 over TCP (port 6030), as falcon-plus agents speak it.

An unmodified falcon-plus 6.x agent keeps one connection and sends, one compact JSON object per
line: ``Agent.ReportStatus`` (the heartbeat), ``Agent.SyncServiceNames``,
``Agent.BuiltinMetrics`` and ``Agent.TrustableIps``. Each is answered with a result of the JSON
type the agent decodes, so it never drops the connection; ``ReportStatus`` goes through the
control plane and carries the upgrade instruction (``Args``) when the host is admitted.

The seed's request has no room for progress or failures (only ``InUpgrading``), so hbs infers
what an unmodified agent did from the process that reports (see :class:`ProcessTracker`): the
same process reporting the old version after its order rolled back, a new process reporting
the new version upgraded. selfupgrade's own
:class:`~selfupgrade.transport.falcon_rpc.FalconRpcTransport` adds keys a Go hbs ignores
(``State``, ``Error``, ``TaskId``, ``FailedVersion``, ``Failures``, ``Confirmed``, ``Files``,
``Labels``) and this server reads them; a report with ``State`` is taken at its word.

Frames are capped at ``max_frame_bytes``; a malformed frame closes the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from ..models import Heartbeat, UpgradeState, parse_version
from ._json import loads_untrusted
from .batch import HeartbeatBatcher
from .http_limits import connection_cap
from .plane import ControlPlane

__all__ = ["ProcessTracker", "RpcLimits", "heartbeat_from_report", "serve_falcon_rpc"]

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
    explicit = isinstance(state_text, str)
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
    beat = Heartbeat.from_wire(data)
    return beat if explicit else replace(beat, reports_state=False)


class ProcessTracker:
    """Which process of each agent is talking: a restart is told from a reconnect.

    An unmodified falcon agent, when it starts, opens one connection and closes it without
    sending anything (it learns its local address from it), then opens the connection it
    keeps, whose call ids start at 0. A reconnect of a running agent (after a timeout or a
    dropped connection) opens a new connection without that probe. So a host's new connection
    is a new process when a probe came from the host's address after the host's last report,
    and the same process otherwise.

    Process ids are ``"<listener>/<n>"``; ``<listener>`` is new with every listener, so that
    after an hbs restart the rulebook sees "cannot tell" rather than "restarted". Hosts behind
    one address (NAT, or every agent on one machine as in the tests) share their probes: a
    reconnect right after another agent's start there counts as a restart.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._boot = secrets.token_hex(4)
        self._count = 0
        self._probe_at: dict[str, float] = {}
        # host -> [process id, connection, time of its last report]
        self._hosts: dict[str, list[Any]] = {}

    def probe(self, peer: str) -> None:
        """A connection from ``peer`` closed without sending anything."""
        self._probe_at[peer] = self._clock()

    def process(self, host: str, peer: str, connection: object) -> str:
        """The process id of ``host`` reporting on ``connection`` from ``peer``."""
        now = self._clock()
        known = self._hosts.get(host)
        if known is not None and known[1] is connection:
            known[2] = now
            return str(known[0])
        if known is None or self._probe_at.get(peer, -math.inf) > known[2]:
            self._count += 1
            pid = f"{self._boot}/{self._count}"
        else:
            pid = known[0]
        self._hosts[host] = [pid, connection, now]
        return str(pid)


class _Listener:
    def __init__(
        self,
        beats: HeartbeatBatcher,
        max_frame_bytes: int,
        token_for: Callable[[str], str | None] | None,
        limits: RpcLimits,
        tokens_identify_hosts: bool,
    ) -> None:
        self.beats = beats
        self.tokens_identify_hosts = tokens_identify_hosts
        self.max = max_frame_bytes
        self.token_for = token_for
        self.limits = limits
        self.processes = ProcessTracker()
        self.open = 0
        # connections that have not sent a frame yet, oldest first: the first to go when the
        # listener is full (an agent sends its first call at once)
        self._unheard: dict[asyncio.StreamWriter, None] = {}
        self._evicted: set[asyncio.StreamWriter] = set()

    async def dispatch(self, method: object, params: object, peer: str, connection: object) -> Any:
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
            if not beat.reports_state:
                beat = replace(beat, process=self.processes.process(beat.host, peer, connection))
            if not self.tokens_identify_hosts:
                beat = replace(beat, source=peer)
            reply = await self.beats.answer(beat)
            if reply.refused:
                log.debug("ReportStatus of %s refused: %s", beat.host, reply.refused)
                return {"code": 1, "Args": None}
            task = reply.task
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
        peername = writer.get_extra_info("peername")
        peer = str(peername[0]) if isinstance(peername, tuple) else ""
        connection = object()
        heard = False
        self.open += 1
        if self.open > self.limits.max_connections:
            if not self._unheard:
                self.open -= 1
                writer.transport.abort()
                return
            oldest = next(iter(self._unheard))
            self._unheard.pop(oldest)
            self._evicted.add(oldest)  # its end is not an agent's start-up probe
            oldest.transport.abort()
        self._unheard[writer] = None
        try:
            while True:
                try:
                    line = await self._frame(reader)
                except asyncio.IncompleteReadError as exc:
                    if not heard and not exc.partial and writer not in self._evicted:
                        self.processes.probe(peer)  # an agent's start-up probe
                    return
                except asyncio.LimitOverrunError:
                    log.warning("frame larger than %d bytes; closing", self.max)
                    return
                except asyncio.TimeoutError:
                    return  # idle too long, or a frame trickling in
                if not heard:
                    heard = True
                    self._unheard.pop(writer, None)
                if not line.strip():
                    continue
                try:
                    frame = loads_untrusted(line)
                    method, params, call_id = frame["method"], frame.get("params"), frame["id"]
                except (ValueError, KeyError, TypeError):
                    log.warning("malformed frame; closing the connection")
                    return
                try:
                    result = await self.dispatch(method, params, peer, connection)
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
            self.open -= 1
            self._unheard.pop(writer, None)
            self._evicted.discard(writer)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _frame(self, reader: asyncio.StreamReader) -> bytes:
        """The next frame: its first byte within ``idle_s``, the rest within ``frame_s``."""
        first = await asyncio.wait_for(reader.readexactly(1), self.limits.idle_s)
        if first == b"\n":
            return first
        return first + await asyncio.wait_for(reader.readuntil(b"\n"), self.limits.frame_s)


@dataclass(frozen=True)
class RpcLimits:
    """Time and connection limits of the JSON-RPC listener.

    Attributes:
        idle_s: a connection that sends no frame for this long is closed (an agent calls
            every heartbeat interval, 60 s by default: 3 intervals).
        frame_s: a frame must be complete within this long of its first byte.
        max_connections: connections held at once (by default 40% of the file descriptors
            this process may open); beyond it, the oldest connection that has not sent a frame
            yet is closed, or else the new one.
        backlog: connections the kernel queues before hbs accepts them (a fleet restarting at
            once connects at once).
    """

    idle_s: float = 180.0
    frame_s: float = 10.0
    max_connections: int = field(default_factory=lambda: connection_cap(0.4))
    backlog: int = 4096


async def serve_falcon_rpc(
    plane: ControlPlane,
    host: str,
    port: int,
    *,
    max_frame_bytes: int = 64 * 1024,
    token_for: Callable[[str], str | None] | None = None,
    tokens_identify_hosts: bool = False,
    batcher: HeartbeatBatcher | None = None,
    limits: RpcLimits | None = None,
) -> asyncio.Server:
    """Listen for falcon agents on ``host:port``; return the started server.

    Args:
        batcher: how heartbeats reach ``plane`` (shared with the HTTP app); by default one
            of its own.
        limits: idle and frame timeouts, the connection cap and the backlog.
        token_for: when given, ``ReportStatus`` must carry ``Token`` equal to
            ``token_for(host)`` (``""``: none needed; ``None``: refused). An unmodified falcon
            agent cannot send one, so require tokens only for selfupgrade's own RPC agents.
        tokens_identify_hosts: ``token_for`` gives each host its own token, which proves who
            sent a report; otherwise each report is bound to the address it came from
            (:mod:`~selfupgrade.server.admission`).
    """
    beats = batcher or HeartbeatBatcher(lambda batch: plane.answer(batch))
    limits = limits or RpcLimits()
    listener = _Listener(beats, max_frame_bytes, token_for, limits, tokens_identify_hosts)
    return await asyncio.start_server(
        listener.serve, host, port, limit=max_frame_bytes, backlog=limits.backlog
    )
