"""The Restarter role and its implementations (systemd, supervisord, execv, overlap)."""

from .base import Restarter
from .execv import ExecRestarter
from .overlap import OverlapRestarter
from .supervisor import SupervisorRestarter
from .systemd import (
    SystemdRestarter,
    notify_ready,
    notify_status,
    notify_watchdog,
    watchdog_interval_s,
)

__all__ = [
    "ExecRestarter",
    "OverlapRestarter",
    "Restarter",
    "SupervisorRestarter",
    "SystemdRestarter",
    "notify_ready",
    "notify_status",
    "notify_watchdog",
    "watchdog_interval_s",
]
