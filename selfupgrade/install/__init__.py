"""The Installer role and its implementations: :class:`TripleInstaller` (files swapped in
place) and :class:`ReleaseInstaller` (release directories and a ``current`` link), and
:func:`open_installer` (the one a state directory's journal names)."""

from ._journal import open_installer
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
from .releases import ReleaseInstaller
from .triple import TripleInstaller

__all__ = [
    "DEFAULT_MODES",
    "BootReport",
    "ConfirmPolicy",
    "Installer",
    "InstallerStatus",
    "LastResult",
    "Pending",
    "ReleaseInstaller",
    "StagedFile",
    "TripleInstaller",
    "open_installer",
]
