"""Reading a rollout from the API's JSON: a release and a plan, validated field by field.

Two forms are accepted by ``POST /selfupgrade/v1/rollouts``::

    {"release": {"version": "6.0.1",
                 "artifacts": {"bin": {"url": "https://files/bin_6.0.1", "digest": "sha256:..."}}},
     "plan": {...}, "limits": {"lease_s": 180, "max_attempts": 3, "retry_backoff_s": 120},
     "allow_downgrade": false}

or the falcon API's fields (``wgeturl``, ``version``, ``binfile_md5``, ``cfgfile_md5``,
``type``) with a ``plan`` beside them.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from ..models import Release, UpgradeOrder
from ._fields import FieldError
from .plan import Plan
from .tasks import Task, TaskLimits, task_from_seed

__all__ = ["release_from_json", "rollout_from_json"]

_TOP = {
    "release",
    "plan",
    "limits",
    "allow_downgrade",
    "wgeturl",
    "version",
    "binfile_md5",
    "cfgfile_md5",
    "type",
    "manifest",
}


def release_from_json(data: object, name: str) -> Release:
    """A release from ``{"version": ..., "artifacts": {...}}`` (the order's wire form).

    Raises:
        FieldError: naming ``name`` and what is wrong.
    """
    if not isinstance(data, Mapping):
        raise FieldError(name, "must be a JSON object")
    try:
        # parsed as a rollback order so that an empty artifact list reaches the caller's check
        order = UpgradeOrder.from_wire({**data, "task_id": "", "rollback": True})
    except ValueError as exc:
        raise FieldError(name, str(exc)) from None
    return order.release


def _limits(data: object, defaults: TaskLimits) -> TaskLimits:
    if data is None:
        return defaults
    if not isinstance(data, Mapping):
        raise FieldError("limits", "must be a JSON object")
    allowed = {"lease_s", "max_attempts", "retry_backoff_s"}
    unknown = sorted(str(k) for k in data if k not in allowed)
    if unknown:
        raise FieldError(f"limits.{unknown[0]}", f"unknown field; allowed: {sorted(allowed)}")
    try:
        return replace(defaults, **data)
    except (TypeError, ValueError) as exc:
        field = getattr(exc, "field", "limits")
        raise FieldError(f"limits.{field}" if field != "limits" else field, str(exc)) from None


def rollout_from_json(body: object, defaults: TaskLimits, now: float) -> Task:
    """Validate a rollout request and build the task.

    Raises:
        FieldError: naming the field (``plan.waves[0].percent``, ``release.version``, ...).
    """
    if not isinstance(body, Mapping):
        raise FieldError("body", "must be a JSON object")
    unknown = sorted(str(k) for k in body if k not in _TOP)
    if unknown:
        raise FieldError(unknown[0], f"unknown field; allowed: {sorted(_TOP)}")
    if "plan" not in body:
        raise FieldError("plan", "is required (the falcon API's POST /agent/upgrade has none)")
    plan = Plan.from_json(body["plan"])
    limits = _limits(body.get("limits"), defaults)
    allow_downgrade = body.get("allow_downgrade", False)
    if not isinstance(allow_downgrade, bool):
        raise FieldError("allow_downgrade", "must be true or false")
    manifest = body.get("manifest")
    if manifest is not None:
        if isinstance(manifest, Mapping):
            manifest = json.dumps(manifest)
        if not isinstance(manifest, str) or len(manifest) > 256 * 1024:
            raise FieldError("manifest", "must be the signed manifest (JSON), at most 256 KiB")
    manifest_bytes = manifest.encode() if manifest is not None else None
    task_id = secrets.token_hex(8)
    if "release" in body:
        release = release_from_json(body["release"], "release")
        if not release.artifacts:
            raise FieldError("release.artifacts", "must name at least one artifact")
        return Task(
            task_id, release, limits, now, allow_downgrade, plan=plan, manifest=manifest_bytes
        )
    seed_keys = _TOP - {"release", "plan", "limits", "manifest"}
    seed: dict[str, Any] = {k: body[k] for k in seed_keys if k in body}
    task = task_from_seed(seed, limits=limits, now=now, task_id=task_id)
    return replace(task, plan=plan, manifest=manifest_bytes)
