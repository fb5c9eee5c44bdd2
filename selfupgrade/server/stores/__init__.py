"""Stores: where the control plane keeps its state. One module per backend.

:class:`MemoryStore` (tests, the simulator), :class:`SqliteStore` (embedded, one hbs),
:class:`~selfupgrade.server.stores.redis.RedisStore` (several hbs; ``redis`` extra). The seam
they share is :mod:`selfupgrade.server.stores.base`; :func:`open_store` picks one by URL.
"""

from .base import (
    FleetStore,
    ProgressStore,
    RolloutStore,
    Store,
    StoreError,
    VersionStore,
    open_store,
)
from .memory import MemoryStore
from .sqlite import SqliteStore

__all__ = [
    "FleetStore",
    "MemoryStore",
    "ProgressStore",
    "RolloutStore",
    "SqliteStore",
    "Store",
    "StoreError",
    "VersionStore",
    "open_store",
]
