"""hbs: the control server of a fleet, the ``selfupgrade-hbs`` command.

Serves the falcon API on HTTP (default 127.0.0.1:6031) and the falcon agents' JSON-RPC
heartbeat on TCP (default 127.0.0.1:6030), with tasks and leases in an embedded SQLite file or
in Redis (several hbs processes then share them). ``pip install 'selfupgrade[server]'``, then
``selfupgrade-hbs --help`` (or ``python -m selfupgrade.server --help``). The built-in defaults
are ``hbs.json`` beside this module; ``-c cfg.json`` overrides any of its keys.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import errno
import gc
import json
import logging
import os
import signal
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn

from .. import __version__
from .app import AppConfig, create_app
from .artifacts import ArtifactCheck
from .batch import HeartbeatBatcher
from .context import PlaneConfig
from .falcon_rpc import serve_falcon_rpc
from .http_limits import BoundedHttpToolsProtocol
from .pacing import Pacing
from .plane import ControlPlane
from .stores import StoreError, open_store
from .tasks import TaskLimits

__all__ = ["DEFAULTS", "Config", "main", "parse_args", "serve"]

log = logging.getLogger("hbs")

DEFAULTS: dict[str, Any] = json.loads((Path(__file__).with_name("hbs.json")).read_text())
"""The built-in settings (``hbs.json``); a cfg.json given with ``-c`` overrides its keys."""

HELP = """\
configuration (cfg.json keys; a flag overrides its key):
  http.listen                  --http HOST:PORT     the HTTP API (falcon routes, heartbeats)
  rpc.listen, rpc.enabled      --rpc HOST:PORT|off  falcon agents' JSON-RPC heartbeat (TCP)
  store                        --store URL          sqlite:PATH (one hbs) or redis://HOST:PORT/DB
  agent_update_queue_length    --queue N            hosts upgrading at once (slots)
  lease_s                      --lease-s S          a slot is freed after S seconds without news
  restart_grace_s              --restart-grace-s S  a host may take S seconds to restart; with its
                                                    heartbeat interval, how soon a silent host fails
  probation_s                  --probation-s S      a host first heard from during a rollout
                                                    joins it only after S seconds
  max_attempts                 --max-attempts N     failed attempts before a host is given up on
  retry_backoff_s              --retry-backoff-s S  wait before a failed host is retried (doubles)
  failure_limit                --failure-limit N    failed attempts after which the task halts
  artifact_check               --no-artifact-check  fetch and check each artifact before a publish,
                                                    before each wave and periodically (default on)
  artifact_recheck_s           --artifact-recheck-s S  check an active rollout's artifacts every S s
  artifact_max_bytes, artifact_deadline_s           the check's size cap and time limit
  max_hosts                    --max-hosts N        hosts hbs keeps; new ones beyond are ignored
  new_hosts_per_source         --new-hosts-per-source N  new host names one address may bring
  new_hosts_window_s                                per window (0: no limit); a name is bound
                                                    to the address first heard from
  host_ttl_days                --host-ttl-days D    forget hosts silent for D days
  partition_share                                   a slot holder's lease that runs out while
                                                    this share of the slotless hosts went silent
                                                    too is renewed (a partition; 0: off)
  pace_rarely_s                --pace-rarely-s S    tell hosts in each reply when to beat next: in
                                                    S seconds when they have nothing to do soon
                                                    (0: off, hosts beat at their own interval)
  pace_idle_s                  --pace-idle-s S      ... and in S seconds while no rollout is
                                                    under way (a new one reaches them that soon)
  admin_token                  --admin-token-file F admin routes also need 'Bearer T' (also
                                                    $HBS_ADMIN_TOKEN, or --admin-token T)
  tokens                                            {"<token>": "read"|"write"} scoped tokens
  protect_reads                                     read routes need a read or write token
  agent_token                  --agent-token-file F heartbeats need 'Bearer T' (RPC: Token; also
                                                    $HBS_AGENT_TOKEN, or --agent-token T)
  agent_tokens                                      {"<host>": "<token>"} per-host tokens
  tls.cert, tls.key            --tls-cert/--tls-key serve HTTPS with this certificate and key
  loopback_admin_only                               admin routes answer only local callers
  allowed_hosts                                     names besides localhost by which admin routes
                                                    may be reached (the Host header; DNS rebinding)
  trusted_proxies                                   proxy addresses whose X-Forwarded-For/X-Real-IP
                                                    names the caller
  max_body_bytes                                    larger request bodies get 413
  log_level                    --log-level LEVEL    debug, info, warning, error

