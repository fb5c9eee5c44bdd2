"""Tasks and per-host progress: the data of the control plane.

A :class:`Task` is one upgrade the operator published: a release (version and artifacts), how
many hosts may hold an upgrade slot at once, how long a slot's lease lasts, and how failures
are retried. It is stored, with its id, in the store, never only in one process's memory.

:func:`task_from_seed` turns the falcon API's body (``wgeturl``, ``version``, ``binfile_md5``,
``cfgfile_md5``, ``type``) into a task, validating it as the seed did and adding what the seed
forgot (an unknown ``type``, a malformed md5, a version that is not a version).
"""

from __future__ import annotations

import enum
import functools
import math
import secrets
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from ..models import (
    FALCON_TYPES,
    Artifact,
    Digest,
    Heartbeat,
    Release,
    Role,
    UpgradeOrder,
    Version,
    check_url,
    falcon_release,
    parse_version,
)
from ._fields import FieldError
from .plan import Plan

__all__ = [
    "NO_ROLLOUT",
    "ROLLOUT_FIELDS",
    "FieldError",
    "HostProgress",
    "HostRead",
    "HostSeen",
    "HostState",
    "RolloutState",
    "Status",
    "Task",
    "TaskLimits",
    "TextEnum",
    "WaveCounters",
    "seed_args",
    "task_from_seed",
]


class TextEnum(str, enum.Enum):
    """An enum whose members are their text (``str()`` and JSON give the value)."""

    def __str__(self) -> str:
        return str(self.value)


class Status(TextEnum):
    """A rollout's status."""

    ACTIVE = "active"
    """Admits hosts."""
    PAUSED = "paused"
    """Admits none until resumed."""
    HALTED = "halted"
    """Stopped itself: a wave exceeded its failure budget."""
    ABORTED = "aborted"
    """Stopped by an operator."""
    COMPLETE = "complete"
    """The last wave baked (late-joining hosts of a 100% last wave are still admitted)."""
    CANCELLED = "cancelled"
    """Another rollout replaced it."""


