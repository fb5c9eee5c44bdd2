"""Rollout plans: ordered waves, host targeting by labels, and a maintenance window.

A plan is data, read from JSON and validated on submit::

    {
      "waves": [
        {"name": "canary", "hosts": 1,     "max_in_flight": 1, "bake_s": 300, "max_failures": 0},
        {"name": "25%",    "percent": 25,  "max_in_flight": 5, "bake_s": 600},
        {"name": "all",    "percent": 100, "max_in_flight": 50, "max_failure_ratio": 0.02}
      ],
      "selector": {"dc": "bj"},
      "window": {"days": ["mon", "tue", "wed", "thu"], "start": "02:00", "end": "05:00",
                 "tz": "Asia/Shanghai"},
      "mirrors": [{"match": {"dc": "bj"}, "artifacts": {"bin": ["http://files.bj/bin_6.0.1"]}}]
    }

Wave sizes are cumulative: ``hosts`` is a count of targeted hosts, ``percent`` a share of them
(rounded up), so the example upgrades 1 host, then up to a quarter, then everyone. Hosts are
ordered by a stable hash of host id and rollout id, so the same rollout always picks the same
canary, also after an hbs restart, and different rollouts pick different ones. A wave may
hold ``max_in_flight`` upgrades at once; it is promoted once its hosts have confirmed the new
version and ``bake_s`` has passed; its failure budget is ``max_failures`` failed attempts, or
``max_failure_ratio`` of its hosts, whichever is given (beyond it, the rollout halts).
``mirrors`` gives some hosts (by their labels, and by the wave the rollout is on, for a rule
that names one) download sources of their own: a mirror per site, tried before the release's
URL and its mirrors.
"""

from __future__ import annotations

import datetime
import hashlib
import math
import re
import zoneinfo
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..models import check_url
from ._fields import FieldError

__all__ = ["Plan", "Wave", "Window", "assign_waves", "host_rank"]

_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_CLOCK = re.compile(r"([01]\d|2[0-3]):([0-5]\d)")


@dataclass(frozen=True)
class Wave:
    """One step of a rollout.

    Attributes:
        name: shown in status and logs.
        hosts: cumulative number of targeted hosts this wave brings the rollout to.
        percent: cumulative share of targeted hosts (0 < percent <= 100); one of the two.
        max_in_flight: upgrades at once while this wave runs.
        bake_s: how long the wave's hosts must stay confirmed before the next wave starts.
        max_failures: failed attempts the wave may have; one more halts the rollout.
        max_failure_ratio: instead of a count, a share of the wave's hosts.
    """

    name: str
    hosts: int | None = None
    percent: float | None = None
    max_in_flight: int = 1
    bake_s: float = 0.0
    max_failures: int = 0
    max_failure_ratio: float | None = None

    def budget(self, members: int) -> int:
        """Failed attempts allowed for a wave of ``members`` hosts."""
        if self.max_failure_ratio is not None:
            return math.floor(self.max_failure_ratio * members)
        return self.max_failures

    def to_json(self) -> dict[str, Any]:
        """The JSON object :meth:`Plan.from_json` reads."""
        out: dict[str, Any] = {
            "name": self.name,
            "max_in_flight": self.max_in_flight,
            "bake_s": self.bake_s,
        }
        if self.hosts is not None:
            out["hosts"] = self.hosts
        if self.percent is not None:
            out["percent"] = self.percent
        if self.max_failure_ratio is not None:
            out["max_failure_ratio"] = self.max_failure_ratio
        else:
            out["max_failures"] = self.max_failures
        return out


@dataclass(frozen=True)
class Window:
    """When new hosts may be admitted: some days of the week, between two times, in a zone.

    ``end`` before ``start`` means the window runs past midnight (it belongs to the day it
    starts on).
    """

    days: tuple[str, ...]
    start: str
    end: str
    tz: str = "UTC"

    def is_open(self, now: float) -> bool:
        """Whether the window is open at ``now`` (seconds since the epoch)."""
        local = datetime.datetime.fromtimestamp(now, zoneinfo.ZoneInfo(self.tz))
        minute = local.hour * 60 + local.minute
        start, end = _minutes(self.start), _minutes(self.end)
        today = _DAYS[local.weekday()]
        yesterday = _DAYS[(local.weekday() - 1) % 7]
        if start <= end:
            return today in self.days and start <= minute < end
        return (today in self.days and minute >= start) or (yesterday in self.days and minute < end)

    def to_json(self) -> dict[str, Any]:
        """The JSON object :meth:`Plan.from_json` reads."""
        return {"days": list(self.days), "start": self.start, "end": self.end, "tz": self.tz}