publish, watch, cancel (the article's own commands):
  curl -X POST http://127.0.0.1:6031/agent/upgrade -d '{"wgeturl":"http://files/agent","version":"6.0.1","binfile_md5":"..."}'
  curl http://127.0.0.1:6031/agentversions
  curl -X DELETE http://127.0.0.1:6031/agent/upgrade
"""


@dataclass(frozen=True)
class Config:
    """hbs settings, from cfg.json and flags."""

    http: tuple[str, int]
    rpc: tuple[str, int] | None
    store: str
    plane: PlaneConfig
    app: AppConfig
    log_level: str
    tls: tuple[Path, Path] | None = None


def _address(text: str, name: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise SystemExit(f"hbs: {name} must be HOST:PORT, got {text!r}")
    return host.strip("[]") or "0.0.0.0", int(port)  # noqa: S104 - only if the operator says so


def parse_args(argv: list[str] | None = None) -> Config:
    """Read cfg.json and the flags."""
    parser = argparse.ArgumentParser(
        prog="selfupgrade-hbs",
        description="hbs: publish upgrades to a fleet and admit hosts a few at a time.",
        epilog=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-c", "--config", type=Path, help="cfg.json (default: built-in defaults)")
    parser.add_argument("--version", action="version", version=f"selfupgrade-hbs {__version__}")
    parser.add_argument("--http")
    parser.add_argument("--rpc")
    parser.add_argument("--store")
    parser.add_argument("--queue", type=int)
    parser.add_argument("--lease-s", type=float)
    parser.add_argument("--max-attempts", type=int)
    parser.add_argument("--retry-backoff-s", type=float)
    parser.add_argument("--failure-limit", type=int)
    parser.add_argument("--restart-grace-s", type=float)
    parser.add_argument("--probation-s", type=float)
    parser.add_argument(
        "--no-artifact-check",
        action="store_true",
        help="publish without fetching the artifacts first (logged at each publish)",
    )
    parser.add_argument("--artifact-recheck-s", type=float)
    parser.add_argument("--max-hosts", type=int)
    parser.add_argument("--new-hosts-per-source", type=int)
    parser.add_argument("--host-ttl-days", type=float)
    parser.add_argument("--pace-rarely-s", type=float)
    parser.add_argument("--pace-idle-s", type=float)
    parser.add_argument(
        "--admin-token",
        help="a write-scope token for admin routes (visible to local users in ps; prefer "
        "--admin-token-file or $HBS_ADMIN_TOKEN)",
    )
    parser.add_argument("--admin-token-file", type=Path, help="read the admin token from a file")
    parser.add_argument(
        "--agent-token",
        help="a shared token agents must send (prefer --agent-token-file or $HBS_AGENT_TOKEN)",
    )
    parser.add_argument("--agent-token-file", type=Path, help="read the agent token from a file")
    parser.add_argument("--tls-cert", type=Path, help="serve HTTPS with this certificate (PEM)")
    parser.add_argument("--tls-key", type=Path, help="the certificate's private key (PEM)")
    parser.add_argument("--log-level")
    parser.add_argument(
        "--bench-noop",
        action="store_true",
        help="also serve POST /selfupgrade/v1/noop (a benchmark reference)",
    )
    args = parser.parse_args(argv)
    cfg = dict(DEFAULTS)
    if args.config:
        try:
            cfg.update(json.loads(args.config.read_text()))
        except (OSError, ValueError) as exc:
            raise SystemExit(f"hbs: cannot read {args.config}: {exc}") from None
    http = _address(args.http or cfg["http"]["listen"], "http.listen")
    rpc_text = args.rpc or (cfg["rpc"]["listen"] if cfg["rpc"].get("enabled", True) else "off")
    rpc = None if rpc_text == "off" else _address(rpc_text, "rpc.listen")

    def pick(flag: Any, key: str) -> Any:
        return flag if flag is not None else cfg[key]

    try:
        limits = TaskLimits(
            max_in_flight=pick(args.queue, "agent_update_queue_length"),
            lease_s=pick(args.lease_s, "lease_s"),
            max_attempts=pick(args.max_attempts, "max_attempts"),
            retry_backoff_s=pick(args.retry_backoff_s, "retry_backoff_s"),
            failure_limit=pick(args.failure_limit, "failure_limit"),
            restart_grace_s=pick(args.restart_grace_s, "restart_grace_s"),
            probation_s=pick(args.probation_s, "probation_s"),
        )
        if not isinstance(cfg["artifact_check"], bool):
            raise ValueError(
                f"artifact_check: must be true or false, got {cfg['artifact_check']!r}"
            )
        check = (
            None
            if args.no_artifact_check or not cfg["artifact_check"]
            else ArtifactCheck(
                max_bytes=int(cfg["artifact_max_bytes"]),
                deadline_s=float(cfg["artifact_deadline_s"]),
            )
        )
        plane = PlaneConfig(
            limits=limits,
            artifact_check=check,
            artifact_recheck_s=float(pick(args.artifact_recheck_s, "artifact_recheck_s")),
            max_hosts=int(pick(args.max_hosts, "max_hosts")),
            new_hosts_per_source=int(pick(args.new_hosts_per_source, "new_hosts_per_source")),
            new_hosts_window_s=float(cfg["new_hosts_window_s"]),
            host_ttl_s=float(pick(args.host_ttl_days, "host_ttl_days")) * 86400,
            partition_share=float(cfg["partition_share"]),
            pacing=_pacing(
                float(pick(args.pace_rarely_s, "pace_rarely_s")),
                float(pick(args.pace_idle_s, "pace_idle_s")),
            ),
        )
    except (ValueError, TypeError) as exc:
        raise SystemExit(f"hbs: invalid setting {exc}") from None
    return Config(
        http=http,
        rpc=rpc,
        store=pick(args.store, "store"),
        plane=plane,
        app=AppConfig(
            admin_token=_secret(args, "admin_token", cfg),
            tokens=dict(cfg.get("tokens") or {}),
            protect_reads=bool(cfg.get("protect_reads", False)),
            loopback_admin_only=bool(cfg["loopback_admin_only"]),
            allowed_hosts=frozenset(str(h).lower() for h in cfg.get("allowed_hosts") or ()),
            trusted_proxies=frozenset(str(a) for a in cfg.get("trusted_proxies") or ()),
            agent_token=_secret(args, "agent_token", cfg),
            agent_tokens=dict(cfg.get("agent_tokens") or {}),
            max_body_bytes=int(cfg["max_body_bytes"]),
            noop_route=args.bench_noop,
        ),
        log_level=pick(args.log_level, "log_level"),
        tls=_tls(args, cfg),
    )


def _pacing(rarely_s: float, idle_s: float) -> Pacing | None:
    if rarely_s == 0:
        return None
    try:
        return Pacing(rarely_s=rarely_s, idle_s=idle_s)
    except ValueError as exc:
        raise ValueError(
            f"pace_rarely_s, pace_idle_s: {exc} (pace_rarely_s 0: no pacing)"
        ) from None


def _secret(args: argparse.Namespace, key: str, cfg: dict[str, Any]) -> str:
    """A token from, in order: ``--<key>-file``, ``$HBS_<KEY>``, ``--<key>`` (with a warning:
    a command line is readable by every local user), cfg.json."""
    path = getattr(args, f"{key}_file")
    if path is not None:
        try:
            return str(path.read_text().strip())
        except OSError as exc:
            raise SystemExit(f"hbs: cannot read --{key.replace('_', '-')}-file: {exc}") from None
    from_env = os.environ.get(f"HBS_{key.upper()}")
    if from_env:
        return from_env
    flag = getattr(args, key)
    if flag:
        print(
            f"hbs: warning: --{key.replace('_', '-')} is readable by every local user in "
            f"/proc/<pid>/cmdline; use --{key.replace('_', '-')}-file or $HBS_{key.upper()}",
            file=sys.stderr,
        )
        return str(flag)
    return str(cfg.get(key, "") or "")


def _tls(args: argparse.Namespace, cfg: dict[str, Any]) -> tuple[Path, Path] | None:
    tls = cfg.get("tls") or {}
    cert = args.tls_cert or (Path(tls["cert"]) if tls.get("cert") else None)
    key = args.tls_key or (Path(tls["key"]) if tls.get("key") else None)
    if (cert is None) != (key is None):
        raise SystemExit("hbs: TLS needs both a certificate and its key")
    return (cert, key) if cert is not None and key is not None else None


async def serve(cfg: Config) -> None:
    """Run the HTTP API and the RPC listener until SIGINT/SIGTERM."""
    try:
        store = open_store(cfg.store)
    except (ValueError, StoreError) as exc:
        raise SystemExit(f"hbs: {exc}") from None
    plane = ControlPlane(store, cfg.plane)
    if cfg.plane.artifact_check is None:
        log.warning("the artifact check is off: publishes are not fetched and checked first")
    # What was loaded (the fleet view: a few objects per host) lives as long as the process;
    # frozen, it is left out of the collector's full scans, which would otherwise stop every
    # request for about 0.1 s per 600,000 hosts.
    gc.collect()
    gc.freeze()
    # A heartbeat leaves almost nothing behind, but a publish of 600,000 members allocates
    # millions of objects at once: with the default thresholds, the full collections that
    # follow (each scanning everything not frozen) stopped every request for 50-200 ms
    # (measured with bench/hbs_heartbeat.py). Fewer, later collections.
    gc.set_threshold(100_000, 50, 100)
    needs_token = bool(cfg.app.agent_token or cfg.app.agent_tokens)
    # One batcher for both ports: heartbeats from HTTP and JSON-RPC agents share batches.
    beats = HeartbeatBatcher(plane.answer)
    http_socket = _listen(cfg.http, "--http")
    try:
        rpc = (
            await serve_falcon_rpc(
                plane,
                *cfg.rpc,
                token_for=cfg.app.agent_token_for if needs_token else None,
                tokens_identify_hosts=cfg.app.tokens_identify_hosts,
                batcher=beats,
            )
            if cfg.rpc
            else None
        )
    except OSError as exc:
        http_socket.close()
        store.close()
        raise SystemExit(_cannot_listen(cfg.rpc, "--rpc", exc)) from None
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(plane, cfg.app, batcher=beats),
            host=cfg.http[0],
            port=cfg.http[1],
            http=BoundedHttpToolsProtocol,
            lifespan="on",
            access_log=False,
            log_level="warning",
            timeout_keep_alive=30,
            backlog=4096,
            ssl_certfile=str(cfg.tls[0]) if cfg.tls else None,
            ssl_keyfile=str(cfg.tls[1]) if cfg.tls else None,
        )
    )
    limits, plane_cfg = cfg.plane.limits, cfg.plane
    log.info(
        "hbs on %s://%s:%d%s, store %s",
        "https" if cfg.tls else "http",
        *cfg.http,
        f", rpc {cfg.rpc[0]}:{cfg.rpc[1]}" if cfg.rpc else "",
        cfg.store,
    )
    log.info(
        "settings (docs/operators-guide.md says why): %d slots, lease %gs, %d attempts a "
        "host, retry after %gs, halt after %d failed attempts, restart grace %gs, probation "
        "%gs, artifact check %s, %d new names per address per %gs, at most %d hosts, %s",
        limits.max_in_flight,
        limits.lease_s,
        limits.max_attempts,
        limits.retry_backoff_s,
        limits.failure_limit,
        limits.restart_grace_s,
        limits.probation_s,
        "on" if plane_cfg.artifact_check is not None else "OFF",
        plane_cfg.new_hosts_per_source,
        plane_cfg.new_hosts_window_s,
        plane_cfg.max_hosts,
        "check-ins at the hosts' own pace"
        if plane_cfg.pacing is None
        else f"check-ins paced (rarely {plane_cfg.pacing.rarely_s:g}s, "
        f"idle {plane_cfg.pacing.idle_s:g}s)",
    )
    try:
        await server.serve(sockets=[http_socket])
    finally:
        if rpc is not None:
            rpc.close()
            await rpc.wait_closed()
        beats.close()
        plane.fleet.flush()
        store.close()
        log.info("hbs stopped")


def _listen(address: tuple[str, int], flag: str) -> socket.socket:
    """A listening TCP socket on ``address``; a one-line exit naming the fix when it is
    taken or not allowed."""
    host, port = address
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(4096)
    except OSError as exc:
        raise SystemExit(_cannot_listen(address, flag, exc)) from None
    return sock


def _cannot_listen(address: tuple[str, int] | None, flag: str, exc: OSError) -> str:
    where = f"{address[0]}:{address[1]}" if address else "?"
    fix = (
        "another process (an hbs already running?) listens there; stop it or choose another "
        f"port with {flag}"
        if exc.errno == errno.EADDRINUSE
        else f"choose another address with {flag}"
    )
    return f"hbs: cannot listen on {where}: {exc.strerror or exc}; {fix}"


def _stop_on_sigterm() -> None:
    """Make SIGTERM end hbs through its own shutdown (close the listener, flush, close the
    store). uvicorn shuts down gracefully on SIGTERM, then raises the signal again under the
    handler it found; with the default one the process dies there, before ``serve``'s
    ``finally``. This one turns it into ``SystemExit``, which runs it."""

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)


def _few_malloc_arenas(arenas: int = 1) -> None:
    """Let glibc's malloc keep at most ``arenas`` arena(s) (unless ``MALLOC_ARENA_MAX`` says
    otherwise). hbs builds its large answers (``/agentversions`` of a whole fleet) on worker
    threads, and glibc gives threads arenas of their own, up to eight per core: an answer's
    memory, freed on one thread, is not reused by the next build on another. With one arena,
    40 readers that never read the answer of 200,000 hosts grew hbs by 5-10 MB; with glibc's
    default, by 14-45 MB (tests/test_connection_flood.py). Python's lock already serialises
    most allocations, so one arena costs little. Nothing is done off glibc."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    m_arena_max = -8  # glibc's malloc.h
    mallopt(m_arena_max, arenas)


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    _few_malloc_arenas()  # before any thread starts
    cfg = parse_args(argv)
    logging.basicConfig(
        level=cfg.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s hbs %(levelname)s %(name)s: %(message)s",
    )
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        log.warning("uvloop is not installed; using the default event loop (slower)")
    _stop_on_sigterm()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(cfg))
    return 0
