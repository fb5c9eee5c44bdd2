"""Pure decisions on the agent side: no I/O, no clock reads (times are passed in).

The updater asks these functions what to do; they are small so that every rule is tested
directly: whether an order applies to this host, how long to back off, when to beat next.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from .errors import DowngradeRefused
from .models import Digest, Role, UpgradeOrder, Version

__all__ = [
    "FailureRecord",
    "full_jitter",
    "jittered_interval",
    "order_applies",
    "paced_interval",
    "retry_allowed_at",
]


def full_jitter(base_s: float, cap_s: float, attempt: int, uniform: float) -> float:
    """Exponential back-off with full jitter: ``uniform * min(cap_s, base_s * 2**attempt)``.

    ``uniform`` is a random number in [0, 1), passed in so the caller owns the randomness.
    """
    exp = min(cap_s, base_s * math.pow(2.0, min(max(attempt, 0), 62)))
    return min(max(uniform, 0.0), 1.0) * exp


def jittered_interval(interval_s: float, jitter: float, uniform: float) -> float:
    """The next heartbeat delay: ``interval_s`` spread by ``±jitter`` (a fraction, 0 to 1).

    A fleet that beats in lockstep hammers the server in bursts; spreading each beat keeps the
    load flat even when every host started at the same moment.
    """
    jitter = min(max(jitter, 0.0), 1.0)
    return interval_s * (1.0 - jitter + 2.0 * jitter * min(max(uniform, 0.0), 1.0))


PACED_MAX_FACTOR = 15.0
"""An agent's default longest wait at its server's request, in heartbeat intervals."""


def paced_interval(asked_s: float, interval_s: float, paced_max_s: float | None) -> float:
    """The wait until the next heartbeat when the server asked for ``asked_s``: never less
    than the agent's own ``interval_s``, never more than ``paced_max_s`` (``None``:
    :data:`PACED_MAX_FACTOR` intervals)."""
    longest = paced_max_s if paced_max_s is not None else PACED_MAX_FACTOR * interval_s
    return min(max(asked_s, interval_s), longest)


def order_applies(
    order: UpgradeOrder,
    *,
    current: Version,
    installed: Mapping[Role, Mapping[str, str]],
) -> bool:
    """Whether ``order`` asks for a change on this host.

    An order that carries the program (``bin``) is decided by version, as in the falcon
    protocol: equal means done, older is refused unless the order allows a downgrade. An order
    without the program (a config or service-file change) applies when any of its files
    differs from the installed one, since the program's version does not change.

    Args:
        installed: digests of the installed files by role and algorithm.

    Raises:
        DowngradeRefused: the order's version is older and it does not allow a downgrade.
    """
    if Role.BIN in order.release.roles:
        if order.version == current:
            return False
        if order.version < current and not order.allow_downgrade:
            raise DowngradeRefused(
                f"order for {order.version} is older than the running {current} "
                "and does not allow a downgrade"
            )
        return True
    return any(not _same(a.digest, installed.get(a.role, {})) for a in order.release.artifacts)


def _same(expected: Digest, have: Mapping[str, str]) -> bool:
    actual = have.get(expected.algorithm)
    return actual is not None and expected.matches(actual)


@dataclass(frozen=True)
class FailureRecord:
    """How often a version failed on this host, and when it last did."""

    version: str
    attempts: int
    last_failure_at: float


def retry_allowed_at(record: FailureRecord, *, base_s: float, cap_s: float) -> float:
    """When the same version may be tried again: ``last + min(cap, base * 2**(attempts-1))``.

    No jitter here: the server's admission already spreads hosts, and a deterministic time is
    easier to report and to test.
    """
    return record.last_failure_at + min(cap_s, base_s * math.pow(2.0, max(record.attempts - 1, 0)))
