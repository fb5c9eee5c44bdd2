"""The Store seam: where rollouts, hosts' progress and leases, the fleet view and bad
versions are kept. A store keeps state and commits; it knows no rollout rule.

What every store must do (``docs/roles/store.md`` says it at length, and
``tests/test_store_contract.py`` checks it on every store):

* :meth:`Store.commit` carries out each :class:`~selfupgrade.server.effects.Commit`
  atomically: either every guard holds and every change is made, or nothing changes and the
  answer says why (``FULL``: the slot guard; ``STALE``: any other guard). Commits of one call
  are applied one after the other, each on its own; no number of concurrent callers, threads
  or processes may make a slot guard pass that the commits applied one at a time would fail.
* Reads may be stale (the rules guard what they assumed), but never torn: a progress record
  is read with the revision it was committed at.
* Every call has a deadline; a backend that fails or does not answer raises
  :class:`StoreError` (the control plane then answers heartbeats "no order": it fails
  closed). Nothing else escapes.

Four concerns, one protocol each: :class:`RolloutStore` (the rollouts),
:class:`ProgressStore` (hosts within a rollout, their leases, and commits),
:class:`FleetStore` (the last heartbeat of every host) and :class:`VersionStore` (versions
marked bad). :class:`Store` is all four, plus :meth:`Store.ping` and :meth:`Store.close`.

:func:`open_store` picks a store from a URL: ``memory:``, ``sqlite:PATH``, ``redis://...``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol, runtime_checkable

from ...errors import RetryLater
from ..effects import Commit, Outcome
from ..tasks import HostProgress, HostRead, HostSeen, RolloutState, Task

__all__ = [
    "FleetStore",
    "ProgressStore",
    "RolloutStore",
    "Store",
    "StoreError",
    "VersionStore",
    "open_store",
]


class StoreError(RetryLater):
    """The store's backend failed or did not answer in time (a database error, Redis
    unreachable or stopped)."""


class RolloutStore(Protocol):
    """The rollouts: their tasks, members, and state."""

    def publish(self, task: Task, members: Mapping[str, int], counters: Mapping[str, int]) -> None:
        """Store ``task`` as a new, ``active`` rollout on its first wave, with ``members``
        (host -> wave) and its initial ``counters``, and make it the active one."""

    def active_id(self) -> str | None:
        """The id of the active rollout, if any."""

    def task(self, task_id: str) -> Task | None:
        """A stored rollout's task by id."""

    def tasks(self) -> list[Task]:
        """Every stored rollout's task, newest first (at most 200)."""

    def rollout(self, task_id: str, now: float) -> RolloutState:
        """The rollout's state, with the leases live at ``now`` counted (``NO_ROLLOUT`` when
        it is not stored)."""

    def members(self, task_id: str) -> dict[str, int]:
        """Every member of the rollout and its wave."""


class ProgressStore(Protocol):
    """Hosts within a rollout: their progress and leases, and the atomic commit."""

    def read(self, task_id: str, hosts: Sequence[str]) -> list[HostRead]:
        """Each host's progress (with its revision) and wave, in the order asked."""

    def all_progress(self, task_id: str) -> list[HostProgress]:
        """Every progress record of the rollout."""

    def due(self, task_id: str, now: float, limit: int = 1000) -> list[str]:
        """Hosts whose lease in the rollout ran out by ``now`` (at most ``limit``)."""

    def commit(self, commits: Sequence[Commit]) -> list[Outcome]:
        """Carry out each commit atomically if its guards hold; see the module docstring."""


class FleetStore(Protocol):
    """The fleet view: the last heartbeat of every host, from every hbs."""

    def save_hosts(self, seen: Iterable[HostSeen]) -> None:
        """Record these hosts' latest heartbeats."""

    def hosts(self) -> dict[str, HostSeen]:
        """The latest heartbeat of every host."""

    def forget_hosts(self, hosts: Iterable[str]) -> None:
        """Drop these hosts' records (hosts silent for longer than the fleet keeps them)."""


class VersionStore(Protocol):
    """Versions no rollout may install again."""

    def mark_bad(self, version: str, reason: str) -> None:
        """Record that no later rollout may install ``version``."""

    def bad_versions(self) -> dict[str, str]:
        """Versions marked bad, with why."""


@runtime_checkable
class Store(RolloutStore, ProgressStore, FleetStore, VersionStore, Protocol):
    """Everything the control plane keeps."""

    def ping(self) -> None:
        """Check that the backend answers.

        Raises:
            StoreError: it does not.
        """

    def stats(self) -> dict[str, float]:
        """Figures about the backend for metrics (for example ``round_trips``); may be empty."""

    def close(self) -> None:
        """Release connections and files."""


def open_store(url: str, *, timeout_s: float = 2.0) -> Store:
    """The store a URL names.

    ``memory:`` (nothing kept; for tests), ``sqlite:PATH`` or ``sqlite:///abs/path`` (the
    embedded store of one hbs), ``redis://HOST:PORT/DB``, ``rediss://...`` or
    ``unix:///path/redis.sock`` (shared by several hbs; needs the ``redis`` extra).

    Raises:
        ValueError: the URL names no store this library has.
        StoreError: the store cannot be opened.
    """
    if url == "memory:":
        from .memory import MemoryStore

        return MemoryStore()
    if url.startswith("sqlite:"):
        path = url[len("sqlite:") :]
        path = path[2:] if path.startswith("//") else path
        if not path:
            raise ValueError("a sqlite store URL needs a path: sqlite:/var/lib/hbs/hbs.db")
        from .sqlite import SqliteStore

        return SqliteStore(path)
    if url.startswith(("redis://", "rediss://", "unix://")):
        from .redis import RedisStore

        return RedisStore(url, timeout_s=timeout_s)
    raise ValueError(
        f"store URL {url!r} is not one of memory:, sqlite:PATH, redis://HOST:PORT/DB, "
        "rediss://..., unix:///path"
    )
