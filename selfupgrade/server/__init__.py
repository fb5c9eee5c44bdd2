"""The control plane (hbs): tasks, admission with per-host leases, stores, the HTTP API.

The pure core (:mod:`~selfupgrade.server.core`) decides what a heartbeat means; a store
(:class:`SqliteStore`, :class:`RedisStore` with the ``redis`` extra, :class:`MemoryStore`)
carries it out atomically; :class:`ControlPlane` ties them together for every front end:
the ASGI app (:func:`selfupgrade.server.app.create_app`, ``server`` extra) and the falcon
JSON-RPC listener (:mod:`selfupgrade.server.falcon_rpc`).

Nothing here is imported by the agent side.
"""

from .core import Action, Decision, decide
from .memory import MemoryStore
from .plane import ControlPlane, PlaneConfig
from .sqlite import SqliteStore
from .store import Store, StoreError
from .tasks import (
    FieldError,
    HostProgress,
    HostSeen,
    Task,
    TaskCounters,
    TaskLimits,
    task_from_seed,
)

__all__ = [
    "Action",
    "ControlPlane",
    "Decision",
    "FieldError",
    "HostProgress",
    "HostSeen",
    "MemoryStore",
    "PlaneConfig",
    "SqliteStore",
    "Store",
    "StoreError",
    "Task",
    "TaskCounters",
    "TaskLimits",
    "decide",
    "task_from_seed",
]