@dataclass(frozen=True)
class MirrorRule:
    """Download sources for some hosts: one mirror per site.

    Attributes:
        match: the hosts whose labels include all of these (``{"dc": "bj"}``).
        artifacts: for each role, URLs of the same bytes that these hosts try first, before
            the release's own URL and mirrors.
        wave: when set, the rule applies only while the rollout is on the wave of this name
            (a mirror seeded for the big waves, the origin for the canary).
    """

    match: Mapping[str, str]
    artifacts: Mapping[str, tuple[str, ...]]
    wave: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The JSON object :meth:`Plan.from_json` reads."""
        out: dict[str, Any] = {
            "match": dict(self.match),
            "artifacts": {r: list(u) for r, u in self.artifacts.items()},
        }
        if self.wave is not None:
            out["wave"] = self.wave
        return out


@dataclass(frozen=True)
class Plan:
    """Waves, targeting, window and download sources of a rollout.

    Attributes:
        waves: in order; the last one usually reaches 100%.
        selector: only hosts whose labels include all of these take part.
        window: when set, no host is admitted outside it.
        mirrors: the first rule that a host's labels (and the rollout's current wave, for a
            rule that names one) match puts its URLs first in the host's order (the
            release's URL and mirrors follow); a host no rule matches gets the release's.
    """

    waves: tuple[Wave, ...]
    selector: Mapping[str, str] = field(default_factory=dict)
    window: Window | None = None
    mirrors: tuple[MirrorRule, ...] = ()

    def mirror_rule(self, labels: Mapping[str, str], wave: int | None = None) -> int | None:
        """The index of the first mirror rule a host with ``labels`` matches while the
        rollout is on wave index ``wave`` (``None``: only rules that name no wave), if any."""
        name = self.waves[wave].name if wave is not None and wave < len(self.waves) else None
        for i, rule in enumerate(self.mirrors):
            if rule.wave is not None and rule.wave != name:
                continue
            if all(labels.get(k) == v for k, v in rule.match.items()):
                return i
        return None

    @classmethod
    def single(cls, max_in_flight: int, failure_limit: int) -> Plan:
        """One wave of everyone: the falcon API's task (halts at ``failure_limit`` failures)."""
        return cls(
            (
                Wave(
                    "all",
                    percent=100.0,
                    max_in_flight=max_in_flight,
                    max_failures=max(failure_limit - 1, 0),
                ),
            )
        )

    def sizes(self, targeted: int) -> list[int]:
        """Cumulative host counts after each wave, for ``targeted`` hosts."""
        out: list[int] = []
        for wave in self.waves:
            if wave.hosts is not None:
                size = wave.hosts
            else:
                assert wave.percent is not None
                size = math.ceil(targeted * wave.percent / 100 - 1e-9)
            out.append(min(targeted, max(size, out[-1] if out else 0)))
        return out

    def matches(self, labels: Mapping[str, str]) -> bool:
        """Whether a host with ``labels`` is targeted."""
        return all(labels.get(k) == v for k, v in self.selector.items())

    def to_json(self) -> dict[str, Any]:
        """The JSON object :meth:`from_json` reads."""
        out: dict[str, Any] = {
            "waves": [w.to_json() for w in self.waves],
            "selector": dict(self.selector),
            "window": self.window.to_json() if self.window else None,
        }
        if self.mirrors:
            out["mirrors"] = [rule.to_json() for rule in self.mirrors]
        return out

    @classmethod
    def from_json(cls, data: object) -> Plan:
        """Validate and read a plan.

        Raises:
            FieldError: naming the field (``plan.waves[1].percent``, ``plan.window.tz``, ...).
        """
        obj = _mapping(data, "plan")
        _no_unknown(obj, {"waves", "selector", "window", "mirrors"}, "plan")
        raw_waves = obj.get("waves")
        if not isinstance(raw_waves, list) or not raw_waves:
            raise FieldError("plan.waves", "must be a non-empty list")
        if len(raw_waves) > 20:
            raise FieldError("plan.waves", "at most 20 waves")
        waves = []
        last_percent, last_hosts = 0.0, 0
        for i, raw in enumerate(raw_waves):
            name = f"plan.waves[{i}]"
            wave = _wave(_mapping(raw, name), name, i)
            if wave.percent is not None:
                if wave.percent < last_percent:
                    raise FieldError(f"{name}.percent", "waves are cumulative: must not decrease")
                last_percent = wave.percent
            if wave.hosts is not None:
                if wave.hosts < last_hosts:
                    raise FieldError(f"{name}.hosts", "waves are cumulative: must not decrease")
                last_hosts = wave.hosts
            waves.append(wave)
        selector = obj.get("selector", {})
        selector_map = _mapping(selector, "plan.selector")
        if len(selector_map) > 16 or not all(
            isinstance(k, str) and isinstance(v, str) and len(k) <= 128 and len(v) <= 256
            for k, v in selector_map.items()
        ):
            raise FieldError("plan.selector", "must map at most 16 label names to strings")
        window = obj.get("window")
        return cls(
            waves=tuple(waves),
            selector=dict(selector_map),
            window=_window(_mapping(window, "plan.window")) if window is not None else None,
            mirrors=_mirror_rules(obj.get("mirrors", []), [w.name for w in waves]),
        )


