"""Housekeeping: the control plane's periodic work, run every second by hbs.

Flush the fleet view to the store; forget hosts silent for ``host_ttl_s``; expire the leases
that ran out without news (each a failed attempt, :func:`~selfupgrade.server.rules.expire`;
not those that ran out while hbs could not hear anyone: a store outage, a stalled store, hbs
stopped); count the lost hosts of the current wave and move the rollout on
(:func:`~selfupgrade.server.rules.advance`: bake, promote, complete).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

from . import rules
from ._retry import commit_until_settled
from .artifacts import ArtifactUnavailable
from .context import PlaneContext, PlaneJob
from .effects import Commit, Outcome
from .stores.base import StoreError
from .tasks import RolloutState, Status, Task

__all__ = ["Housekeeping"]

log = logging.getLogger("selfupgrade.server")


class Housekeeping(PlaneJob):
    """Periodic work over a store; see the module docstring."""

    def __init__(self, context: PlaneContext, pause: Callable[[str, str], bool]) -> None:
        super().__init__(context)
        self._pause = pause
        self._silent: tuple[str, int, float, list[str]] = ("", -1, -1e18, [])
        self._members: tuple[tuple[str, int, int], list[str]] = (("", -1, -1), [])
        self._checked: tuple[str, float] = ("", 0.0)
        # When a tick last completed: a longer gap than deaf_after_s means hbs could not hear
        # anyone meanwhile (the store failed or stalled, hbs was stopped or paused). Before
        # this process started, nobody may have heard either (hbs was down).
        self._heard_until = self._clock()
        self._deaf: tuple[float, float] | None = (-math.inf, self._heard_until)
        self._forgot_at = -math.inf

    FORGET_EVERY_S = 3600.0
    """How often hosts silent for longer than ``host_ttl_s`` are looked for."""

    def tick(self) -> None:
        """Flush, expire leases, advance the rollout. A store failure is logged; the next
        tick tries again."""
        self._fleet.flush()
        self._forget_silent_hosts()
        try:
            task_id = self._store.active_id()
            task = self._store.task(task_id) if task_id is not None else None
            if task is None:
                return
            now = self._clock()
            if now - self._heard_until > self._config.deaf_after_s:
                since = self._deaf[0] if self._deaf is not None else self._heard_until
                self._deaf = (since, now)
            expired = self.expire(task, now, deaf=self._deaf)
            if expired:
                log.debug("%s: %d host(s) silent past their grace", task.id, expired)
            rollout = self._store.rollout(task.id, now)
            step = rules.advance(task, rollout, lost=self._lost(task, rollout, now), now=now)
            if rollout.status == Status.ACTIVE and not self._artifacts_still_there(
                task, now, before_wave=step is not None and step.kind == "promote"
            ):
                return
            if step is not None and self._store.commit([step.commit])[0] == Outcome.OK:
                if step.kind == "promote":
                    log.info("%s: wave %d promoted", task.id, step.wave + 1)
                elif step.kind == "complete":
                    log.info("%s complete", task.id)
                self._cache.forget()
            self._heard_until, self._deaf = self._clock(), None
        except StoreError as exc:
            log.error("periodic work failed (will retry): %s", exc)

    def _forget_silent_hosts(self) -> None:
        """Hourly: forget the hosts no replica has heard from for ``host_ttl_s``."""
        now = self._clock()
        if now - self._forgot_at < self.FORGET_EVERY_S:
            return
        self._forgot_at = now
        try:
            gone = self._fleet.forget_silent(now - self._config.host_ttl_s)
        except StoreError as exc:
            log.error("could not forget silent hosts (will retry): %s", exc)
            return
        if gone:
            log.info(
                "forgot %d host(s) silent for %g days: %s",
                len(gone),
                self._config.host_ttl_s / 86400,
                ", ".join(sorted(gone)[:20]) + (" ..." if len(gone) > 20 else ""),
            )

    def _artifacts_still_there(self, task: Task, now: float, *, before_wave: bool) -> bool:
        """Check the active rollout's artifacts again before a wave starts and every
        ``artifact_recheck_s``; when one is gone or changed, pause the rollout with the reason
        and return ``False``."""
        check = self._config.artifact_check
        if check is None or not task.release.artifacts:
            return True
        last_id, last_at = self._checked
        if last_id != task.id and not before_wave:
            self._checked = (task.id, now)  # checked when it was published
            return True
        if not before_wave and now - last_at < self._config.artifact_recheck_s:
            return True
        self._checked = (task.id, now)
        try:
            check.check_all(task.sources())
        except ArtifactUnavailable as exc:
            reason = f"artifact check failed: {exc}".replace("; nothing was published", "")
            log.error("%s: pausing: %s", task.id, reason)
            self._pause(task.id, reason)
            self._cache.forget()
            return False
        return True

    def expire(self, task: Task, now: float, *, deaf: tuple[float, float] | None = None) -> int:
        """Fail the attempts whose lease ran out by ``now``; return how many. Leases that ran
        out while hbs could not hear (``deaf``: since, until) get a new grace instead.

        Raises:
            StoreError: the store failed.
        """
        count = 0
        due = self._store.due(task.id, now)
        partition = self._partition(task, now, due) if due else ""
        for host in due:
            decided: list[Commit | None] = [None]

            def decide(host: str = host, decided: list[Commit | None] = decided) -> Commit | None:
                rollout = self._store.rollout(task.id, now)
                read = self._store.read(task.id, [host])[0]
                decided[0] = rules.expire(
                    task, rollout, read, now, deaf=deaf, partition=bool(partition)
                )
                return decided[0]

            outcome = commit_until_settled(self._store, decide, what=f"expire {host}")
            commit = decided[0]
            if outcome == Outcome.OK and commit is not None and not commit.add and partition:
                log.warning(
                    "%s: %s's lease ran out while %s: renewed, its slot kept",
                    task.id,
                    host,
                    partition,
                )
            elif outcome == Outcome.OK and commit is not None and not commit.add and deaf:
                log.info("%s: %s's lease ran out while hbs could not hear: renewed", task.id, host)
            if outcome == Outcome.OK and commit is not None and commit.add:
                log.warning(
                    "%s failed an attempt at %s: %s",
                    host,
                    task.id,
                    commit.writes[0].progress.reason,
                )
                self._cache.freed()
                count += 1
        return count

    PARTITION_WINDOW_LEASES = 10.0
    """Hosts heard within this many lease times count in the partition test."""

    def _partition(self, task: Task, now: float, due: Sequence[str]) -> str:
        """Why the silence of the ``due`` hosts looks like a network partition ("" when it
        does not): at least ``partition_share`` of the other hosts heard lately, and at
        least three, went silent as well, not counting any that may hold a slot (the hosts
        a bad release bricked are slot holders, silent together: never a partition)."""
        share = self._config.partition_share
        if share <= 0:
            return ""
        lease = task.limits.lease_s
        silent, heard = self._fleet.quiet(
            now,
            window_s=self.PARTITION_WINDOW_LEASES * lease,
            silent_after_s=lease,
            besides=set(due),
        )
        holders = self._store.rollout(task.id, now).in_flight
        without_slot = silent - holders  # at least this many silent hosts hold no slot
        if without_slot < 3 or without_slot < share * heard:
            return ""
        return (
            f"{silent} of {heard} other hosts heard lately went silent too, at least "
            f"{without_slot} of them without a slot (a network partition?)"
        )

    def _is_lost(self, task: Task, last: float | None, host: str, now: float) -> bool:
        lost_after = self._config.lost_after_leases
        return rules.is_lost(task, last, now, lost_after, self._fleet.interval(host))

    def _lost(self, task: Task, rollout: RolloutState, now: float) -> int:
        """Members of the current wave that have not settled and stopped heartbeating.

        The wave's member list is read from the store once and kept while the wave's member
        count is unchanged (a late joiner changes it). Finding the silent ones scans that
        list against this process's last heartbeats, in memory, at most every half lease (a
        host is lost only after ``lost_after_leases`` leases of silence); in between, only
        the hosts found silent are checked again. Only the silent ones are read from the
        store, to leave out those that settled: a scan costs the store the work of the
        silent hosts, not of the whole wave.
        """
        wave = rollout.wave
        waves = rollout.waves
        if wave >= len(waves):
            return 0
        c = waves[wave]
        if c.done + c.failed >= c.members:
            return 0
        last = self._fleet.last_beats()
        task_id, cached_wave, scanned_at, silent = self._silent
        if task_id != task.id or cached_wave != wave or now - scanned_at >= task.limits.lease_s / 2:
            # silent for lost_after_leases leases at least (a host's own interval can only
            # lengthen that), the test most members fail; then the whole one
            get = last.get
            cutoff = now - self._config.lost_after_leases * task.limits.lease_s
            silent = [
                h
                for h in self._wave_members(task, wave, c.members)
                if ((seen := get(h)) is None or seen < cutoff) and self._is_lost(task, seen, h, now)
            ]
            silent = self._unsettled(task, silent)
            self._silent = (task.id, wave, now, silent)
            return len(silent)
        still = [h for h in silent if self._is_lost(task, last.get(h), h, now)]
        return len(self._unsettled(task, still))

    def _unsettled(self, task: Task, hosts: list[str]) -> list[str]:
        """Those of ``hosts`` that have not settled, read from the store in batches."""
        out: list[str] = []
        for i in range(0, len(hosts), 10_000):
            reads = self._store.read(task.id, hosts[i : i + 10_000])
            out.extend(r.host for r in reads if not rules.settled(r.progress))
        return out

    def _wave_members(self, task: Task, wave: int, count: int) -> list[str]:
        """The members of ``wave``, read from the store when the task, the wave or its
        member count (``count``) changed since the last read."""
        key = (task.id, wave, count)
        if self._members[0] != key:
            hosts = [h for h, w in self._store.members(task.id).items() if w == wave]
            self._members = (key, hosts)
        return self._members[1]
