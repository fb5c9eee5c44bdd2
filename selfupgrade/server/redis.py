"""The shared store: Redis, so that several hbs processes share the task, the leases and the limit.

Needs ``selfupgrade[redis]`` (redis-py). Each decision is carried out by one Lua script, which
Redis runs atomically: the admission script sweeps expired leases, re-checks the task's status
and the host's progress, counts the live leases and takes a slot only below the limit, all in
one step, so no number of concurrent heartbeats on any number of hbs processes can overshoot.

Keys (one hash tag, so a Redis Cluster keeps them on one shard)::

    {prefix}:active              the active task's id
    {prefix}:task:<id>           the task, JSON
    {prefix}:task:<id>:meta      hash: status, halt_reason, done, failed, failures
    {prefix}:task:<id>:leases    sorted set: host -> lease deadline (the slots)
    {prefix}:task:<id>:progress  hash: host -> progress, JSON
    {prefix}:hosts               hash: host -> last heartbeat, JSON

Per heartbeat hbs sends one ``HGET`` (the host's progress) and, when something changes, one
``EVALSHA``; the active task is read at most once a second, heartbeats are saved in batches.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

try:
    import redis
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "selfupgrade.server.redis needs the 'redis' extra: pip install 'selfupgrade[redis]'"
    ) from exc

from .core import Action, Decision
from .store import StoreError
from .tasks import HostProgress, HostSeen, Task, TaskCounters

__all__ = ["RedisStore"]

_COMMON = """
local meta, leases, progress = KEYS[1], KEYS[2], KEYS[3]
local now = tonumber(ARGV[2])
local lease_s, limit = tonumber(ARGV[4]), tonumber(ARGV[5])
local max_attempts, backoff = tonumber(ARGV[6]), tonumber(ARGV[7])
local failure_limit = tonumber(ARGV[8])

local function fail(h, p, why)
  local attempts = (p.attempts or 0) + 1
  local final = attempts >= max_attempts
  local np = {host = h, state = final and 'failed' or 'backoff', attempts = attempts,
              lease_until = 0, next_try_at = 0, started = false, failures_at_admit = 0,
              reason = string.sub(why, 1, 500)}
  if not final then np.next_try_at = now + backoff * math.pow(2, attempts - 1) end
  redis.call('HSET', progress, h, cjson.encode(np))
  redis.call('ZREM', leases, h)
  if final then redis.call('HINCRBY', meta, 'failed', 1) end
  local total = redis.call('HINCRBY', meta, 'failures', 1)
  if redis.call('HGET', meta, 'status') == 'active' and total >= failure_limit then
    redis.call('HSET', meta, 'status', 'halted', 'halt_reason',
      total .. ' failed attempts reached the failure limit of ' .. failure_limit)
  end
end

local function sweep()
  local expired = redis.call('ZRANGEBYSCORE', leases, '-inf', now)
  for _, h in ipairs(expired) do
    local raw = redis.call('HGET', progress, h)
    fail(h, raw and cjson.decode(raw) or {}, 'no news within the lease')
  end
  return #expired
end
"""

_APPLY = (
    _COMMON
    + """
local action, host = ARGV[1], ARGV[3]
local failures, reason = tonumber(ARGV[9]), ARGV[10]
if action == 'sweep' then return sweep() end
if action == 'admit' then sweep() end
local raw = redis.call('HGET', progress, host)
local cur = raw and cjson.decode(raw) or nil
local active = redis.call('HGET', meta, 'status') == 'active'
local admitted = cur ~= nil and cur.state == 'admitted'

local function hold(p)
  p.lease_until = now + lease_s
  redis.call('HSET', progress, host, cjson.encode(p))
  redis.call('ZADD', leases, p.lease_until, host)
end

if action == 'admit' then
  if not active then return 0 end
  if cur ~= nil and cur.state ~= 'backoff' then return 0 end
  if cur ~= nil and now < cur.next_try_at then return 0 end
  if redis.call('ZCARD', leases) >= limit then return 0 end
  hold({host = host, state = 'admitted', attempts = cur and cur.attempts or 0, lease_until = 0,
        next_try_at = 0, started = false, failures_at_admit = failures, reason = ''})
  return 1
