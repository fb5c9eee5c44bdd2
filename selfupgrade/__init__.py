"""selfupgrade: safe self-upgrade for long-running daemons.

The agent side is four pluggable roles wired by :class:`Updater`:

* Transport (:class:`HttpTransport`, :class:`HttpFetcher`): heartbeats and downloads;
* Verifier (:class:`DigestVerifier`): may these bytes be installed;
* Installer (:class:`TripleInstaller`, or :class:`ReleaseInstaller` for release directories):
  atomic swap, backup generation, crash recovery;
* Restarter (:class:`SystemdRestarter`, :class:`SupervisorRestarter`, :class:`ExecRestarter`,
  :class:`OverlapRestarter`).

Data shared with the control server lives in :mod:`selfupgrade.models`, errors in
:mod:`selfupgrade.errors`, fakes for tests in :mod:`selfupgrade.testing`.
"""

import logging
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _dist_version

from .errors import (
    DeadlineExceeded,
    DigestMismatch,
    DowngradeRefused,
    DownloadError,
    HostNotReady,
    InstallFailed,
    InsufficientSpace,
    InvalidVersion,
    LockBusy,
    OperatorNeeded,
    OrderRejected,
    RecoveryFailed,
    RestartFailed,
    RetryLater,
    SelfUpgradeError,
    SignatureError,
    SizeMismatch,
    TransportError,
    UnsafePath,
    UnsafeURL,
    UntrustedContent,
)
from .install import (
    ConfirmPolicy,
    Installer,
    InstallerStatus,
    ReleaseInstaller,
    StagedFile,
    TripleInstaller,
)
from .models import (
    Artifact,
    Digest,
    Heartbeat,
    Patch,
    Release,
    Role,
    UpgradeOrder,
    UpgradeState,
    Version,
    parse_version,
)
from .restart import (
    ExecRestarter,
    OverlapRestarter,
    Restarter,
    SupervisorRestarter,
    SystemdRestarter,
    notify_ready,
    notify_watchdog,
)
from .transport import Fetcher, HttpFetcher, HttpSettings, HttpTransport, Transport
from .updater import Layout, Updater, UpdaterConfig
from .verify import DigestVerifier, Verifier

try:
    __version__ = _dist_version("selfupgrade")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0"

# A library configures no logging: its records go to whatever the application set up, and
# nowhere (not to stderr through logging's last resort) when it set up nothing.
logging.getLogger("selfupgrade").addHandler(logging.NullHandler())

__all__ = [
    "Artifact",
    "ConfirmPolicy",
    "DeadlineExceeded",
    "Digest",
    "DigestMismatch",
    "DigestVerifier",
    "DowngradeRefused",
    "DownloadError",
    "ExecRestarter",
    "Fetcher",
    "Heartbeat",
    "HostNotReady",
    "HttpFetcher",
    "HttpSettings",
    "HttpTransport",
    "InstallFailed",
    "Installer",
    "InstallerStatus",
    "InsufficientSpace",
    "InvalidVersion",
    "Layout",
    "LockBusy",
    "OperatorNeeded",
    "OrderRejected",
    "OverlapRestarter",
    "Patch",
    "RecoveryFailed",
    "Release",
    "ReleaseInstaller",
    "RestartFailed",
    "Restarter",
    "RetryLater",
    "Role",
    "SelfUpgradeError",
    "SignatureError",
    "SizeMismatch",
    "StagedFile",
    "SupervisorRestarter",
    "SystemdRestarter",
    "Transport",
    "TransportError",
    "TripleInstaller",
    "UnsafePath",
    "UnsafeURL",
    "UntrustedContent",
    "Updater",
    "UpdaterConfig",
    "UpgradeOrder",
    "UpgradeState",
    "Verifier",
    "Version",
    "__version__",
    "notify_ready",
    "notify_watchdog",
    "parse_version",
]