@dataclass(frozen=True)
class TaskLimits:
    """How a task admits hosts and treats their failures.

    Attributes:
        max_in_flight: hosts that may hold an upgrade slot at once (the seed's queue length).
        lease_s: how long a slot is held without news from its host.
        max_attempts: failed attempts before a host is marked failed for this task.
        retry_backoff_s: wait before a failed host is admitted again (doubles per failure).
        failure_limit: failed hosts after which the task halts and admits nobody.
        restart_grace_s: how long a host may take to restart into the new version and
            report; with its heartbeat interval it sets how soon a host that went silent
            after its order has failed (see :func:`~selfupgrade.server.rules.silence_grace`).
        probation_s: a host first seen after the rollout was published joins it only once it
            has been heard from for this long (0: at once), so that made-up names that appear
            during a rollout cannot take its slots or spend its failure budget.
    """

    max_in_flight: int = 2000
    lease_s: float = 180.0
    max_attempts: int = 3
    retry_backoff_s: float = 120.0
    failure_limit: int = 2000
    restart_grace_s: float = 30.0
    probation_s: float = 300.0

    def __post_init__(self) -> None:
        for name in ("max_in_flight", "max_attempts", "failure_limit"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise FieldError(name, "must be a positive integer")
        for name in ("lease_s", "retry_backoff_s", "restart_grace_s"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or value <= 0
            ):
                raise FieldError(name, "must be a positive, finite number")
        probation = self.probation_s
        if (
            isinstance(probation, bool)
            or not isinstance(probation, (int, float))
            or not math.isfinite(probation)
            or probation < 0
        ):
            raise FieldError("probation_s", "must be a finite number of seconds, 0 or more")


@dataclass(frozen=True)
class Task:
    """One published upgrade.

    Attributes:
        id: unique id, echoed by agents in their heartbeats.
        release: what to install.
        limits: lease, retry and (for a task without a plan) admission limits.
        created_at: wall-clock time of publication.
        allow_downgrade: also move hosts that run a newer version.
        seed: the falcon API's view of the task (``type``, ``wgeturl``, ``version``,
            ``binfile_md5``, ``cfgfile_md5``), for ``GET /agent/upgrade/nowargs``.
        plan: waves, targeting and window; ``None`` is one wave of every host with the
            limits' ``max_in_flight`` and ``failure_limit`` (the falcon API's task).
        kind: ``upgrade``, or ``rollback`` (hosts go back to ``release.version`` from their
            backup generation when they have it).
        rollback_of: the rollout a rollback undoes.
        previous_version: the version most targeted hosts ran when the rollout started.
        manifest: the release's signed manifest, sent to agents with the order.
        shares_slots_with: earlier rollouts (cancelled or replaced) whose hosts were still
            upgrading when this one was published: their live leases count against this
            rollout's limits, and a host holding one is not ordered by this rollout.
    """

    id: str
    release: Release
    limits: TaskLimits = field(default_factory=TaskLimits)
    created_at: float = 0.0
    allow_downgrade: bool = False
    seed: Mapping[str, Any] | None = None
    plan: Plan | None = None
    kind: Literal["upgrade", "rollback"] = "upgrade"
    rollback_of: str = ""
    previous_version: str = ""
    manifest: bytes | None = field(default=None, repr=False)
    shares_slots_with: tuple[str, ...] = ()

    @functools.cached_property
    def effective_plan(self) -> Plan:
        """The plan, or the single wave of a task without one."""
        if self.plan is not None:
            return self.plan
        return Plan.single(self.limits.max_in_flight, self.limits.failure_limit)

    @property
    def version(self) -> Version:
        """The target version."""
        return self.release.version

    def sources(self, field_name: str = "release") -> list[tuple[str, Release]]:
        """The release as each group of hosts gets it, with the request field that gave its
        URLs: ``field_name`` for the release's own, ``plan.mirrors[i]`` for each mirror rule's
        (what the artifact check must fetch)."""
        rules = range(len(self.effective_plan.mirrors))
        return [
            (field_name, self.release),
            *((f"plan.mirrors[{i}]", self.order(i).release) for i in rules),
        ]

    def order(self, mirror_rule: int | None = None) -> UpgradeOrder:
        """The order sent to an admitted host; ``mirror_rule`` (the plan's
        :meth:`~selfupgrade.server.plan.Plan.mirror_rule` for the host) puts that rule's URLs
        first."""
        rollback = self.kind == "rollback"
        release = self.release
        if mirror_rule is not None:
            first = self.effective_plan.mirrors[mirror_rule].artifacts
            release = replace(
                release,
                artifacts=tuple(
                    _sources_first(a, first.get(a.role.value, ())) for a in release.artifacts
                ),
            )
        return UpgradeOrder(
            release,
            task_id=self.id,
            allow_downgrade=self.allow_downgrade or rollback,
            rollback=rollback,
            manifest=self.manifest,
        )

    @property
    def changes_program(self) -> bool:
        """Whether the task installs the program (a new version), not only small files."""
        return Role.BIN in self.release.roles or not self.release.artifacts

    def done_for(self, beat: Heartbeat) -> bool:
        """Whether ``beat``'s host already has this task's result.

        With the program in the release, that is its version. Without it (a config-only task),
        the program's version does not change, so the host is done when the digests it reports
        for those files match the task's.
        """
        if self.changes_program:
            return beat.version == self.version
        for artifact in self.release.artifacts:
            have = beat.files.get(artifact.role.value, {}).get(artifact.digest.algorithm)
            if have is None or not artifact.digest.matches(have):
                return False
        return True

    def seed_view(self) -> dict[str, Any] | None:
        """The task as the falcon protocol shows it (``type``, ``wgeturl``, ``version``,
        md5s), or ``None`` when it cannot be said that way (no md5, another URL layout)."""
        if self.seed is not None:
            return dict(self.seed)
        by_role = {a.role: a for a in self.release.artifacts}
        kind = next((k for k, roles in FALCON_TYPES.items() if set(roles) == set(by_role)), None)
        if kind is None or any(a.digest.algorithm != "md5" for a in by_role.values()):
            return None
        first = next(iter(by_role.values()))
        wgeturl = first.url.rpartition("/")[0]
        if any(a.url != f"{wgeturl}/{a.role.value}_{self.version}" for a in by_role.values()):
            return None
        md5 = {role: a.digest.hex for role, a in by_role.items()}
        return seed_args(
            kind, wgeturl, str(self.version), md5.get(Role.BIN, ""), md5.get(Role.CFG, "")
        )

    def to_json(self) -> dict[str, Any]:
        """A JSON object that :meth:`from_json` reads back."""
        return {
            "id": self.id,
            "order": self.order().to_wire(),
            "limits": asdict(self.limits),
            "created_at": self.created_at,
            "allow_downgrade": self.allow_downgrade,
            "seed": dict(self.seed) if self.seed is not None else None,
            "plan": self.plan.to_json() if self.plan is not None else None,
            "kind": self.kind,
            "rollback_of": self.rollback_of,
            "previous_version": self.previous_version,
            "shares_slots_with": list(self.shares_slots_with),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Task:
        """Read a task written by :meth:`to_json`."""
        order = UpgradeOrder.from_wire(data["order"])
        return cls(
            id=str(data["id"]),
            release=order.release,
            limits=TaskLimits(**data["limits"]),
            created_at=float(data["created_at"]),
            allow_downgrade=bool(data["allow_downgrade"]),
            seed=data.get("seed"),
            plan=Plan.from_json(data["plan"]) if data.get("plan") else None,
            kind=data.get("kind", "upgrade"),
            rollback_of=data.get("rollback_of", ""),
            previous_version=data.get("previous_version", ""),
            manifest=order.manifest,
            shares_slots_with=tuple(data.get("shares_slots_with", ())),
        )


class HostState(TextEnum):
    """Where one host stands in one rollout."""

    ADMITTED = "admitted"
    """Holds an upgrade slot (a lease)."""
    DONE = "done"
    """Confirmed the rollout's version."""
    BACKOFF = "backoff"
    """An attempt failed; it may be admitted again after a while."""
    FAILED = "failed"
    """Given up on for this rollout."""


@dataclass(frozen=True, slots=True)
class HostProgress:
    """Where one host stands in one task.

    Attributes:
        host: the host id.
        state: see :class:`HostState`.
        attempts: failed attempts so far.
        lease_until: while admitted, when the slot is released without news.
        next_try_at: while backing off, when the host may be admitted again.
        started: while admitted, the host was seen working on the order.
        failures_at_admit: the host's own failure count when it was admitted.
        reason: why the last attempt failed.
        admitted_at: when the host was last given a slot.
        done_at: when it confirmed the new version.
        process: the agent process its order went to (see
            :attr:`~selfupgrade.models.Heartbeat.process`).
        idle_beats: heartbeats from that process since the order that showed the old version
            and no download (an unmodified falcon agent: one may have crossed the order).
        grace_s: while admitted, how long the host may stay silent before its attempt fails
            (0: the task's ``lease_s``); each heartbeat renews the lease by it.
        rev: the record's revision in its store (0: never stored); a store commits a change
            only while the record is still at the revision the change was computed from.
    """

    host: str
    state: HostState
    attempts: int = 0
    lease_until: float = 0.0
    next_try_at: float = 0.0
    started: bool = False
    failures_at_admit: int = 0
    reason: str = ""
    admitted_at: float = 0.0
    done_at: float = 0.0
    process: str = ""
    idle_beats: int = 0
    grace_s: float = 0.0
    rev: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.state, HostState):
            object.__setattr__(self, "state", HostState(self.state))

    def to_json(self) -> dict[str, Any]:
        """A JSON object for stores and APIs (the revision is the store's, kept apart)."""
        return {
            "host": self.host,
            "state": self.state.value,
            "attempts": self.attempts,
            "lease_until": self.lease_until,
            "next_try_at": self.next_try_at,
            "started": self.started,
            "failures_at_admit": self.failures_at_admit,
            "reason": self.reason,
            "admitted_at": self.admitted_at,
            "done_at": self.done_at,
            "process": self.process,
            "idle_beats": self.idle_beats,
            "grace_s": self.grace_s,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], rev: int = 0) -> HostProgress:
        """Read what :meth:`to_json` wrote, at store revision ``rev``."""
        return cls(
            host=str(data["host"]),
            state=HostState(data["state"]),
            attempts=int(data.get("attempts", 0)),
            lease_until=float(data.get("lease_until", 0.0)),
            next_try_at=float(data.get("next_try_at", 0.0)),
            started=bool(data.get("started", False)),
            failures_at_admit=int(data.get("failures_at_admit", 0)),
            reason=str(data.get("reason", "")),
            admitted_at=float(data.get("admitted_at", 0.0)),
            done_at=float(data.get("done_at", 0.0)),
            process=str(data.get("process", "")),
            idle_beats=int(data.get("idle_beats", 0)),
            grace_s=float(data.get("grace_s", 0.0)),
            rev=rev,
        )

    def with_(self, **changes: Any) -> HostProgress:
        """A copy with ``changes``."""
        return replace(self, **changes)


