"""The shared store: Redis, so that several hbs processes share rollouts, leases and limits.

Needs ``selfupgrade[redis]`` (redis-py). A commit is carried out by one small Lua script that
knows no rollout rule: it compares (the rollout's status, fields and counters, each host's
revision, the number of live leases against the slot limit) and, when everything matches,
writes. Redis runs a script atomically, so no number of hbs processes can overshoot a limit.
The commits of a heartbeat batch go in one pipeline, and so do its reads: in steady state a
batch of heartbeats costs one round trip to read and, when something changed, one to commit.

Keys (one hash tag, so a Redis Cluster keeps them on one shard)::

    {prefix}:active              the active rollout's id
    {prefix}:tasks               list of rollout ids, newest first
    {prefix}:task:<id>           the rollout's task, JSON
    {prefix}:task:<id>:meta      hash: status, halt_reason, wave, wave_done_at, c:<counter>
    {prefix}:task:<id>:leases    sorted set: host -> lease deadline
    {prefix}:task:<id>:progress  hash: host -> "<rev>|<progress JSON>"
    {prefix}:task:<id>:members   hash: host -> wave
    {prefix}:hosts               hash: host -> last heartbeat, JSON
    {prefix}:bad                 hash: version -> why it was marked bad
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

try:
    import redis
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "selfupgrade.server.stores.redis needs the 'redis' extra: pip install 'selfupgrade[redis]'"
    ) from exc

from ..effects import Commit, Outcome
from ..tasks import NO_ROLLOUT, HostProgress, HostRead, HostSeen, RolloutState, Status, Task
from .base import StoreError

__all__ = ["RedisStore"]

log = logging.getLogger("selfupgrade.server")

_COMMIT = """
local c = cjson.decode(ARGV[1])
local meta, progress, members, active = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
if redis.call('EXISTS', meta) == 0 then return 'stale' end
if c.statuses then
  local s, ok = redis.call('HGET', meta, 'status'), false
  for _, v in ipairs(c.statuses) do if v == s then ok = true end end
  if not ok then return 'stale' end
end
for k, v in pairs(c.fields) do
  if (redis.call('HGET', meta, k) or '') ~= v then return 'stale' end
end
for k, v in pairs(c.counters) do
  if tonumber(redis.call('HGET', meta, 'c:' .. k) or '0') ~= v then return 'stale' end
end
for h, _ in pairs(c.join) do
  if redis.call('HEXISTS', members, h) == 1 then return 'stale' end
end
for _, w in ipairs(c.writes) do
  local cur, rev = redis.call('HGET', progress, w.host), 0
  if cur then rev = tonumber(string.match(cur, '^(%d+)|')) end
  if rev ~= w.rev then return 'stale' end
end
if c.takes > 0 then
  local live = redis.call('ZCARD', KEYS[5])
  for i = 6, #KEYS do
    live = live + redis.call('ZCOUNT', KEYS[i], '(' .. c.now, '+inf')
    if c.release then
      for _, w in ipairs(c.writes) do
        local s = redis.call('ZSCORE', KEYS[i], w.host)
        if s and tonumber(s) > tonumber(c.now) then live = live - 1 end
      end
    end
  end
  if live + c.takes > c.limit then return 'full' end
  local last = #KEYS
  if c.release then last = 5 end
  for _, w in ipairs(c.writes) do
    if w.take then
      for i = 5, last do
        local s = redis.call('ZSCORE', KEYS[i], w.host)
        if s and tonumber(s) > tonumber(c.now) then return 'full' end
      end
    end
  end
end
if c.release then
  for i = 6, #KEYS do
    for _, w in ipairs(c.writes) do redis.call('ZREM', KEYS[i], w.host) end
  end
end
for _, w in ipairs(c.writes) do
  redis.call('HSET', progress, w.host, (w.rev + 1) .. '|' .. w.body)
  if w.lease ~= '' then redis.call('ZADD', KEYS[5], w.lease, w.host)
  else redis.call('ZREM', KEYS[5], w.host) end
