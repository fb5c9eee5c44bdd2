"""The Installer role and its implementations."""

from .base import (
    DEFAULT_MODES,
    BootReport,
    ConfirmPolicy,
    Installer,
    InstallerStatus,
    LastResult,
    Pending,
    StagedFile,
)
from .triple import TripleInstaller

__all__ = [
    "DEFAULT_MODES",
    "BootReport",
    "ConfirmPolicy",
    "Installer",
    "InstallerStatus",
    "LastResult",
    "Pending",
    "StagedFile",
    "TripleInstaller",
]
