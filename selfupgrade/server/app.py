"""The hbs HTTP API as an ASGI app (Starlette). Needs ``selfupgrade[server]``.

Routes:

==========================================  ========  ==========================================
``/selfupgrade/v1/heartbeat``               POST      a heartbeat -> ``{"order": null | {...}}``
``/agent/upgrade``                          POST      publish a task (the falcon API; admin)
``/agent/upgrade``                          DELETE    cancel the task, free its slots (admin)
``/agent/upgrade/nowargs``                  GET       the task in the falcon API's form
``/agentversions``                          GET       ``{host: version}``
``/agents``                                 GET       the hosts seen
``/selfupgrade/v1/status``                  GET       the task, counters, failures, the fleet
``/selfupgrade/v1/rollouts``                GET/POST  list rollouts / create one
``/selfupgrade/v1/rollouts/{id}``           GET       waves, states, failures, ETA
``/selfupgrade/v1/rollouts/{id}/{action}``  POST      pause, resume, abort, rollback (admin)
``/selfupgrade/v1/versions/bad``            GET/POST  bad versions / mark one (admin)
``/selfupgrade/v1/hosts/{host}/rebind``     POST      unbind a host from its address (admin)
``/selfupgrade/v1/openapi.json``            GET       the OpenAPI description
``/metrics``                                GET       Prometheus metrics
``/``                                       GET       the dashboard
``/health``                                 GET       ``ok``, or 503 naming what does not answer
==========================================  ========  ==========================================

Admin routes answer only callers on a loopback address (127.0.0.0/8 or ::1) that came without
proxy headers (``Forwarded``, ``X-Forwarded-For``, ``X-Real-IP``): a proxy on localhost does
not make a remote caller local. They also refuse what a web page could send (see
:func:`browser_refusal`): a ``Host`` that is not a loopback name or one of ``allowed_hosts``
(DNS rebinding), an ``Origin`` other than hbs's own or a cross-site ``Sec-Fetch-Site``
(CSRF), and a body type other than JSON or curl's default form type. With tokens configured
they also need ``Authorization: Bearer <token>`` of the ``write`` scope (compared in
constant time); with ``protect_reads`` the read routes need a ``read`` or ``write`` token.
Heartbeats need the agent's token when ``agent_token`` or ``agent_tokens`` is set. Bodies
are capped at ``max_body_bytes``. Every error is JSON:
``{"msg": "error", "field": ..., "error": ...}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, ParamSpec, TypeVar
from urllib.parse import urlsplit

try:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import (
        HTMLResponse,
        JSONResponse,
        PlainTextResponse,
        Response,
        StreamingResponse,
    )
    from starlette.routing import Route
    from starlette.types import Receive, Scope, Send
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "selfupgrade.server.app needs the 'server' extra: pip install 'selfupgrade[server]'"
    ) from exc

from ..models import Heartbeat
from ._json import UntrustedJSONError, loads_untrusted
from .batch import HeartbeatBatcher
from .commands import NoSuchRollout
from .dashboard import DASHBOARD_HTML
from .metrics import METRICS_CONTENT_TYPE, render_metrics
from .openapi import OPENAPI
from .plane import ControlPlane, Reply
from .rollouts import release_from_json
from .stores.base import StoreError
from .tasks import FieldError, seed_args

__all__ = ["AppConfig", "bearer_scope", "browser_refusal", "create_app", "token_matches"]

log = logging.getLogger("selfupgrade.server")
_P = ParamSpec("_P")
_T = TypeVar("_T")

HEARTBEAT_PATH = "/selfupgrade/v1/heartbeat"
NOOP_PATH = "/selfupgrade/v1/noop"
_PROXY_HEADERS = ("forwarded", "x-forwarded-for", "x-real-ip")

_BODY_TYPES = ("", "application/json", "application/x-www-form-urlencoded")
"""Content types an admin body may have: JSON, none, or what ``curl -d`` sends by default (a
browser's form can send that too; ``Origin`` is what stops it)."""


def _host_port(host_header: str) -> tuple[str, str]:
    """The name and port of a ``Host`` header (``[::1]:6031`` -> ``("::1", "6031")``)."""
    host = host_header.strip().lower()
    if host.startswith("["):
        name, _, rest = host[1:].partition("]")
        return name, rest.lstrip(":")
    if host.count(":") == 1:
        name, _, port = host.partition(":")
        return name, port
    return host, ""


def _is_loopback_name(name: str) -> bool:
    return name == "localhost" or name.endswith(".localhost") or _is_loopback(name)


def browser_refusal(
    headers: Mapping[str, str], allowed_hosts: frozenset[str]
) -> tuple[int, str] | None:
    """Why an admin request looks like one a web page made, or ``None``.

    * ``Host`` must be a loopback name (``localhost``, ``127.x.x.x``, ``::1``) or one of
      ``allowed_hosts``: a page whose own name was re-pointed at 127.0.0.1 (DNS rebinding)
      sends its own name.
    * ``Origin``, when sent (every browser sends it on a cross-origin POST), must be hbs's own:
      the same host and port as ``Host``. ``Sec-Fetch-Site``, when sent, must be
      ``same-origin`` or ``none`` (typed by the user).
    * The body's ``Content-Type`` must be JSON, none, or curl's default form type: a page may
      send ``text/plain`` or ``multipart/form-data`` without asking the server first.

    ``curl`` sends no ``Origin`` and no ``Sec-Fetch-Site``: the article's commands pass.
    """
    host = headers.get("host", "")
    name, port = _host_port(host)
    if not (_is_loopback_name(name) or name in allowed_hosts):
        return 403, (
            f"Host {host!r} is not a loopback name or one of allowed_hosts: admin routes refuse "
            "it (a web page re-pointed at this address would send its own name)"
        )
    origin = headers.get("origin")
    if origin is not None:
        parts = urlsplit(origin)
        try:
            theirs = (parts.hostname or "", str(parts.port or ""))
        except ValueError:
            theirs = ("", "")
        if parts.scheme not in ("http", "https") or theirs != (name, port):
            return 403, f"Origin {origin!r} is not hbs's own: admin routes refuse web pages"
    site = headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        return 403, f"Sec-Fetch-Site {site!r}: admin routes refuse requests from web pages"
    kind = headers.get("content-type", "").partition(";")[0].strip().lower()
    if kind not in _BODY_TYPES:
        return 415, (
            f"Content-Type {kind!r} is not accepted here: send JSON (application/json), or "
            "curl -d's default"
        )
    return None


@dataclass(frozen=True)
class AppConfig:
    """Settings of the HTTP front end.

    Attributes:
        admin_token: a token with the ``write`` scope (kept for simple setups).
        tokens: bearer tokens and their scope, ``{"<token>": "read" | "write"}``. When any
            token is set, admin routes (POST, DELETE) need a ``write`` token.
        protect_reads: read routes (status, rollouts, versions, metrics) also need a token,
            ``read`` or ``write``.
        loopback_admin_only: admin routes answer only loopback callers (the seed's rule).
        allowed_hosts: names besides the loopback ones by which admin routes may be reached
            (the name part of ``Host``, lowercased), e.g. ``{"hbs.example.com"}``.
        trusted_proxies: addresses of reverse proxies in front of hbs: for a request from
            one, the caller is the address the proxy adds (``X-Forwarded-For``/``X-Real-IP``),
            and without that header the caller is unknown (refused). A proxy that adds no
            header (nginx's plain ``proxy_pass``) and is not listed here makes every caller
            look like the proxy: on the same host, local; use tokens then.
        agent_token: when set, heartbeats need ``Authorization: Bearer <agent_token>``.
        agent_tokens: per-host heartbeat tokens, ``{"<host>": "<token>"}``; a host without
            one is refused.
        max_body_bytes: larger request bodies are refused with 413.
        tick_s: how often the plane's housekeeping runs (flush heartbeats, expire leases).
        noop_route: serve ``POST /selfupgrade/v1/noop``, which reads a body and answers
            ``{"order": null}`` without looking at it: the reference for benchmarks.
        health_deadline_s: ``/health`` answers within this long, saying whether the store
            answered.
        view_deadline_s: the longest a view or a command waits for the store.
    """

    admin_token: str = ""
    tokens: Mapping[str, str] = field(default_factory=dict)
    protect_reads: bool = False
    loopback_admin_only: bool = True
    allowed_hosts: frozenset[str] = frozenset()
    trusted_proxies: frozenset[str] = frozenset()
    agent_token: str = ""
    agent_tokens: Mapping[str, str] = field(default_factory=dict)
    max_body_bytes: int = 64 * 1024
    tick_s: float = 1.0
    noop_route: bool = False
    health_deadline_s: float = 0.8
    view_deadline_s: float = 30.0

    def scopes(self) -> dict[str, str]:
        """Every bearer token and its scope."""
        out = dict(self.tokens)
        if self.admin_token:
            out[self.admin_token] = "write"
        return out

    def agent_token_for(self, host: str) -> str | None:
        """The token a heartbeat of ``host`` needs, ``""`` if none is required, ``None`` if the
        host has no token while per-host tokens are configured."""
        if self.agent_tokens:
            return self.agent_tokens.get(host)
        return self.agent_token

    @property
    def tokens_identify_hosts(self) -> bool:
        """Whether a heartbeat's token proves which host sent it (per-host tokens): its
        host is then not bound to the address it beats from (see
        :mod:`~selfupgrade.server.admission`)."""
        return bool(self.agent_tokens)


def bearer_scope(header: str, scopes: Mapping[str, str]) -> str | None:
    """The scope of the bearer token in an ``Authorization`` header, compared in constant time
    against every configured token (so timing tells nothing about which one nearly matched)."""
    given = header.removeprefix("Bearer ").encode() if header.startswith("Bearer ") else b""
    found = None
    for token, scope in scopes.items():
        if hmac.compare_digest(given, token.encode()) and given:
            found = scope
    return found


def token_matches(header: str, expected: str) -> bool:
    """Whether an ``Authorization`` header carries exactly ``Bearer <expected>``."""
    return hmac.compare_digest(header.encode(), f"Bearer {expected}".encode())


class _HttpError(Exception):
    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.field = field


def _error(status: int, message: str, field: str | None = None) -> JSONResponse:
    body: dict[str, Any] = {"msg": "error", "error": message}
    if field is not None:
        body["field"] = field
    return JSONResponse(body, status_code=status)


def _peer(scope: Scope) -> str:
    """The TCP peer's address (``""`` when the server does not tell)."""
    client = scope.get("client")
    return str(client[0]) if client else ""


def _caller(scope: Scope, trusted_proxies: frozenset[str]) -> str | None:
    """The address of whoever made the request; ``None`` when it cannot be told.

    A direct caller (not in ``trusted_proxies``) is its TCP peer, and a forwarding header
    makes it unknown (a proxy that forwards does not make a remote caller local). Through a
    trusted proxy, the caller is the address the proxy added last (``X-Forwarded-For``, or
    ``X-Real-IP``); without either it is unknown. Read from the ASGI scope itself: heartbeats
    ask too, and build no request object.
    """
    peer = _peer(scope)
    headers: dict[str, str] = {
        k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]
    }
    if peer not in trusted_proxies:
        return None if any(h in headers for h in _PROXY_HEADERS) else peer
    forwarded = headers.get("x-forwarded-for", "")
    if forwarded:
        return forwarded.rsplit(",", 1)[-1].strip()
    return headers.get("x-real-ip", "").strip() or None