elseif action == 'resend' then
  if not admitted or not active then return 0 end
  hold(cur)
  return 1
elseif action == 'renew' then
  if not admitted then return 0 end
  cur.started = true
  hold(cur)
  return 0
elseif action == 'complete' then
  if cur ~= nil and cur.state == 'done' then return 0 end
  if cur ~= nil and cur.state == 'failed' then redis.call('HINCRBY', meta, 'failed', -1) end
  redis.call('HSET', progress, host, cjson.encode({host = host, state = 'done',
    attempts = cur and cur.attempts or 0, lease_until = 0, next_try_at = 0, started = false,
    failures_at_admit = 0, reason = ''}))
  redis.call('ZREM', leases, host)
  redis.call('HINCRBY', meta, 'done', 1)
  return 0
elseif action == 'fail' then
  if not admitted then return 0 end
  fail(host, cur, reason)
  return 0
end
return 0
"""
)

_CANCEL_FN = """
local active_key = KEYS[1]
local function cancel(task_id, meta, leases, progress)
  local status = redis.call('HGET', meta, 'status')
  if status ~= 'active' and status ~= 'halted' then return 0 end
  redis.call('HSET', meta, 'status', 'cancelled')
  for _, h in ipairs(redis.call('ZRANGE', leases, 0, -1)) do
    local p = cjson.decode(redis.call('HGET', progress, h))
    p.state = 'backoff'
    p.lease_until = 0
    redis.call('HSET', progress, h, cjson.encode(p))
  end
  redis.call('DEL', leases)
  if redis.call('GET', active_key) == task_id then redis.call('DEL', active_key) end
  return 1
end
"""

_CANCEL = _CANCEL_FN + "return cancel(ARGV[1], KEYS[2], KEYS[3], KEYS[4])\n"

_PUBLISH = (
    _CANCEL_FN
    + """
-- the old task's keys share the hash tag, so they live on this shard too
local prefix, new_id, body = ARGV[1], ARGV[2], ARGV[3]
local old_id = redis.call('GET', active_key)
if old_id then
  local base = prefix .. ':task:' .. old_id
  cancel(old_id, base .. ':meta', base .. ':leases', base .. ':progress')
end
redis.call('SET', KEYS[2], body)
redis.call('DEL', KEYS[3], KEYS[4], KEYS[5])
redis.call('HSET', KEYS[3], 'status', 'active', 'halt_reason', '', 'done', 0, 'failed', 0,
           'failures', 0)
