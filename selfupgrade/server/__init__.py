"""The control plane (hbs): rollouts, admission with per-host leases, stores, the HTTP API.

Every rollout rule lives in the rulebook (:mod:`~selfupgrade.server.rules`, pure); a store
(:mod:`~selfupgrade.server.stores`: memory, SQLite, Redis with the ``redis`` extra) keeps state
and commits what a rule decided, guarded by what it assumed; :class:`ControlPlane` ties them
together for every front end: the ASGI app (:func:`selfupgrade.server.app.create_app`,
``server`` extra), the falcon JSON-RPC listener (:mod:`selfupgrade.server.falcon_rpc`) and the
fleet simulator. ``docs/architecture.md`` draws the layers.

Nothing here is imported by the agent side.
"""

from .artifacts import ArtifactCheck, ArtifactUnavailable
from .effects import Commit, Guard, HostWrite, Outcome
from .plane import ControlPlane, PlaneConfig, Reply
from .rules import Action, Decision, decide
from .stores import MemoryStore, SqliteStore, Store, StoreError, open_store
from .tasks import (
    FieldError,
    HostProgress,
    HostRead,
    HostSeen,
    HostState,
    RolloutState,
    Status,
    Task,
    TaskLimits,
    task_from_seed,
)

__all__ = [
    "Action",
    "ArtifactCheck",
    "ArtifactUnavailable",
    "Commit",
    "ControlPlane",
    "Decision",
    "FieldError",
    "Guard",
    "HostProgress",
    "HostRead",
    "HostSeen",
    "HostState",
    "HostWrite",
    "MemoryStore",
    "Outcome",
    "PlaneConfig",
    "Reply",
    "RolloutState",
    "SqliteStore",
    "Status",
    "Store",
    "StoreError",
    "Task",
    "TaskLimits",
    "decide",
    "open_store",
    "task_from_seed",
]