def _success(data: Any) -> JSONResponse:
    return JSONResponse({"msg": "success", "data": data})


class _SharedBody:
    """One encoding of a large answer for every reader within ``ttl_s``: a hundred readers of
    ``/agentversions`` at once cost one build, not a hundred."""

    def __init__(self, ttl_s: float = 1.0) -> None:
        self._ttl_s = ttl_s
        self._body = b""
        self._at = -math.inf
        self._lock = asyncio.Lock()

    async def get(self, build: Callable[[], Awaitable[bytes]]) -> bytes:
        async with self._lock:  # readers that came during a build wait for it, and share it
            if time.monotonic() - self._at >= self._ttl_s:
                self._body = await build()
                self._at = time.monotonic()
            return self._body


async def _chunks(body: bytes, size: int = 64 * 1024) -> AsyncIterator[bytes]:
    """``body`` in slices: each is sent only when the client has read the one before (uvicorn
    waits for the socket to drain), so that a client that does not read holds one slice, not
    a copy of the whole answer."""
    view = memoryview(body)
    for start in range(0, len(body), size):
        yield bytes(view[start : start + size])


def create_app(
    plane: ControlPlane,
    config: AppConfig | None = None,
    *,
    batcher: HeartbeatBatcher | None = None,
) -> Starlette:
    """The hbs ASGI app over ``plane``.

    Args:
        batcher: how heartbeats reach the plane (shared with a falcon JSON-RPC listener);
            by default one of its own.
    """
    cfg = config or AppConfig()
    # plane.answer is looked up at each call, so that a test or a benchmark may wrap it.
    beats = batcher or HeartbeatBatcher(lambda batch: plane.answer(batch))

    async def _off_loop(fn: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
        """Run ``fn(*args)`` on a worker thread, within the view deadline. Every store call
        of a view or a command runs there, so that the event loop goes on answering
        meanwhile, whatever the store does."""
        try:
            return await asyncio.wait_for(
                asyncio.to_thread(fn, *args, **kwargs), cfg.view_deadline_s
            )
        except asyncio.TimeoutError:
            raise _HttpError(
                503, f"the store did not answer within {cfg.view_deadline_s:g} s"
            ) from None

    health_pool = ThreadPoolExecutor(2, thread_name_prefix="hbs-health")

    async def read_json(request: Request) -> Any:
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > cfg.max_body_bytes):
            raise _HttpError(413, f"body larger than {cfg.max_body_bytes} bytes")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > cfg.max_body_bytes:
                raise _HttpError(413, f"body larger than {cfg.max_body_bytes} bytes")
        try:
            return loads_untrusted(bytes(body))
        except UntrustedJSONError as exc:
            raise _HttpError(400, f"body: {exc}", "body") from None

    scopes = cfg.scopes()

    allowed_hosts = frozenset(h.lower() for h in cfg.allowed_hosts)
    trusted_proxies = frozenset(cfg.trusted_proxies)

    def require_admin(request: Request) -> None:
        refusal = browser_refusal(request.headers, allowed_hosts)
        if refusal is not None:
            log.warning("refused %s %s: %s", request.method, request.url.path, refusal[1])
            raise _HttpError(*refusal)
        if cfg.loopback_admin_only:
            caller = _caller(request.scope, trusted_proxies)
            if caller is None or not _is_loopback(caller):
                raise _HttpError(403, "admin routes answer only local callers")
        if scopes:
            scope = bearer_scope(request.headers.get("authorization", ""), scopes)
            if scope is None:
                raise _HttpError(401, "a valid 'Authorization: Bearer <token>' is required")
            if scope != "write":
                raise _HttpError(403, "this token may read but not change anything")

    def require_read(request: Request) -> None:
        header = request.headers.get("authorization", "")
        if cfg.protect_reads and scopes and bearer_scope(header, scopes) is None:
            raise _HttpError(401, "a valid 'Authorization: Bearer <token>' is required")

    async def heartbeat(body: bytes, scope: Scope) -> bytes:
        try:
            data = loads_untrusted(body)
        except UntrustedJSONError as exc:
            raise _HttpError(400, f"body: {exc}", "body") from None
        try:
            beat = Heartbeat.from_wire(data)
        except ValueError as exc:
            raise _HttpError(400, str(exc), _field_of(str(exc))) from None
        expected = cfg.agent_token_for(beat.host)
        authorization = _header(scope, b"authorization").decode("latin-1")
        if expected is None or (expected and not token_matches(authorization, expected)):
            raise _HttpError(401, f"heartbeats of {beat.host} need their agent token")
        if not cfg.tokens_identify_hosts:
            # Behind a proxy that is not trusted, the source is the proxy: every host is then
            # one address to the new-name limit (security.md tells to list the proxy).
            beat = replace(beat, source=_caller(scope, trusted_proxies) or _peer(scope))
        reply = await beats.answer(beat)
        if reply.refused:
            raise _HttpError(403, reply.refused)
        return orders.encode(reply)

    async def noop(body: bytes, scope: Scope) -> bytes:
        try:
            loads_untrusted(body)
        except UntrustedJSONError as exc:
            raise _HttpError(400, f"body: {exc}", "body") from None
        return _NO_ORDER

    orders = _OrderBytes()
    fast = {HEARTBEAT_PATH: _FastPost(heartbeat, cfg.max_body_bytes)}
    if cfg.noop_route:
        fast[NOOP_PATH] = _FastPost(noop, cfg.max_body_bytes)

    async def upgrade(request: Request) -> Response:
        if request.method == "POST":
            require_admin(request)
            body = await read_json(request)
            try:
                task = await _off_loop(plane.commands.publish_seed, body)
            except FieldError as exc:
                raise _HttpError(400, str(exc), exc.field) from None
            return _success({**(task.seed_view() or {}), "task_id": task.id})
        if request.method == "DELETE":
            require_admin(request)
            cancelled = await _off_loop(plane.commands.cancel)
            return _success(
                f"upgrade {cancelled.id} cancelled" if cancelled else "no upgrade to cancel"
            )
        raise _HttpError(405, "only POST (publish) and DELETE (cancel) are allowed here")

    async def nowargs(request: Request) -> Response:
        require_read(request)
        active = await _off_loop(plane.views.active)
        view = active[0].seed_view() if active is not None else None
        return _success(view or seed_args(0, "", "", "", ""))

    shared = _SharedBody()

    async def agentversions(request: Request) -> Response:
        require_read(request)

        def encode() -> bytes:
            data = {"msg": "success", "data": plane.views.versions()}
            return json.dumps(data, separators=(",", ":")).encode()

        body = await shared.get(lambda: _off_loop(encode))
        return StreamingResponse(_chunks(body), media_type="application/json")

    async def agents(request: Request) -> Response:
        require_read(request)
        return _success(sorted(await _off_loop(plane.views.versions)))

    async def status(request: Request) -> Response:
        require_read(request)
        return JSONResponse(await _off_loop(plane.views.status))

    async def health(request: Request) -> Response:
        # On threads of its own, so that a stalled store, which may hold up the threads of
        # views and commands, cannot hold up the answer.
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(
                loop.run_in_executor(health_pool, plane.views.health), cfg.health_deadline_s
            )
        except asyncio.TimeoutError:
            return PlainTextResponse(
                f"store unreachable: no answer within {cfg.health_deadline_s:g} s",
                status_code=503,
            )
        except StoreError as exc:
            return PlainTextResponse(f"store unreachable: {exc}", status_code=503)
        return PlainTextResponse("ok")

    async def rollouts(request: Request) -> Response:
        if request.method == "GET":
            require_read(request)
            return JSONResponse({"rollouts": await _off_loop(plane.views.summaries)})
        require_admin(request)
        body = await read_json(request)

        def publish() -> Response:
            try:
                task = plane.commands.publish_rollout(body)
            except FieldError as exc:
                raise _HttpError(400, str(exc), exc.field) from None
            return JSONResponse(plane.views.detail(task.id), status_code=201)

        return await _off_loop(publish)

    async def rollout(request: Request) -> Response:
        require_read(request)

        def view() -> Response:
            detail = plane.views.detail(request.path_params["id"])
            if detail is None:
                raise _HttpError(404, f"no rollout {request.path_params['id']}", "id")
            return JSONResponse(detail)

        return await _off_loop(view)

    async def rollout_action(request: Request) -> Response:
        require_admin(request)
        task_id, action = request.path_params["id"], request.path_params["action"]
        body = await read_json(request) if int(request.headers.get("content-length") or 0) else {}
        if not isinstance(body, dict):
            raise _HttpError(400, "body must be a JSON object", "body")

        def act() -> Response:
            try:
                if action == "rollback":
                    release = None
                    if body.get("release") is not None:
                        release = release_from_json(body["release"], "release")
                    mark_bad = body.get("mark_bad", False)
                    if not isinstance(mark_bad, bool):
                        raise FieldError("mark_bad", "must be true or false")
                    task = plane.commands.rollback(task_id, mark_bad=mark_bad, release=release)
                    return JSONResponse(plane.views.detail(task.id), status_code=201)
                if action not in ("pause", "resume", "abort"):
                    raise _HttpError(404, f"unknown action {action!r}", "action")
                reason = body.get("reason", "")
                if not isinstance(reason, str) or len(reason) > 500:
                    raise FieldError("reason", "must be a string of at most 500 characters")
                if not plane.commands.control(task_id, action, reason):
                    detail = plane.views.detail(task_id) or {}
                    raise _HttpError(
                        409, f"cannot {action} a rollout that is {detail.get('status')}", "action"
                    )
            except NoSuchRollout as exc:
                raise _HttpError(404, str(exc), exc.field) from None
            except FieldError as exc:
                raise _HttpError(400, str(exc), exc.field) from None
            return JSONResponse(plane.views.detail(task_id))

        return await _off_loop(act)

    async def bad_versions(request: Request) -> Response:
        if request.method == "GET":
            require_read(request)
            return JSONResponse({"bad": await _off_loop(plane.views.bad_versions)})
        require_admin(request)
        body = await read_json(request)
        if not isinstance(body, dict):
            raise _HttpError(400, "body must be a JSON object", "body")
        version = body.get("version")
        if not isinstance(version, str):
            raise _HttpError(400, "must be a version string", "version")
        reason = body.get("reason", "marked bad by an operator")
        if not isinstance(reason, str) or len(reason) > 500:
            raise _HttpError(400, "must be a string of at most 500 characters", "reason")
        try:
            bad = await _off_loop(plane.commands.mark_bad, version, reason)
        except FieldError as exc:
            raise _HttpError(400, str(exc), exc.field) from None
        return JSONResponse({"bad": bad})

    async def rebind(request: Request) -> Response:
        require_admin(request)
        host = request.path_params["host"]
        if not await _off_loop(plane.commands.rebind, host):
            raise _HttpError(404, f"no host {host!r} has sent a heartbeat", "host")
        return _success(f"{host} unbound: its next heartbeat binds it to its address")

    async def openapi(request: Request) -> Response:
        require_read(request)
        return JSONResponse(OPENAPI)

    async def metrics(request: Request) -> Response:
        require_read(request)
        text = render_metrics(await _off_loop(plane.views.metrics))
        return Response(text, media_type=METRICS_CONTENT_TYPE)

    async def dashboard(request: Request) -> Response:
        return HTMLResponse(DASHBOARD_HTML)

    def guarded(handler: Any) -> Any:
        async def run(request: Request) -> Response:
            try:
                return await handler(request)  # type: ignore[no-any-return]
            except _HttpError as exc:
                return _error(exc.status, str(exc), exc.field)
            except StoreError as exc:
                return _error(503, f"the store failed: {exc}")

        return run

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async def ticker() -> None:
            while True:
                await asyncio.sleep(cfg.tick_s)
                try:
                    # In a thread: a large fleet's housekeeping does not hold up heartbeats.
                    await asyncio.to_thread(plane.tick)
                except Exception:
                    log.exception("housekeeping failed")

        task = asyncio.create_task(ticker())
        try:
            yield
        finally:
            task.cancel()
            await asyncio.to_thread(plane.fleet.flush)
            if batcher is None:
                beats.close()

    routes = [
        *(Route(path, endpoint, methods=["POST"]) for path, endpoint in fast.items()),
        Route(
            "/agent/upgrade",
            guarded(upgrade),
            methods=["GET", "POST", "DELETE", "PUT", "PATCH"],
        ),
        Route("/agent/upgrade/nowargs", guarded(nowargs), methods=["GET"]),
        Route("/agentversions", guarded(agentversions), methods=["GET"]),
        Route("/agents", guarded(agents), methods=["GET"]),
        Route("/selfupgrade/v1/status", guarded(status), methods=["GET"]),
        Route("/selfupgrade/v1/rollouts", guarded(rollouts), methods=["GET", "POST"]),
        Route("/selfupgrade/v1/rollouts/{id}", guarded(rollout), methods=["GET"]),
        Route("/selfupgrade/v1/rollouts/{id}/{action}", guarded(rollout_action), methods=["POST"]),
        Route("/selfupgrade/v1/versions/bad", guarded(bad_versions), methods=["GET", "POST"]),
        Route("/selfupgrade/v1/hosts/{host}/rebind", guarded(rebind), methods=["POST"]),
        Route("/selfupgrade/v1/openapi.json", guarded(openapi), methods=["GET"]),
        Route("/metrics", guarded(metrics), methods=["GET"]),
        Route("/", guarded(dashboard), methods=["GET"]),
        Route("/health", guarded(health), methods=["GET"]),
    ]
    return _HbsApp(fast, routes=routes, lifespan=lifespan)


