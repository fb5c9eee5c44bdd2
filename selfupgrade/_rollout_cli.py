"""``selfupgrade rollout ...``: start, watch and steer staged rollouts on hbs over its HTTP API.

``watch`` redraws a progress bar per wave, the counts by state, the failures with their
reasons and an ETA, and exits 0 when the rollout completes, 2 when it halts, 3 when it is
aborted or replaced, 1 when hbs cannot be reached.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import httpx

__all__ = ["add_parser", "render", "run"]

EXIT = {"complete": 0, "halted": 2, "aborted": 3, "cancelled": 3}


class CliError(Exception):
    """A message for the user; exit status 1."""


def add_parser(sub: Any) -> None:
    """Add ``rollout`` and its subcommands to the ``selfupgrade`` parser."""
    p = sub.add_parser("rollout", help="start, watch and steer staged rollouts on hbs")
    p.add_argument(
        "--server",
        default=os.environ.get("SELFUPGRADE_SERVER", "http://127.0.0.1:6031"),
        help="hbs's base URL (default $SELFUPGRADE_SERVER or http://127.0.0.1:6031)",
    )
    p.add_argument(
        "--token",
        default=os.environ.get("SELFUPGRADE_TOKEN", ""),
        help="bearer token for admin routes (default $SELFUPGRADE_TOKEN)",
    )
    p.add_argument("--timeout-s", type=float, default=10.0, help="per request")
    rs = p.add_subparsers(dest="rollout_command", required=True)

    start = rs.add_parser("start", help="start a rollout")
    start.add_argument("--plan", type=Path, required=True, help="the plan, a JSON file")
    start.add_argument(
        "--release",
        type=Path,
        help='a JSON file {"version": ..., "artifacts": {"bin": {"url", "digest"}}}',
    )
    start.add_argument("--version", help="with --artifact: the version")
    start.add_argument(
        "--artifact",
        action="append",
        default=[],
        metavar="ROLE=URL@DIGEST",
        help="bin=https://files/bin_6.0.1@sha256:<hex> (repeatable)",
    )
    start.add_argument("--wgeturl", help="the falcon layout: <wgeturl>/bin_<version>")
    start.add_argument("--binfile-md5")
    start.add_argument("--cfgfile-md5")
    start.add_argument("--allow-downgrade", action="store_true")
    start.add_argument("--watch", action="store_true", help="then watch it")

    for name, text in (("status", "show a rollout once"), ("watch", "follow a rollout live")):
        c = rs.add_parser(name, help=text)
        c.add_argument("id", nargs="?", help="the rollout (default: the newest)")
        c.add_argument("--json", action="store_true", help="print the raw JSON")
        if name == "watch":
            c.add_argument("--interval-s", type=float, default=1.0)
    for name in ("pause", "resume", "abort"):
        c = rs.add_parser(name, help=f"{name} a rollout")
        c.add_argument("id")
        c.add_argument("--reason", default="")
    rb = rs.add_parser("rollback", help="take every upgraded host back to the previous version")
    rb.add_argument("id")
    rb.add_argument("--mark-bad", action="store_true", help="also mark the version bad")
    rb.add_argument("--release", type=Path, help="the previous release, for hosts without backup")


class _Client:
    def __init__(self, server: str, token: str, timeout_s: float) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(
            base_url=server.rstrip("/"), headers=headers, timeout=timeout_s, trust_env=False
        )

    def call(self, method: str, path: str, body: Any = None) -> Any:
        try:
            resp = self.http.request(
                method, path, content=json.dumps(body) if body is not None else None
            )
        except httpx.HTTPError as exc:
            raise CliError(f"cannot reach hbs at {self.http.base_url}: {exc}") from None
        try:
            data = resp.json()
        except ValueError:
            raise CliError(
                f"{method} {path} answered {resp.status_code}: {resp.text[:200]}"
            ) from None
        if resp.status_code >= 400:
            field = (
                f" ({data.get('field')})" if isinstance(data, dict) and data.get("field") else ""
            )
            error = data.get("error") if isinstance(data, dict) else data
            raise CliError(f"{method} {path} answered {resp.status_code}{field}: {error}")
        return data

    def newest(self) -> str:
        rollouts = self.call("GET", "/selfupgrade/v1/rollouts")["rollouts"]
        if not rollouts:
            raise CliError("hbs has no rollout yet")
        return str(rollouts[0]["id"])


def _load(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CliError(f"cannot read {path}: {exc}") from None


def _start_body(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {"plan": _load(args.plan), "allow_downgrade": args.allow_downgrade}
    if args.release:
        body["release"] = _load(args.release)
    elif args.artifact:
        if not args.version:
            raise CliError("--artifact needs --version")
        artifacts = {}
        for spec in args.artifact:
            role, sep, rest = spec.partition("=")
            url, at, digest = rest.rpartition("@")
            if not sep or not at:
                raise CliError(f"--artifact {spec!r} must look like bin=URL@sha256:<hex>")
            artifacts[role] = {"url": url, "digest": digest}
        body["release"] = {"version": args.version, "artifacts": artifacts}
    elif args.wgeturl:
        body.update(
            wgeturl=args.wgeturl,
            version=args.version,
            type=2 if args.binfile_md5 and args.cfgfile_md5 else 1 if args.cfgfile_md5 else 0,
        )
        if args.binfile_md5:
            body["binfile_md5"] = args.binfile_md5
        if args.cfgfile_md5:
            body["cfgfile_md5"] = args.cfgfile_md5
    else:
        raise CliError("give --release, or --version with --artifact, or --wgeturl with md5s")
    return body


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    s = round(seconds)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def _bar(done: int, failed: int, total: int, width: int = 30) -> str:
    if total <= 0:
        return "[" + " " * width + "]"
    d = width * done // total
    f = min(width - d, width * failed // total)
    return "[" + "#" * d + "x" * f + "." * (width - d - f) + "]"


def render(d: dict[str, Any]) -> str:
    """A rollout's detail as text: a line per wave, then the failures."""
    task = d["task"]
    kind = "rollback" if task.get("kind") == "rollback" else "rollout"
    lines = [
        f"{kind} {task['id']} -> {task['order']['version']}  {d['status'].upper()}  "
        f"wave {min(d['wave'] + 1, len(d['waves']))}/{len(d['waves'])}  "
        f"confirmed {d['done']}/{d['members']}  in flight {d['in_flight']}  "
        f"ETA {_duration(d['eta_s'])}"
        + ("" if d.get("window_open", True) else "  (maintenance window closed)")
    ]
    if d.get("halt_reason"):
        lines.append(
            f"  halted: {d['halt_reason']}" if d["status"] == "halted" else f"  {d['halt_reason']}"
        )
    for w in d["waves"]:
        # hbs sends every state of a wave, in display order
        counts = "  ".join(f"{s} {n}" for s, n in w["states"].items() if n)
        bake = f" ({_duration(w['bake_left_s'])} left)" if w.get("bake_left_s") is not None else ""
        lines.append(
            f"  wave {w['index'] + 1} {w['name']:<10} {_bar(w['done'], w['failed'], w['members'])} "
            f"{w['done']:>3}/{w['members']:<3} {w['phase']}{bake}  failures {w['failures']}/"
            f"{w['budget']}"
        )
        if counts:
            lines.append(f"      {counts}")
    if d["failures_list"]:
        lines.append("  failures:")
        for f in d["failures_list"][:20]:
            lines.append(
                f"    {f['host']} (wave {f['wave'] + 1}, attempt {f['attempts']}"
                f"{', gave up' if f['gave_up'] else ''}): {f['reason']}"
            )
    return "\n".join(lines)