@dataclass(frozen=True, slots=True)
class HostRead:
    """What a store holds of one host in one rollout.

    Attributes:
        host: the host id.
        progress: its progress, ``None`` before its first admission.
        wave: its wave, ``None`` when it is not a member of the rollout.
    """

    host: str
    progress: HostProgress | None = None
    wave: int | None = None

    @property
    def rev(self) -> int:
        """The revision of the progress record (0: none)."""
        return self.progress.rev if self.progress is not None else 0


@dataclass(frozen=True)
class WaveCounters:
    """How one wave is going.

    Attributes:
        members: hosts in the wave.
        done: hosts that confirmed the new version.
        failed: hosts given up on.
        failures: failed attempts of the wave's hosts.
    """

    members: int = 0
    done: int = 0
    failed: int = 0
    failures: int = 0


@dataclass(frozen=True)
class RolloutState:
    """A rollout's mutable state, as a store holds it: a few fields, named counters, and the
    number of live leases. What the counters mean is the rulebook's
    (:mod:`selfupgrade.server.rules`); a store only adds to them.

    Attributes:
        status: see :class:`Status`.
        halt_reason: why it halted, or who aborted it.
        wave: index of the current wave.
        wave_done_at: when every host of the current wave had settled (the bake started).
        counters: ``done``, ``failed``, ``failures`` and ``w<k>:members|done|failed|failures``.
        in_flight: live leases (slots held) when it was read.
    """

    status: Status = Status.ACTIVE
    halt_reason: str = ""
    wave: int = 0
    wave_done_at: float | None = None
    counters: Mapping[str, int] = field(default_factory=dict)
    in_flight: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.status, Status):
            object.__setattr__(self, "status", Status(self.status))

    @property
    def done(self) -> int:
        """Hosts that finished."""
        return self.counters.get("done", 0)

    @property
    def failed(self) -> int:
        """Hosts given up on."""
        return self.counters.get("failed", 0)

    @property
    def failures(self) -> int:
        """Failed attempts, all hosts together."""
        return self.counters.get("failures", 0)

    @property
    def silent(self) -> int:
        """Failed attempts of hosts that went silent after their order (among ``failures``)."""
        return self.counters.get("silent", 0)

    @property
    def waves(self) -> tuple[WaveCounters, ...]:
        """The counters of each wave."""
        out = []
        k = 0
        while f"w{k}:members" in self.counters:
            get = self.counters.get
            out.append(
                WaveCounters(
                    get(f"w{k}:members", 0),
                    get(f"w{k}:done", 0),
                    get(f"w{k}:failed", 0),
                    get(f"w{k}:failures", 0),
                )
            )
            k += 1
        return tuple(out)

    def fields(self) -> dict[str, Any]:
        """The fields a commit may guard or set (:data:`ROLLOUT_FIELDS`), by name."""
        return {name: getattr(self, name) for name in ROLLOUT_FIELDS}


