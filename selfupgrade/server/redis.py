"""The shared store: Redis, so that several hbs processes share rollouts, leases and limits.

Needs ``selfupgrade[redis]`` (redis-py). Each decision is carried out by one Lua script, which
Redis runs atomically: the admission script sweeps expired leases, re-checks the rollout's
status and current wave and the host's progress, counts the live leases and takes a slot only
below the current wave's limit, all in one step, so no number of concurrent heartbeats on any
number of hbs processes can overshoot. Failure budgets, status changes (pause, resume, abort)
and promotions are scripts too, with the same rules as the in-memory store.

Keys (one hash tag, so a Redis Cluster keeps them on one shard)::

    {prefix}:active              the active rollout's id
    {prefix}:tasks               list of rollout ids, newest first
    {prefix}:task:<id>           the rollout, JSON
    {prefix}:task:<id>:meta      hash: status, halt_reason, done, failed, failures, wave,
                                 wave_done_at, and w<k>:members|done|failed|failures per wave
    {prefix}:task:<id>:leases    sorted set: host -> lease deadline (the slots)
    {prefix}:task:<id>:progress  hash: host -> progress, JSON
    {prefix}:task:<id>:members   hash: host -> wave
    {prefix}:hosts               hash: host -> last heartbeat, JSON
    {prefix}:bad                 hash: version -> why it was marked bad

Per heartbeat hbs sends one pipelined ``HGET`` pair (the host's progress and wave) and, when
something changes, one ``EVALSHA``; the rollout is read at most once a second and heartbeats
are saved in batches.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

try:
    import redis
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "selfupgrade.server.redis needs the 'redis' extra: pip install 'selfupgrade[redis]'"
    ) from exc

from .core import Action, Decision, Step
from .memory import STATUS_CHANGES
from .store import StoreError
from .tasks import HostProgress, HostSeen, Task, TaskCounters, TaskStatus, WaveCounters

__all__ = ["RedisStore"]

_COMMON = """
local meta, leases, progress, members = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local now = tonumber(ARGV[2])
local lease_s, max_attempts, backoff = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local waves = cjson.decode(ARGV[7])

local function budget(k, n)
  local w = waves[k + 1]
  if w.max_failure_ratio ~= nil then return math.floor(w.max_failure_ratio * n) end
  return w.max_failures or 0
end

local function fail(h, p, why)
  local attempts = (p.attempts or 0) + 1
  local final = attempts >= max_attempts
  local np = {host = h, state = final and 'failed' or 'backoff', attempts = attempts,
              lease_until = 0, next_try_at = 0, started = false, failures_at_admit = 0,
              reason = string.sub(why, 1, 500), admitted_at = p.admitted_at or 0, done_at = 0}
  if not final then np.next_try_at = now + backoff * math.pow(2, attempts - 1) end
  redis.call('HSET', progress, h, cjson.encode(np))
  redis.call('ZREM', leases, h)
  if final then redis.call('HINCRBY', meta, 'failed', 1) end
  redis.call('HINCRBY', meta, 'failures', 1)
  local k = redis.call('HGET', members, h)
  if not k then return end
  local wk = 'w' .. k .. ':'
  if final then redis.call('HINCRBY', meta, wk .. 'failed', 1) end
  local wf = redis.call('HINCRBY', meta, wk .. 'failures', 1)
  local n = tonumber(redis.call('HGET', meta, wk .. 'members') or '0')
  local allowed = budget(tonumber(k), n)
  if redis.call('HGET', meta, 'status') == 'active' and wf > allowed then
    local w = waves[tonumber(k) + 1]
    local reason = 'wave ' .. (tonumber(k) + 1) .. ' (' .. w.name .. ') exceeded its ' ..
      'failure budget: ' .. wf .. ' failed attempt(s), ' .. allowed .. ' allowed; last: ' ..
      h .. ': ' .. why
    redis.call('HSET', meta, 'status', 'halted', 'halt_reason', string.sub(reason, 1, 1000))
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
local failures, reason, host_wave = tonumber(ARGV[8]), ARGV[9], tonumber(ARGV[10])
if action == 'sweep' then return sweep() end
if action == 'admit' then sweep() end
local raw = redis.call('HGET', progress, host)
local cur = raw and cjson.decode(raw) or nil
local status = redis.call('HGET', meta, 'status')
local admitted = cur ~= nil and cur.state == 'admitted'

local function hold(p)
  p.lease_until = now + lease_s
  redis.call('HSET', progress, host, cjson.encode(p))
  redis.call('ZADD', leases, p.lease_until, host)
end

