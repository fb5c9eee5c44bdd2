"""The Restarter role and its implementations (systemd, supervisord, execv)."""

from .base import Restarter
from .execv import ExecRestarter
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
    "Restarter",
    "SupervisorRestarter",
    "SystemdRestarter",
    "notify_ready",
    "notify_status",
    "notify_watchdog",
    "watchdog_interval_s",
]