end
for k, v in pairs(c.add) do redis.call('HINCRBY', meta, 'c:' .. k, v) end
for k, v in pairs(c.set) do redis.call('HSET', meta, k, v) end
for h, wave in pairs(c.join) do redis.call('HSET', members, h, wave) end
if c.deactivate and redis.call('GET', active) == c.id then redis.call('DEL', active) end
return 'ok'
"""


_compact = json.JSONEncoder(separators=(",", ":")).encode
"""JSON without spaces, by one encoder (``json.dumps`` with arguments makes one a call)."""


def _text(value: object) -> str:
    """A rollout field as the script compares and stores it."""
    if value is None:
        return ""
    if isinstance(value, Status):
        return value.value
    if isinstance(value, float):
        return repr(value)
    return str(value)


class RedisStore:
    """Rollouts, leases and the fleet view in Redis, shared by every hbs using the same URL.

    Args:
        url: ``redis://host:port/db`` (``rediss://`` for TLS).
        prefix: the key prefix (the hash tag).
        timeout_s: connect and read timeout of every command: a Redis that stops answering
            makes a call raise :class:`StoreError` after this long.

    Raises:
        StoreError: Redis cannot be reached.
    """

    def __init__(self, url: str, *, prefix: str = "selfupgrade", timeout_s: float = 2.0) -> None:
        self._p = "{" + prefix + "}"
        try:
            self._r = redis.Redis.from_url(
                url,
                socket_timeout=timeout_s,
                socket_connect_timeout=timeout_s,
                health_check_interval=30,
                decode_responses=True,
            )
            self._r.ping()
            self._sha = self._r.script_load(_COMMIT)
        except redis.RedisError as exc:
            raise StoreError(f"cannot reach Redis at {url}: {exc}") from exc
        self._url = url
        self._tasks: dict[str, Task] = {}
        self._count_lock = threading.Lock()
        self.round_trips = 0
        self._warn_without_persistence()

    def _warn_without_persistence(self) -> None:
        """Say at start when this Redis keeps nothing on disk: restarted, it would come back
        empty, and every rollout with it."""
        try:
            save = self._r.config_get("save").get("save", "")
            aof = self._r.config_get("appendonly").get("appendonly", "no")
        except redis.RedisError as exc:  # CONFIG may be disabled on a managed Redis
            log.info("could not ask Redis at %s how it persists: %s", self._url, exc)
            return
        if not save and aof != "yes":
            log.warning(
                "Redis at %s keeps nothing on disk (no RDB snapshots, no AOF): if it restarts, "
                "every rollout and lease is gone; set 'appendonly yes' or a 'save' schedule",
                self._url,
            )

    def _keys(self, task_id: str) -> tuple[str, str, str, str]:
        base = f"{self._p}:task:{task_id}"
        return f"{base}:meta", f"{base}:leases", f"{base}:progress", f"{base}:members"

    def _run(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """One round trip (a command or a pipeline's execute), counted, errors mapped."""
        with self._count_lock:
            self.round_trips += 1
        try:
            return fn(*args, **kwargs)
        except redis.RedisError as exc:
            raise StoreError(f"Redis at {self._url} failed: {exc}") from exc

    # ---- rollouts ------------------------------------------------------------------------

    def publish(self, task: Task, members: Mapping[str, int], counters: Mapping[str, int]) -> None:
        """Store a new active rollout: members first (not in MULTI: Redis serves others
        meanwhile, and nothing reads a rollout before it is published), then the rest."""
        meta, leases, progress, members_key = self._keys(task.id)
        pipe = self._r.pipeline(transaction=False)
        pipe.delete(meta, leases, progress, members_key)
        items = list(members.items())
        for i in range(0, len(items), 1000):
            pipe.hset(members_key, mapping=dict(items[i : i + 1000]))
        self._run(pipe.execute)
        pipe = self._r.pipeline(transaction=True)
        pipe.set(f"{self._p}:task:{task.id}", json.dumps(task.to_json()))
        mapping: dict[str | bytes, str | int] = {f"c:{k}": v for k, v in counters.items()}
        mapping.update(status=Status.ACTIVE.value, halt_reason="", wave=0, wave_done_at="")
        pipe.hset(meta, mapping=mapping)  # type: ignore[arg-type]
        pipe.lpush(f"{self._p}:tasks", task.id)
        pipe.set(f"{self._p}:active", task.id)
        self._run(pipe.execute)
        self._tasks[task.id] = task

    def active_id(self) -> str | None:
        """The active rollout's id."""
        value = self._run(self._r.get, f"{self._p}:active")
        return str(value) if value else None

    def task(self, task_id: str) -> Task | None:
        """A stored task (cached: a task never changes once published)."""
        task = self._tasks.get(task_id)
        if task is not None:
            return task
        body = self._run(self._r.get, f"{self._p}:task:{task_id}")
        if body is None:
            return None
        task = self._tasks[task_id] = Task.from_json(json.loads(body))
        return task

    def tasks(self) -> list[Task]:
        """Every task, newest first."""
        ids = self._run(self._r.lrange, f"{self._p}:tasks", 0, 199)
        found = [self.task(i) for i in dict.fromkeys(ids)]
        return [t for t in found if t is not None]

    def rollout(self, task_id: str, now: float) -> RolloutState:
        """The rollout's state, in one round trip."""
        meta_key, leases_key, _, _ = self._keys(task_id)
        pipe = self._r.pipeline(transaction=False)
        pipe.hgetall(meta_key)
        pipe.zcount(leases_key, f"({now!r}", "+inf")
        meta, live = self._run(pipe.execute)
        if not meta:
            return NO_ROLLOUT
        done_at = meta.get("wave_done_at", "")
        return RolloutState(
            status=Status(meta.get("status", "cancelled")),
            halt_reason=meta.get("halt_reason", ""),
            wave=int(meta.get("wave", 0)),
            wave_done_at=float(done_at) if done_at else None,
            counters={k[2:]: int(v) for k, v in meta.items() if k.startswith("c:")},
            in_flight=int(live),
        )

    def members(self, task_id: str) -> dict[str, int]:
        """Every member and its wave."""
        raw = self._run(self._r.hgetall, self._keys(task_id)[3])
        return {h: int(w) for h, w in raw.items()}

    # ---- hosts in a rollout --------------------------------------------------------------

    def read(self, task_id: str, hosts: Sequence[str]) -> list[HostRead]:
        """Progress and wave of each host, in one round trip."""
        if not hosts:
            return []
        _, _, progress_key, members_key = self._keys(task_id)
        pipe = self._r.pipeline(transaction=False)
        pipe.hmget(progress_key, list(hosts))
        pipe.hmget(members_key, list(hosts))
        raws, waves = self._run(pipe.execute)
        return [
            HostRead(h, _progress(raw) if raw else None, int(w) if w is not None else None)
            for h, raw, w in zip(hosts, raws, waves, strict=True)
        ]

    def all_progress(self, task_id: str) -> list[HostProgress]:
        """Every progress record."""
        raw = self._run(self._r.hgetall, self._keys(task_id)[2])
        return [_progress(v) for v in raw.values()]

    def due(self, task_id: str, now: float, limit: int = 1000) -> list[str]:
        """Hosts whose lease ran out."""
        leases = self._keys(task_id)[1]
        return list(self._run(self._r.zrangebyscore, leases, "-inf", repr(now), start=0, num=limit))

    def commit(self, commits: Sequence[Commit]) -> list[Outcome]:
        """Run the compare-and-commit script for each commit, in one pipeline."""
        if not commits:
            return []
        calls = [self._script_args(c) for c in commits]
        for _ in range(2):
            pipe = self._r.pipeline(transaction=False)
            for keys, arg in calls:
                pipe.evalsha(self._sha, len(keys), *keys, arg)
            results = self._run(pipe.execute, raise_on_error=False)
            if any(isinstance(r, redis.exceptions.NoScriptError) for r in results):
                # Redis restarted, or its scripts were flushed: load it, then try again
                # (a commit that failed that way was not carried out).
                self._sha = self._run(self._r.script_load, _COMMIT)
                continue
            break
        out = []
        for r in results:
            if isinstance(r, Exception):
                raise StoreError(f"Redis at {self._url} failed: {r}")
            out.append(Outcome(r))
        return out

    def _script_args(self, c: Commit) -> tuple[list[str], str]:
        meta, leases, progress, members = self._keys(c.task_id)
        # with release_others, every pool but this one is released (effects.Commit.others)
        pools = [self._keys(p)[1] for p in c.pools if p != c.task_id]
        keys = [meta, progress, members, f"{self._p}:active", leases, *pools]
        g = c.guard
        spec = {
            "id": c.task_id,
            "now": repr(c.now),
            "statuses": [s.value for s in g.statuses] if g.statuses is not None else None,
            "fields": {k: _text(v) for k, v in g.fields.items()},
            "counters": dict(g.counters),
            "join": dict(c.join),
            "writes": [
                {
                    "host": w.host,
                    "rev": w.expect_rev,
                    "body": _compact(w.progress.to_json()),
                    "lease": repr(w.lease_until) if w.lease_until is not None else "",
                    "take": w.takes_slot,
                }
                for w in c.writes
            ],
            "takes": c.takes,
            "limit": c.slot_limit,
            "release": bool(c.others),
            "add": dict(c.add),
            "set": {k: _text(v) for k, v in c.set.items()},
            "deactivate": c.deactivate,
        }
        if spec["statuses"] is None:
            del spec["statuses"]
        return keys, _compact(spec)

    # ---- the fleet view and bad versions -------------------------------------------------

    def save_hosts(self, seen: Iterable[HostSeen]) -> None:
        """Record the latest heartbeats in one command."""
        mapping = {s.host: _compact(s.to_json()) for s in seen}
        if mapping:
            self._run(self._r.hset, f"{self._p}:hosts", mapping=mapping)

    def hosts(self) -> dict[str, HostSeen]:
        """The latest heartbeat of every host, from every replica."""
        raw = self._run(self._r.hgetall, f"{self._p}:hosts")
        return {h: HostSeen.from_json(json.loads(v)) for h, v in raw.items()}

    def forget_hosts(self, hosts: Iterable[str]) -> None:
        """Drop these hosts' records in one command."""
        names = list(hosts)
        if names:
            self._run(self._r.hdel, f"{self._p}:hosts", *names)

    def mark_bad(self, version: str, reason: str) -> None:
        """Record a bad version."""
        self._run(self._r.hset, f"{self._p}:bad", version, reason)

    def bad_versions(self) -> dict[str, str]:
        """Versions marked bad."""
        return dict(self._run(self._r.hgetall, f"{self._p}:bad"))

    # ---- lifecycle -----------------------------------------------------------------------

    def ping(self) -> None:
        """Check that Redis answers."""
        self._run(self._r.ping)

    def stats(self) -> dict[str, float]:
        """Round trips to Redis so far."""
        return {"round_trips": float(self.round_trips)}

    def close(self) -> None:
        """Close the connection pool."""
        self._r.close()


def _progress(raw: str) -> HostProgress:
    rev, _, body = raw.partition("|")
    return HostProgress.from_json(json.loads(body), int(rev))
