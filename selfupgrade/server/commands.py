"""Operator commands: publish, cancel, pause, resume, abort, roll back, mark a version bad.

Each command reads what it needs, asks the rulebook (:mod:`~selfupgrade.server.rules`) for
the commit, and commits it guarded; when the rollout changed meanwhile, it reads again.
"""

from __future__ import annotations

import logging
import secrets
from collections import Counter
from collections.abc import Mapping
from dataclasses import replace

from packaging.utils import canonicalize_version

from ..models import Release, parse_version
from . import rules
from ._fields import FieldError
from ._retry import commit_until_settled
from .context import PlaneJob
from .effects import Commit, Outcome
from .plan import Plan, Wave, assign_waves
from .rollouts import rollout_from_json
from .tasks import HostState, Status, Task, task_from_seed

__all__ = ["Commands", "NoSuchRollout"]

log = logging.getLogger("selfupgrade.server")

_ACTIONS = {"pause": Status.PAUSED, "resume": Status.ACTIVE, "abort": Status.ABORTED}


class NoSuchRollout(FieldError):
    """No rollout has the id a command named."""

    def __init__(self, task_id: str) -> None:
        super().__init__("id", f"no rollout {task_id}")


class Commands(PlaneJob):
    """What an operator can do to rollouts."""

    def publish(
        self,
        task: Task,
        members: Mapping[str, int] | None = None,
        *,
        artifacts_field: str = "release",
    ) -> Task:
        """Start ``task``; the rollout active until now is cancelled.

        Without ``members``, the targeted hosts are the hosts seen so far whose labels match
        the plan's selector, spread over the waves by a stable hash.

        Raises:
            FieldError: the version was marked bad, or a staged plan matches no known host.
            ArtifactUnavailable: an artifact cannot be fetched as described (the artifact
                check is on); ``artifacts_field`` is the field it names.
            StoreError: the store failed.
        """
        # 6.0.1.0 and 6.0.1 are one version: the list is keyed by its one spelling
        bad = {canonicalize_version(v): why for v, why in self._store.bad_versions().items()}
        why = bad.get(canonicalize_version(str(task.version)))
        if task.kind == "upgrade" and why is not None:
            raise FieldError("version", f"{task.version} is marked bad: {why}")
        self.check_artifacts(task, artifacts_field)
        if members is None:
            seen = self._fleet.all()
            plan = task.effective_plan
            targeted = [h for h, s in seen.items() if plan.matches(s.labels)]
            if not targeted and len(plan.waves) > 1:
                raise FieldError(
                    "plan",
                    "no host that matches the plan has sent a heartbeat yet; a staged rollout "
                    "chooses its waves from the hosts it knows when it starts",
                )
            members = assign_waves(plan, targeted, task.id)
            if not task.previous_version:
                versions = Counter(
                    seen[h].version for h in members if seen[h].version != str(task.version)
                )
                if versions:
                    task = replace(task, previous_version=versions.most_common(1)[0][0])
        previous = self._store.active_id()
        if previous is not None and previous != task.id:
            self._set_status(previous, Status.CANCELLED, f"replaced by {task.id}")
        busy = self._still_upgrading(task.id)
        if busy:
            task = replace(task, shares_slots_with=busy)
            log.info("%s shares its slots with %s until their hosts finish", task.id, busy)
        self._store.publish(task, members, rules.initial_counters(task, members.values()))
        self._cache.forget()
        log.info(
            "published %s: %s to %d host(s), %d wave(s)",
            task.id,
            task.version,
            len(members),
            len(task.effective_plan.waves),
        )
        return task

    def check_artifacts(self, task: Task, field_name: str = "release") -> None:
        """Fetch and check ``task``'s artifacts with the plane's artifact check; with the check
        off, log that they were not checked.

        Raises:
            ArtifactUnavailable: naming the artifact's URL and what was fetched.
        """
        if not task.release.artifacts:
            return
        check = self._config.artifact_check
        if check is None:
            log.warning(
                "%s: the artifacts of %s were not checked (the artifact check is off): an "
                "unreachable URL or a wrong digest will reach the agents",
                task.id,
                task.version,
            )
            return
        check.check_all(task.sources(field_name))

    _RECENT = 20

    def _still_upgrading(self, task_id: str) -> tuple[str, ...]:
        """Recent rollouts other than ``task_id`` with hosts still holding a live lease."""
        now = self._clock()
        return tuple(
            t.id
            for t in self._store.tasks()[: self._RECENT]
            if t.id != task_id and self._store.rollout(t.id, now).in_flight > 0
        )

    def publish_seed(self, body: object) -> Task:
        """Publish a task from the falcon API's body: one wave, the configured limits.

        Raises:
            FieldError: naming the invalid field.
        """
        task = task_from_seed(body, limits=self._config.limits, now=self._clock())
        return self.publish(task, artifacts_field="wgeturl")

    def publish_rollout(self, body: object) -> Task:
        """Publish a rollout from the rollouts API's body (a release and a plan).

        Raises:
            FieldError: naming the invalid field.
        """
        return self.publish(rollout_from_json(body, self._config.limits, self._clock()))

    def cancel(self) -> Task | None:
        """Cancel the active rollout (the falcon API's DELETE): it is aborted, its slots are
        freed, and no rollout is active afterwards. Returns it (``None`` if none)."""
        task_id = self._store.active_id()
        task = self._store.task(task_id) if task_id is not None else None
        if task is None:
            return None
        if not self._set_status(
            task.id, Status.ABORTED, "cancelled by an operator", deactivate=True
        ):
            # Already over (aborted, cancelled): it only stops being the active one.
            self._store.commit([Commit(task.id, self._clock(), deactivate=True)])
        self._cache.forget()
        log.info("cancelled %s", task.id)
        return task

    def control(self, task_id: str, action: str, reason: str = "") -> bool:
        """``pause``, ``resume`` or ``abort`` a rollout; ``False`` when its status does not
        allow it.

        Raises:
            FieldError: an unknown action.
            NoSuchRollout: no rollout ``task_id``.
        """
        status = _ACTIONS.get(action)
        if status is None:
            raise FieldError("action", "must be pause, resume or abort")
        if self._store.task(task_id) is None:
            raise NoSuchRollout(task_id)
        done = self._set_status(task_id, status, reason or f"{action}d by an operator")
        if done:
            log.info("%s %s", action, task_id)
        return done

    def _set_status(
        self, task_id: str, status: Status, reason: str, *, deactivate: bool = False
    ) -> bool:
        task = self._store.task(task_id)
        if task is None:
            return False
        frees = status in (Status.ABORTED, Status.CANCELLED)

        def decide() -> Commit | None:
            now = self._clock()
            rollout = self._store.rollout(task_id, now)
            admitted = (
                [p for p in self._store.all_progress(task_id) if p.state == HostState.ADMITTED]
                if frees
                else []
            )
            return rules.change_status(
                task, rollout, status, reason, admitted, now, deactivate=deactivate
            )

        outcome = commit_until_settled(self._store, decide, what=f"{status.value} {task_id}")
        self._cache.forget()
        return outcome == Outcome.OK

    def rollback(
        self, task_id: str, *, mark_bad: bool = False, release: Release | None = None
    ) -> Task:
        """Take every host that this rollout upgraded back to the version it ran before.

        The rollout is aborted; a new rollout of kind ``rollback`` is started for those hosts,
        under the original's largest concurrency limit. A host restores its backup generation
        when it holds that version; otherwise it installs ``release``'s artifacts, if given.

        Raises:
            NoSuchRollout: no rollout ``task_id``.
            FieldError: no previous version is known.
        """
        original = self._store.task(task_id)
        if original is None:
            raise NoSuchRollout(task_id)
        target = release.version if release is not None else None
        if target is None:
            if not original.previous_version:
                raise FieldError("release", "the previous version is unknown; give the release")
            target = parse_version(original.previous_version)
        self._set_status(task_id, Status.ABORTED, "rolled back by an operator")
        upgraded = {
            p.host
            for p in self._store.all_progress(task_id)
            if p.state in (HostState.DONE, HostState.ADMITTED)
        }
        seen = self._fleet.all()
        upgraded |= {
            h
            for h in self._store.members(task_id)
            if h in seen and seen[h].version == str(original.version)
        }
        if mark_bad:
            self.mark_bad(str(original.version), f"rolled back from rollout {task_id}")
        widest = max(w.max_in_flight for w in original.effective_plan.waves)
        task = Task(
            id=f"{task_id}-rollback-{secrets.token_hex(3)}",
            release=release or Release(target, ()),
            limits=original.limits,
            created_at=self._clock(),
            allow_downgrade=True,
            plan=Plan(
                (
                    Wave(
                        "rollback",
                        percent=100.0,
                        max_in_flight=widest,
                        max_failures=max(len(upgraded), 1),
                    ),
                )
            ),
            kind="rollback",
            rollback_of=task_id,
            previous_version=str(original.version),
        )
        return self.publish(task, members=dict.fromkeys(upgraded, 0))

    def mark_bad(self, version: str, reason: str) -> dict[str, str]:
        """Record that no later rollout may install ``version``; return every bad version.

        Raises:
            FieldError: ``version`` is not a version.
        """
        try:
            parsed = parse_version(version)
        except ValueError as exc:
            raise FieldError("version", str(exc)) from None
        self._store.mark_bad(str(parsed), reason)
        return self._store.bad_versions()

    def rebind(self, host: str) -> bool:
        """Unbind ``host`` from the address hbs first heard it from (the host moved): its
        next heartbeat binds it to the address that one comes from. Return whether hbs knows
        the host. Another hbs replica's binding is lifted at its restart."""
        known = self._fleet.rebind(host)
        if known:
            log.info("%s unbound from its address: its next heartbeat binds it again", host)
        return known