def _watch(client: _Client, rollout_id: str, interval_s: float, out: TextIO) -> int:
    tty = out.isatty()
    last = ""
    misses = 0
    while True:
        try:
            d = client.call("GET", f"/selfupgrade/v1/rollouts/{rollout_id}")
            misses = 0
        except CliError as exc:
            misses += 1
            if misses >= 5:
                raise
            print(f"(retrying: {exc})", file=sys.stderr)
            time.sleep(interval_s)
            continue
        text = render(d)
        if tty:
            out.write("\x1b[H\x1b[J" + text + "\n")
            out.flush()
        elif text != last:
            stamp = time.strftime("%H:%M:%S")
            out.write(f"--- {stamp}\n{text}\n")
            out.flush()
        last = text
        if d["status"] in EXIT:
            return EXIT[d["status"]]
        time.sleep(interval_s)


def run(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    """Carry out ``selfupgrade rollout ...``; return the exit status."""
    client = _Client(args.server, args.token, args.timeout_s)
    try:
        cmd = args.rollout_command
        if cmd == "start":
            d = client.call("POST", "/selfupgrade/v1/rollouts", _start_body(args))
            print(render(d), file=out)
            if args.watch:
                return _watch(client, d["task"]["id"], 1.0, out)
            return 0
        rollout_id = getattr(args, "id", None) or client.newest()
        if cmd in ("status", "watch") and args.json:
            print(
                json.dumps(client.call("GET", f"/selfupgrade/v1/rollouts/{rollout_id}"), indent=2),
                file=out,
            )
            return 0
        if cmd == "status":
            print(render(client.call("GET", f"/selfupgrade/v1/rollouts/{rollout_id}")), file=out)
            return 0
        if cmd == "watch":
            return _watch(client, rollout_id, args.interval_s, out)
        if cmd == "rollback":
            body: dict[str, Any] = {"mark_bad": args.mark_bad}
            if args.release:
                body["release"] = _load(args.release)
            d = client.call("POST", f"/selfupgrade/v1/rollouts/{rollout_id}/rollback", body)
            print(render(d), file=out)
            return 0
        d = client.call(
            "POST", f"/selfupgrade/v1/rollouts/{rollout_id}/{cmd}", {"reason": args.reason}
        )
        print(render(d), file=out)
        return 0
    except CliError as exc:
        print(f"selfupgrade rollout: {exc}", file=sys.stderr)
        return 1
    finally:
        client.http.close()