redis.call('SET', active_key, new_id)
return 1
"""
)


class RedisStore:
    """Tasks, leases and the fleet view in Redis, shared by every hbs that uses the same URL.

    Args:
        url: ``redis://host:port/db`` (``rediss://`` for TLS).
        prefix: the key prefix (the hash tag).
        timeout_s: connect and read timeout of every command.

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
        except redis.RedisError as exc:
            raise StoreError(f"cannot reach Redis at {url}: {exc}") from exc
        self._apply = self._r.register_script(_APPLY)
        self._cancel = self._r.register_script(_CANCEL)
        self._publish = self._r.register_script(_PUBLISH)
        self._tasks: dict[str, Task] = {}

    def _keys(self, task_id: str) -> list[str]:
        base = f"{self._p}:task:{task_id}"
        return [f"{base}:meta", f"{base}:leases", f"{base}:progress"]

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except redis.RedisError as exc:
            raise StoreError(f"Redis failed: {exc}") from exc

    def publish(self, task: Task) -> None:
        """Make ``task`` the active task, atomically cancelling the previous one."""
        keys = [f"{self._p}:active", f"{self._p}:task:{task.id}", *self._keys(task.id)]
        body = json.dumps(task.to_json())
        self._call(self._publish, keys=keys, args=[self._p, task.id, body])
        self._tasks[task.id] = task

    def active_task(self) -> Task | None:
        """The active task, if any."""
        task_id = self._call(self._r.get, f"{self._p}:active")
        return self.task(task_id) if task_id else None

    def task(self, task_id: str) -> Task | None:
        """A stored task by id (cached: tasks never change once published)."""
        if task_id in self._tasks:
            return self._tasks[task_id]
        body = self._call(self._r.get, f"{self._p}:task:{task_id}")
        if body is None:
            return None
        task = Task.from_json(json.loads(body))
        self._tasks[task_id] = task
        return task

    def cancel(self, task_id: str) -> bool:
        """Cancel the task and free its slots."""
        keys = [f"{self._p}:active", *self._keys(task_id)]
        return bool(self._call(self._cancel, keys=keys, args=[task_id]))

    def _args(
        self,
        task: Task,
        action: str,
        now: float,
        host: str = "",
        failures: int = 0,
        reason: str = "",
    ) -> list[Any]:
        lim = task.limits
        return [
            action,
            repr(now),
            host,
            lim.lease_s,
            lim.max_in_flight,
            lim.max_attempts,
            lim.retry_backoff_s,
            lim.failure_limit,
            failures,
            reason,
        ]

    def apply(
        self, task: Task, host: str, decision: Decision, *, failures: int, now: float
    ) -> bool:
        """Carry out ``decision`` in one Lua script."""
        if decision.action == Action.NOTHING:
            return False
        args = self._args(task, decision.action.value, now, host, failures, decision.reason)
        return bool(self._call(self._apply, keys=self._keys(task.id), args=args))

    def sweep(self, task: Task, now: float) -> int:
        """Expire leases that ran out."""
        return int(
            self._call(self._apply, keys=self._keys(task.id), args=self._args(task, "sweep", now))
        )

    def counters(self, task_id: str, now: float) -> TaskCounters:
        """Status and counts (expired leases swept first)."""
        task = self.task(task_id)
        if task is not None:
            self.sweep(task, now)
        meta_key, leases_key, _ = self._keys(task_id)
        pipe = self._r.pipeline(transaction=False)
        pipe.hgetall(meta_key)
        pipe.zcard(leases_key)
        meta, in_flight = self._call(pipe.execute)
        if not meta:
            return TaskCounters(status="cancelled")
        return TaskCounters(
            status=meta.get("status", "cancelled"),
            in_flight=int(in_flight),
            done=int(meta.get("done", 0)),
            failed=int(meta.get("failed", 0)),
            failures=int(meta.get("failures", 0)),
            halt_reason=meta.get("halt_reason", ""),
        )

    def progress(self, task_id: str, host: str) -> HostProgress | None:
        """What is known of ``host`` in the task."""
        raw = self._call(self._r.hget, self._keys(task_id)[2], host)
        return _progress(raw) if raw else None

    def all_progress(self, task_id: str) -> list[HostProgress]:
        """Every host's progress in the task."""
        raw = self._call(self._r.hgetall, self._keys(task_id)[2])
        return [_progress(v) for v in raw.values()]

    def save_hosts(self, seen: Iterable[HostSeen]) -> None:
        """Record the latest heartbeats in one command."""
        mapping = {s.host: json.dumps(s.to_json()) for s in seen}
        if mapping:
            self._call(self._r.hset, f"{self._p}:hosts", mapping=mapping)

    def hosts(self) -> dict[str, HostSeen]:
        """The latest heartbeat of every host, from every replica."""
        raw = self._call(self._r.hgetall, f"{self._p}:hosts")
        return {h: HostSeen.from_json(json.loads(v)) for h, v in raw.items()}

    def close(self) -> None:
        """Close the connection pool."""
        self._r.close()


def _progress(raw: str) -> HostProgress:
    data = json.loads(raw)
    data["started"] = bool(data.get("started"))
    for key in ("attempts", "failures_at_admit"):
        data[key] = int(data.get(key, 0))
    for key in ("lease_until", "next_try_at"):
        data[key] = float(data.get(key, 0))
    return HostProgress(**data)