_ROLES = ("bin", "cfg", "service")


def _mirror_rules(raw: object, wave_names: Sequence[str]) -> tuple[MirrorRule, ...]:
    if not isinstance(raw, list):
        raise FieldError("plan.mirrors", "must be a list of {match, artifacts, wave}")
    if len(raw) > 64:
        raise FieldError("plan.mirrors", "at most 64 rules")
    rules = []
    for i, item in enumerate(raw):
        name = f"plan.mirrors[{i}]"
        obj = _mapping(item, name)
        _no_unknown(obj, {"match", "artifacts", "wave"}, name)
        wave = obj.get("wave")
        if wave is not None and wave not in wave_names:
            raise FieldError(f"{name}.wave", f"names no wave of the plan; they are {wave_names}")
        match = _mapping(obj.get("match", {}), f"{name}.match")
        if (
            (not match and wave is None)
            or len(match) > 16
            or not all(
                isinstance(k, str) and isinstance(v, str) and len(k) <= 128 and len(v) <= 256
                for k, v in match.items()
            )
        ):
            raise FieldError(
                f"{name}.match",
                "must map 1 to 16 label names to strings (or be left out, for a rule that names "
                "a wave)",
            )
        artifacts = _mapping(obj.get("artifacts"), f"{name}.artifacts")
        urls: dict[str, tuple[str, ...]] = {}
        for role, listed in artifacts.items():
            field_name = f"{name}.artifacts.{role}"
            if role not in _ROLES:
                raise FieldError(field_name, f"unknown role; the roles are {list(_ROLES)}")
            if not isinstance(listed, list) or not 1 <= len(listed) <= 16:
                raise FieldError(field_name, "must be a list of 1 to 16 URLs")
            for url in listed:
                try:
                    check_url(url)
                except ValueError as exc:
                    raise FieldError(field_name, str(exc)) from None
            urls[role] = tuple(listed)
        if not urls:
            raise FieldError(f"{name}.artifacts", "must give URLs for at least one role")
        rules.append(MirrorRule(dict(match), urls, wave))
    return tuple(rules)