_NO_ORDER = b'{"order":null}'


class _OrderBytes:
    """Encodes ``{"order": ...}`` for a reply, with ``"next_beat_s"`` when the plane paces
    check-ins; a rollout's order is encoded once (once per mirror rule of its plan)."""

    def __init__(self) -> None:
        self._task_id = ""
        self._bytes: dict[int | None, bytes] = {}

    def encode(self, reply: Reply) -> bytes:
        encoded = self._order(reply)
        if reply.next_beat_s is None:
            return encoded
        return b'%s,"next_beat_s":%.1f}' % (encoded[:-1], reply.next_beat_s)

    def _order(self, reply: Reply) -> bytes:
        task = reply.task
        if task is None:
            return _NO_ORDER
        if task.id != self._task_id:
            self._bytes = {}
            self._task_id = task.id
        encoded = self._bytes.get(reply.mirror_rule)
        if encoded is None:
            encoded = _json_bytes({"order": task.order(reply.mirror_rule).to_wire()})
            self._bytes[reply.mirror_rule] = encoded
        return encoded


def _json_bytes(body: object) -> bytes:
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


class _FastPost:
    """A JSON POST endpoint as a plain ASGI app: reads the body (capped), calls
    ``handle(body, authorization)`` and sends its bytes, or the JSON error it raised.

    Heartbeats are most of hbs's traffic; answering them without Starlette's request,
    response and middleware objects roughly halves the cost of each one.
    """

    def __init__(
        self, handle: Callable[[bytes, Scope], Awaitable[bytes]], max_body_bytes: int
    ) -> None:
        self.handle = handle
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        status = 200
        try:
            payload = await self.handle(await self._body(scope, receive), scope)
        except _HttpError as exc:
            status = exc.status
            error: dict[str, Any] = {"msg": "error", "error": str(exc)}
            if exc.field is not None:
                error["field"] = exc.field
            payload = _json_bytes(error)
        except _Disconnected:
            return
        except Exception:
            await _send(send, 500, _json_bytes({"msg": "error", "error": "internal error"}))
            raise
        await _send(send, status, payload)

    async def _body(self, scope: Scope, receive: Receive) -> bytes:
        cap = self.max_body_bytes
        length = _header(scope, b"content-length")
        if length and (not length.isdigit() or int(length) > cap):
            raise _HttpError(413, f"body larger than {cap} bytes")
        body = b""
        while True:
            message = await receive()
            if message["type"] != "http.request":
                raise _Disconnected
            chunk: bytes = message.get("body", b"")
            body += chunk
            if len(body) > cap:
                raise _HttpError(413, f"body larger than {cap} bytes")
            if not message.get("more_body", False):
                return body


class _Disconnected(Exception):
    pass


def _header(scope: Scope, name: bytes) -> bytes:
    for key, value in scope["headers"]:
        if key == name:
            return value  # type: ignore[no-any-return]
    return b""


async def _send(send: Send, status: int, payload: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


class _HbsApp(Starlette):
    """Starlette, with the hot POST routes (heartbeats) answered before its middleware and
    router; every other request, and lifespan, goes through Starlette."""

    def __init__(self, fast: Mapping[str, _FastPost], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._fast = fast

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            endpoint = self._fast.get(scope["path"])
            if endpoint is not None:
                await endpoint(scope, receive, send)
                return
        await super().__call__(scope, receive, send)


def _is_loopback(host: str) -> bool:
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def _field_of(message: str) -> str | None:
    head = message.split(" ", 1)[0]
    return head if head.startswith("heartbeat.") else None