ROLLOUT_FIELDS = ("status", "halt_reason", "wave", "wave_done_at")
"""The fields of a rollout's state a commit may guard or set (:meth:`RolloutState.fields`)."""

NO_ROLLOUT = RolloutState(status=Status.CANCELLED)
"""What a store answers for a rollout it does not hold."""


@dataclass(frozen=True, slots=True)
class HostSeen:
    """The last heartbeat of a host, as the fleet view keeps it.

    Attributes:
        address: the network address the host's name is bound to (the first it was heard
            from; ``""``: not bound, see :mod:`~selfupgrade.server.admission`).
        since: when the host was first heard from (0: before this was recorded).
    """

    host: str
    version: str
    state: str
    seen_at: float
    error: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    address: str = ""
    since: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """A JSON object for stores and APIs."""
        return {
            "host": self.host,
            "version": self.version,
            "state": self.state,
            "seen_at": self.seen_at,
            "error": self.error,
            "labels": dict(self.labels),
            "address": self.address,
            "since": self.since,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> HostSeen:
        """Read what :meth:`to_json` wrote."""
        return cls(**data)


def task_from_seed(
    body: object, *, limits: TaskLimits, now: float, task_id: str | None = None
) -> Task:
    """Build a task from the falcon API's ``POST /agent/upgrade`` body.

    Artifacts are at ``<wgeturl>/bin_<version>`` and ``<wgeturl>/cfg_<version>``, checked by md5.

    Raises:
        FieldError: naming the field: ``wgeturl`` or ``version`` missing, ``type`` not 0/1/2,
            the md5 a type needs missing or not 32 hex digits, a version that is not one, a URL
            that is not http/https.
    """
    if not isinstance(body, Mapping):
        raise FieldError("body", "must be a JSON object")
    wgeturl = body.get("wgeturl")
    version_text = body.get("version")
    if not isinstance(wgeturl, str) or not wgeturl:
        raise FieldError("wgeturl", "is required")
    if not isinstance(version_text, str) or not version_text:
        raise FieldError("version", "is required")
    try:
        parse_version(version_text)
    except ValueError as exc:
        raise FieldError("version", str(exc)) from None
    kind = body.get("type", 0)
    if isinstance(kind, bool) or not isinstance(kind, int) or kind not in FALCON_TYPES:
        raise FieldError("type", f"must be 0 (bin), 1 (cfg) or 2 (both), got {kind!r}")
    try:
        check_url(wgeturl)
    except ValueError as exc:
        raise FieldError("wgeturl", str(exc)) from None
    digests = {"binfile_md5": "", "cfgfile_md5": ""}
    for name in digests:
        value = body.get(name, "")
        if not isinstance(value, str):
            raise FieldError(name, "must be a string")
        needed = Role(name[:3]) in FALCON_TYPES[kind]
        if needed and not value:
            raise FieldError(name, f"is required for type {kind}")
        if needed:
            try:
                digests[name] = Digest("md5", value).hex
            except ValueError as exc:
                raise FieldError(name, str(exc)) from None
    allow_downgrade = body.get("allow_downgrade", False)
    if not isinstance(allow_downgrade, bool):
        raise FieldError("allow_downgrade", "must be true or false")
    release = falcon_release(
        kind, wgeturl, version_text, digests["binfile_md5"], digests["cfgfile_md5"]
    )
    return Task(
        id=task_id or secrets.token_hex(8),
        release=release,
        limits=limits,
        created_at=now,
        allow_downgrade=allow_downgrade,
        seed=seed_args(kind, wgeturl, version_text, digests["binfile_md5"], digests["cfgfile_md5"]),
    )


def seed_args(kind: int, wgeturl: str, version: str, bin_md5: str, cfg_md5: str) -> dict[str, Any]:
    """The falcon ``AgentUpgradeArgs`` object, in its JSON key order."""
    return {
        "type": kind,
        "wgeturl": wgeturl,
        "version": version,
        "binfile_md5": bin_md5,
        "cfgfile_md5": cfg_md5,
    }


def _sources_first(artifact: Artifact, urls: tuple[str, ...]) -> Artifact:
    """``artifact`` with ``urls`` tried before its own URL and mirrors (each URL once)."""
    if not urls:
        return artifact
    ordered = list(dict.fromkeys((*urls, *artifact.urls)))
    return replace(artifact, url=ordered[0], mirrors=tuple(ordered[1:]))