def _wave(obj: Mapping[str, Any], name: str, index: int) -> Wave:
    _no_unknown(
        obj,
        {
            "name",
            "hosts",
            "percent",
            "max_in_flight",
            "bake_s",
            "max_failures",
            "max_failure_ratio",
        },
        name,
    )
    hosts, percent = obj.get("hosts"), obj.get("percent")
    if (hosts is None) == (percent is None):
        raise FieldError(name, "give exactly one of 'hosts' (a count) or 'percent'")
    if hosts is not None and (not _int(hosts) or hosts < 1):
        raise FieldError(f"{name}.hosts", "must be a positive integer")
    if percent is not None and (not _number(percent) or not 0 < percent <= 100):
        raise FieldError(f"{name}.percent", "must be a number in (0, 100]")
    label = obj.get("name", f"wave {index + 1}")
    if not isinstance(label, str) or not 0 < len(label) <= 64:
        raise FieldError(f"{name}.name", "must be a string of 1 to 64 characters")
    max_in_flight = obj.get("max_in_flight", 1)
    if not _int(max_in_flight) or max_in_flight < 1:
        raise FieldError(f"{name}.max_in_flight", "must be a positive integer")
    bake = obj.get("bake_s", 0)
    if not _number(bake) or bake < 0 or bake > 7 * 86400:
        raise FieldError(f"{name}.bake_s", "must be between 0 and 604800 seconds")
    max_failures = obj.get("max_failures", 0)
    ratio = obj.get("max_failure_ratio")
    if "max_failures" in obj and ratio is not None:
        raise FieldError(name, "give 'max_failures' or 'max_failure_ratio', not both")
    if not _int(max_failures) or max_failures < 0:
        raise FieldError(f"{name}.max_failures", "must be a non-negative integer")
    if ratio is not None and (not _number(ratio) or not 0 <= ratio <= 1):
        raise FieldError(f"{name}.max_failure_ratio", "must be a number in [0, 1]")
    return Wave(
        name=label,
        hosts=hosts,
        percent=float(percent) if percent is not None else None,
        max_in_flight=max_in_flight,
        bake_s=float(bake),
        max_failures=max_failures,
        max_failure_ratio=float(ratio) if ratio is not None else None,
    )


def _window(obj: Mapping[str, Any]) -> Window:
    _no_unknown(obj, {"days", "start", "end", "tz"}, "plan.window")
    days = obj.get("days")
    if not isinstance(days, list) or not all(isinstance(d, str) for d in days):
        raise FieldError("plan.window.days", f"must be a list of {', '.join(_DAYS)}")
    lowered = tuple(d.lower()[:3] for d in days)
    if any(d not in _DAYS for d in lowered):
        raise FieldError("plan.window.days", f"must be a list of {', '.join(_DAYS)}")
    for key in ("start", "end"):
        value = obj.get(key)
        if not isinstance(value, str) or not _CLOCK.fullmatch(value):
            raise FieldError(f"plan.window.{key}", "must be HH:MM (24-hour clock)")
    if obj["start"] == obj["end"]:
        raise FieldError("plan.window.end", "must differ from start")
    tz = obj.get("tz", "UTC")
    try:
        if not isinstance(tz, str) or "\x00" in tz:
            raise ValueError(tz)
        zoneinfo.ZoneInfo(tz)
    except (ValueError, zoneinfo.ZoneInfoNotFoundError):
        raise FieldError("plan.window.tz", f"unknown time zone {tz!r}") from None
    return Window(days=lowered, start=obj["start"], end=obj["end"], tz=tz)


def host_rank(host: str, rollout_id: str) -> int:
    """The host's place in the rollout's order: a stable hash of both ids."""
    digest = hashlib.sha256(f"{rollout_id}\x00{host}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def assign_waves(plan: Plan, hosts: Iterable[str], rollout_id: str) -> dict[str, int]:
    """Give each targeted host its wave: ``{host: wave index}``.

    Hosts are ordered by :func:`host_rank`; wave ``k`` takes them up to its cumulative size.
    Hosts left over (a last wave below 100%) are not part of the rollout.
    """
    ordered = sorted(set(hosts), key=lambda h: (host_rank(h, rollout_id), h))
    sizes = plan.sizes(len(ordered))
    out: dict[str, int] = {}
    start = 0
    for index, end in enumerate(sizes):
        for host in ordered[start:end]:
            out[host] = index
        start = max(start, end)
    return out


def _minutes(text: str) -> int:
    hours, minutes = text.split(":")
    return int(hours) * 60 + int(minutes)


def _mapping(value: object, name: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise FieldError(name, "must be a JSON object")
    return value


def _no_unknown(obj: Mapping[str, Any], allowed: set[str], name: str) -> None:
    unknown = sorted(str(k) for k in obj if k not in allowed)
    if unknown:
        raise FieldError(f"{name}.{unknown[0]}", f"unknown field; allowed: {sorted(allowed)}")


def _int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
