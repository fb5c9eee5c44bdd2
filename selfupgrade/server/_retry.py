"""Commit what a rule decided; when the store says ``STALE``, read again and ask again."""

from __future__ import annotations

from collections.abc import Callable

from .effects import Commit, Outcome
from .stores.base import ProgressStore, StoreError

__all__ = ["commit_until_settled"]

TRIES = 5


def commit_until_settled(
    store: ProgressStore, decide: Callable[[], Commit | None], *, what: str
) -> Outcome | None:
    """Call ``decide()`` (which reads what it needs and returns a commit, or ``None`` when
    there is nothing to do) and commit its result, again while the store answers ``STALE``.

    Returns:
        the store's last answer, ``None`` when the rule had nothing to do.

    Raises:
        StoreError: the store failed, or the state kept changing under ``what``.
    """
    for _ in range(TRIES):
        commit = decide()
        if commit is None:
            return None
        outcome = store.commit([commit])[0]
        if outcome != Outcome.STALE:
            return outcome
    raise StoreError(f"{what}: the rollout kept changing while it was being committed")