if action == 'admit' then
  local wave = tonumber(redis.call('HGET', meta, 'wave') or '0')
  if status ~= 'active' and status ~= 'complete' then return 0 end
  if host_wave < 0 or host_wave > wave then return 0 end
  if cur ~= nil and cur.state ~= 'backoff' then return 0 end
  if cur ~= nil and now < cur.next_try_at then return 0 end
  local limit = waves[math.min(wave, #waves - 1) + 1].max_in_flight
  if redis.call('ZCARD', leases) >= limit then return 0 end
  hold({host = host, state = 'admitted', attempts = cur and cur.attempts or 0, lease_until = 0,
        next_try_at = 0, started = false, failures_at_admit = failures, reason = '',
        admitted_at = now, done_at = 0})
  return 1
elseif action == 'resend' then
  if not admitted then return 0 end
  if status ~= 'active' and status ~= 'paused' and status ~= 'complete' then return 0 end
  hold(cur)
  return 1
elseif action == 'renew' then
  if not admitted then return 0 end
  cur.started = true
  hold(cur)
  return 0
elseif action == 'complete' then
  if cur ~= nil and cur.state == 'done' then return 0 end
  local k = redis.call('HGET', members, host)
  if cur ~= nil and cur.state == 'failed' then
    redis.call('HINCRBY', meta, 'failed', -1)
    if k then redis.call('HINCRBY', meta, 'w' .. k .. ':failed', -1) end
  end
  redis.call('HSET', progress, host, cjson.encode({host = host, state = 'done',
    attempts = cur and cur.attempts or 0, lease_until = 0, next_try_at = 0, started = false,
    failures_at_admit = 0, reason = '', admitted_at = cur and cur.admitted_at or 0,
    done_at = now}))
  redis.call('ZREM', leases, host)
  redis.call('HINCRBY', meta, 'done', 1)
  if k then redis.call('HINCRBY', meta, 'w' .. k .. ':done', 1) end
  return 0
elseif action == 'fail' then
  if not admitted then return 0 end
  fail(host, cur, reason)
  return 0
end
return 0
"""
)

_RELEASE_FN = """
local function release_all(meta, leases, progress)
  for _, h in ipairs(redis.call('ZRANGE', leases, 0, -1)) do
    local p = cjson.decode(redis.call('HGET', progress, h))
    p.state = 'backoff'
    p.lease_until = 0
    redis.call('HSET', progress, h, cjson.encode(p))
  end
  redis.call('DEL', leases)
end
"""

_SET_STATUS = (
    _RELEASE_FN
    + """
local meta, leases, progress, active_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local status, reason, task_id, clear_active = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local current = redis.call('HGET', meta, 'status')
local allowed = false
for i = 5, #ARGV do if ARGV[i] == current then allowed = true end end
if not allowed then return 0 end
redis.call('HSET', meta, 'status', status, 'halt_reason', status == 'active' and '' or reason)
if status == 'aborted' or status == 'cancelled' then release_all(meta, leases, progress) end
if clear_active == '1' and redis.call('GET', active_key) == task_id then
  redis.call('DEL', active_key)
end
return 1
"""
)

_PUBLISH = (
    _RELEASE_FN
    + """
local active_key, tasks_key, task_key, meta = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local prefix, new_id, body, n_waves = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local old_id = redis.call('GET', active_key)
if old_id and old_id ~= new_id then
  local base = prefix .. ':task:' .. old_id
  local old_status = redis.call('HGET', base .. ':meta', 'status')
  if old_status ~= 'aborted' and old_status ~= 'cancelled' then
    redis.call('HSET', base .. ':meta', 'status', 'cancelled',
               'halt_reason', 'replaced by ' .. new_id)
    release_all(base .. ':meta', base .. ':leases', base .. ':progress')
  end
end
redis.call('SET', task_key, body)
redis.call('HSET', meta, 'status', 'active', 'halt_reason', '', 'done', 0, 'failed', 0,
           'failures', 0, 'wave', 0, 'wave_done_at', '')
for k = 0, n_waves - 1 do
  redis.call('HSET', meta, 'w' .. k .. ':members', ARGV[5 + k], 'w' .. k .. ':done', 0,
             'w' .. k .. ':failed', 0, 'w' .. k .. ':failures', 0)
end
redis.call('LPUSH', tasks_key, new_id)
redis.call('SET', active_key, new_id)
return 1
"""
)

_STEP = """
local meta = KEYS[1]
local kind, wave, at = ARGV[1], tonumber(ARGV[2]), ARGV[3]
if redis.call('HGET', meta, 'status') ~= 'active' then return 0 end
local current = tonumber(redis.call('HGET', meta, 'wave') or '0')
local done_at = redis.call('HGET', meta, 'wave_done_at') or ''
if kind == 'bake' and current == wave and done_at == '' then
  redis.call('HSET', meta, 'wave_done_at', at)
elseif kind == 'unbake' and current == wave then
  redis.call('HSET', meta, 'wave_done_at', '')
elseif kind == 'promote' and current == wave - 1 then
  redis.call('HSET', meta, 'wave', wave, 'wave_done_at', '')
elseif kind == 'complete' and current == wave then
  redis.call('HSET', meta, 'status', 'complete', 'wave_done_at', at)
else
  return 0
end
return 1
"""

_JOIN = """
if redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[2]) == 1 then
  redis.call('HINCRBY', KEYS[1], 'w' .. ARGV[2] .. ':members', 1)
end
return 1
"""


class RedisStore:
    """Rollouts, leases and the fleet view in Redis, shared by every hbs using the same URL.

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
        self._set_status = self._r.register_script(_SET_STATUS)
        self._publish = self._r.register_script(_PUBLISH)
        self._step = self._r.register_script(_STEP)
        self._join = self._r.register_script(_JOIN)
        self._tasks: dict[str, Task] = {}
        self._waves_json: dict[str, str] = {}

    def _keys(self, task_id: str) -> list[str]:
        base = f"{self._p}:task:{task_id}"
        return [f"{base}:meta", f"{base}:leases", f"{base}:progress", f"{base}:members"]

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except redis.RedisError as exc:
            raise StoreError(f"Redis failed: {exc}") from exc

    # ---- rollouts ------------------------------------------------------------------------

    def publish(self, task: Task, members: Mapping[str, int] | None = None) -> None:
        """Make ``task`` the active rollout, atomically cancelling the previous one."""
        members = dict(members or {})
        n_waves = len(task.effective_plan.waves)
        per_wave = [0] * n_waves
        for wave in members.values():
            per_wave[wave] += 1
        meta, leases, progress, members_key = self._keys(task.id)
        # Not a MULTI: Redis serves other clients between these commands, and nothing reads
        # the keys of a rollout before the script below publishes it.
        pipe = self._r.pipeline(transaction=False)
        pipe.delete(meta, leases, progress, members_key)
        items = list(members.items())
        for i in range(0, len(items), 1000):
            pipe.hset(members_key, mapping=dict(items[i : i + 1000]))
        self._call(pipe.execute)
        keys = [f"{self._p}:active", f"{self._p}:tasks", f"{self._p}:task:{task.id}", meta]
        body = json.dumps(task.to_json())
        self._call(self._publish, keys=keys, args=[self._p, task.id, body, n_waves, *per_wave])
        self._tasks[task.id] = task

    def active_task(self) -> Task | None:
        """The active rollout, if any."""
        task_id = self._call(self._r.get, f"{self._p}:active")
        return self.task(task_id) if task_id else None

    def task(self, task_id: str) -> Task | None:
        """A stored rollout by id (cached: rollouts never change once published)."""
        if task_id in self._tasks:
            return self._tasks[task_id]
        body = self._call(self._r.get, f"{self._p}:task:{task_id}")
        if body is None:
            return None
        task = Task.from_json(json.loads(body))
        self._tasks[task_id] = task
        return task

    def tasks(self) -> list[Task]:
        """Every stored rollout, newest first."""
        ids = self._call(self._r.lrange, f"{self._p}:tasks", 0, 199)
        found = [self.task(i) for i in dict.fromkeys(ids)]
        return [t for t in found if t is not None]

    def cancel(self, task_id: str) -> bool:
        """Abort the rollout, free its slots, and stop comparing hosts against it."""
        return self._status(
            task_id,
            "aborted",
            "cancelled by an operator",
            clear_active=True,
            allowed=("active", "paused", "halted", "complete"),
        )

    def set_status(self, task_id: str, status: TaskStatus, reason: str) -> bool:
        """An operator's change (pause, resume, abort)."""
        return self._status(
            task_id,
            status,
            reason,
            clear_active=False,
            allowed=tuple(STATUS_CHANGES.get(status, ())),
        )

    def _status(
        self,
        task_id: str,
        status: str,
        reason: str,
        *,
        clear_active: bool,
        allowed: tuple[str, ...],
    ) -> bool:
        meta, leases, progress, _ = self._keys(task_id)
        keys = [meta, leases, progress, f"{self._p}:active"]
        args = [status, reason, task_id, "1" if clear_active else "0", *allowed]
        return bool(self._call(self._set_status, keys=keys, args=args))

    def step(self, task_id: str, step: Step) -> bool:
        """Carry out a promotion step if the rollout is still on the wave it was computed for."""
        args = [step.kind, step.wave, repr(step.at)]
        return bool(self._call(self._step, keys=self._keys(task_id)[:1], args=args))

    def counters(self, task_id: str, now: float) -> TaskCounters:
        """Status and counts (expired leases swept first)."""
        task = self.task(task_id)
        if task is None:
            return TaskCounters(status="cancelled")
        self.sweep(task, now)
        meta_key, leases_key, _, _ = self._keys(task_id)
        pipe = self._r.pipeline(transaction=False)
        pipe.hgetall(meta_key)
        pipe.zcard(leases_key)
        meta, in_flight = self._call(pipe.execute)
        if not meta:
            return TaskCounters(status="cancelled")
        waves = tuple(
            WaveCounters(
                *(int(meta.get(f"w{k}:{f}", 0)) for f in ("members", "done", "failed", "failures"))
            )
            for k in range(len(task.effective_plan.waves))
        )
        done_at = meta.get("wave_done_at", "")
        return TaskCounters(
            status=meta.get("status", "cancelled"),
            in_flight=int(in_flight),
            done=int(meta.get("done", 0)),
            failed=int(meta.get("failed", 0)),
            failures=int(meta.get("failures", 0)),
            halt_reason=meta.get("halt_reason", ""),
            wave=int(meta.get("wave", 0)),
            wave_done_at=float(done_at) if done_at else None,
            waves=waves,
        )

    # ---- hosts in a rollout --------------------------------------------------------------

    def host_state(self, task_id: str, host: str) -> tuple[HostProgress | None, int | None]:
        """The host's progress and wave, in one round trip."""
        _, _, progress_key, members_key = self._keys(task_id)
        pipe = self._r.pipeline(transaction=False)
        pipe.hget(progress_key, host)
        pipe.hget(members_key, host)
        raw, wave = self._call(pipe.execute)
        return (_progress(raw) if raw else None), (int(wave) if wave is not None else None)

    def progress(self, task_id: str, host: str) -> HostProgress | None:
        """What is known of ``host`` in the rollout."""
        raw = self._call(self._r.hget, self._keys(task_id)[2], host)
        return _progress(raw) if raw else None

    def members(self, task_id: str) -> dict[str, int]:
        """Every member and its wave."""
        raw = self._call(self._r.hgetall, self._keys(task_id)[3])
        return {h: int(w) for h, w in raw.items()}

    def join(self, task_id: str, host: str, wave: int) -> None:
        """Add a late host to ``wave``."""
        meta, _, _, members_key = self._keys(task_id)
        self._call(self._join, keys=[meta, members_key], args=[host, wave])

    def all_progress(self, task_id: str) -> list[HostProgress]:
        """Every host's progress in the rollout."""
        raw = self._call(self._r.hgetall, self._keys(task_id)[2])
        return [_progress(v) for v in raw.values()]

    def _args(
        self,
        task: Task,
        action: str,
        now: float,
        host: str = "",
        failures: int = 0,
        reason: str = "",
        host_wave: int | None = None,
    ) -> list[Any]:
        waves = self._waves_json.get(task.id)
        if waves is None:
            waves = json.dumps(
                [
                    {
                        "name": w.name,
                        "max_in_flight": w.max_in_flight,
                        "max_failures": w.max_failures,
                        **(
                            {"max_failure_ratio": w.max_failure_ratio}
                            if w.max_failure_ratio is not None
                            else {}
                        ),
                    }
                    for w in task.effective_plan.waves
                ]
            )
            self._waves_json[task.id] = waves
        lim = task.limits
        return [
            action,
            repr(now),
            host,
            lim.lease_s,
            lim.max_attempts,
            lim.retry_backoff_s,
            waves,
            failures,
            reason,
            -1 if host_wave is None else host_wave,
        ]

    def apply(
        self,
        task: Task,
        host: str,
        decision: Decision,
        *,
        failures: int,
        now: float,
        wave: int | None = None,
    ) -> bool:
        """Carry out ``decision`` in one Lua script (``wave``: the host's, for admission)."""
        if decision.action == Action.NOTHING:
            return False
        args = self._args(task, decision.action.value, now, host, failures, decision.reason, wave)
        return bool(self._call(self._apply, keys=self._keys(task.id), args=args))

    def sweep(self, task: Task, now: float) -> int:
        """Expire leases that ran out."""
        args = self._args(task, "sweep", now)
        return int(self._call(self._apply, keys=self._keys(task.id), args=args))

    # ---- bad versions --------------------------------------------------------------------

    def mark_bad(self, version: str, reason: str) -> None:
        """Record that no later rollout may install ``version``."""
        self._call(self._r.hset, f"{self._p}:bad", version, reason)

    def bad_versions(self) -> dict[str, str]:
        """Versions marked bad, with why."""
        return dict(self._call(self._r.hgetall, f"{self._p}:bad"))

    # ---- the fleet view ------------------------------------------------------------------

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
    for key in ("lease_until", "next_try_at", "admitted_at", "done_at"):
        data[key] = float(data.get(key, 0))
    return HostProgress(**data)
