"""The updater: heartbeat -> decide -> download -> verify -> install -> restart -> confirm.

It wires the four roles and treats each as untrusted: limits (byte cap, deadline) are enforced
here, foreign exceptions are mapped, and any failure leaves the old files in place and is
reported in the next heartbeat. Two ways to embed it::

    updater = Updater(...)
    updater.start()          # a background thread, for a threaded daemon
    ...
    updater.stop()

    await updater.run()      # a coroutine, for an asyncio daemon (blocking work in threads)

The daemon's own work never waits on the updater: heartbeats run in the updater's thread (or
in worker threads under asyncio), and an upgrade runs in its own worker thread so heartbeats
keep reporting its progress.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import math
import os
import random
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ._download import PatchBase, download_artifact
from .errors import (
    OrderRejected,
    RestartFailed,
    RetryLater,
    SelfUpgradeError,
    UnsafePath,
)
from .guard import GUARD_PROBLEM_ENV
from .install.base import ConfirmPolicy, Installer, StagedFile
from .models import (
    Artifact,
    Heartbeat,
    Role,
    UpgradeOrder,
    UpgradeState,
    Version,
    check_relative_target,
    parse_version,
)
from .policy import (
    FailureRecord,
    jittered_interval,
    order_applies,
    paced_interval,
    retry_allowed_at,
)
from .restart.base import Restarter
from .restart.systemd import ready_or_unsupervised
from .transport.base import Fetcher, PacedTransport, Transport
from .transport.http import HttpFetcher
from .verify.base import Verifier
from .verify.digest import DigestVerifier

__all__ = ["Layout", "Updater", "UpdaterConfig"]

log = logging.getLogger("selfupgrade.updater")

_SMALL_ROLES = (Role.CFG, Role.SERVICE)


@dataclass(frozen=True)
class Layout:
    """Where the files of the daemon live.

    Attributes:
        install_dir: the directory an order's relative targets are resolved in.
        files: the default path of each role, relative to ``install_dir`` or absolute (this is
            local, trusted configuration, so a service file may live in ``/etc/systemd/system``).
    """

    install_dir: Path
    files: Mapping[Role, str | Path]

    def path(self, role: Role) -> Path | None:
        """The configured path of ``role``, or ``None`` if this daemon has no such file."""
        p = self.files.get(role)
        if p is None:
            return None
        p = Path(p)
        return p if p.is_absolute() else Path(self.install_dir) / p

    def resolve(self, artifact: Artifact) -> Path:
        """The path ``artifact`` is installed at.

        Raises:
            UnsafePath: the order's target leaves the install directory, goes through a
                symlink, or the role has no configured path.
        """
        if artifact.target is None:
            p = self.path(artifact.role)
            if p is None:
                raise UnsafePath(
                    f"this host has no {artifact.role.value} file configured",
                    path=artifact.role.value,
                )
            if p.is_symlink():
                raise UnsafePath(
                    f"{p} is a symlink; replacing it would replace the link, not the file "
                    "(configure the real path)",
                    path=p,
                )
            return p
        rel = check_relative_target(artifact.target)
        base = Path(self.install_dir).resolve()
        candidate = base / rel
        parent = candidate.parent.resolve()
        if parent != base and base not in parent.parents:
            raise UnsafePath(f"target {rel!r} resolves outside {base}", path=candidate)
        if candidate.is_symlink():
            raise UnsafePath(
                f"target {candidate} is a symlink; refusing to replace it", path=candidate
            )
        return parent / candidate.name


@dataclass(frozen=True)
class UpdaterConfig:
    """How the updater behaves.

    Attributes:
        host: this host's identity in heartbeats.
        interval_s: time between heartbeats.
        jitter: each interval is spread by this fraction (0.2 = ±20%).
        labels: host labels sent for targeting.
        max_download_bytes: hard cap per artifact.
        download_timeout_s: total deadline per artifact.
        failure_backoff_s: first wait before retrying a version that failed; doubles per failure.
        failure_backoff_cap_s: the longest such wait.
        confirm: how a new version must prove itself after the restart.
        confirm_poll_s: how often the health check runs while a version is on trial.
        paced_max_s: the longest wait between heartbeats this agent accepts when its server
            asks for one (:class:`~selfupgrade.transport.PacedTransport`); it never waits
            less than ``interval_s`` at a server's request
            (:func:`~selfupgrade.policy.paced_interval`). ``None``: 15 times ``interval_s``;
            equal to ``interval_s``: the server's pace is ignored.
    """

    host: str
    interval_s: float = 60.0
    jitter: float = 0.2
    labels: Mapping[str, str] = field(default_factory=dict)
    max_download_bytes: int = 512 << 20
    download_timeout_s: float = 600.0
    failure_backoff_s: float = 60.0
    failure_backoff_cap_s: float = 3600.0
    confirm: ConfirmPolicy = field(default_factory=ConfirmPolicy)
    confirm_poll_s: float = 1.0
    paced_max_s: float | None = None

    def __post_init__(self) -> None:
        limit = self.paced_max_s
        if limit is not None and not (math.isfinite(limit) and limit >= self.interval_s):
            raise ValueError(
                f"paced_max_s: must be at least interval_s ({self.interval_s} s), got {limit!r}"
            )


class Updater:
    """Keeps one daemon on the version its control server asks for.

    Args:
        version: the version this process runs.
        layout: where the daemon's files live.
        transport: delivers heartbeats.
        installer: installs and keeps generations.
        restarter: restarts the daemon after an install.
        config: identity, intervals and limits.
        verifier: default :class:`DigestVerifier` (sha256/sha512 only).
        fetcher: default :class:`HttpFetcher`.
        health_check: returns ``True`` when the daemon is healthy; while a new version is on
            trial it is polled and the first ``True`` confirms it. Default: the first
            successful heartbeat confirms.
        wall_clock: returns the current time in seconds since the epoch.
        uniform: random numbers in [0, 1) for jitter.
    """

    def __init__(
        self,
        *,
        version: str | Version,
        layout: Layout,
        transport: Transport,
        installer: Installer,
        restarter: Restarter,
        config: UpdaterConfig,
        verifier: Verifier | None = None,
        fetcher: Fetcher | None = None,
        health_check: Callable[[], bool] | None = None,
        wall_clock: Callable[[], float] = time.time,
        uniform: Callable[[], float] = random.random,
    ) -> None:
        self.version = version if isinstance(version, Version) else parse_version(version)
        self.layout = layout
        self.config = config
        self._transport = transport
        self._installer = installer
        self._restarter = restarter
        self._verifier = verifier or DigestVerifier()
        self._fetcher = fetcher or HttpFetcher()
        self._health_check = health_check
        self._now = wall_clock
        self._uniform = uniform

        self._lock = threading.Lock()
        self._busy = threading.Lock()
        self._state = UpgradeState.IDLE
        self._error: str | None = None
        self._task_id = ""
        self._failed_version: Version | None = None
        self._failures: dict[str, FailureRecord] = {}
        self._on_trial = False
        self._installed = False  # new files are in place; this process is about to restart
        self._served_by: dict[str, str] = {}  # role -> the URL its file came from, this attempt
        self._trial_deadline: float | None = None
        self._beat_ok = False
        self._started = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._worker: threading.Thread | None = None
        self._digest_cache: dict[Path, tuple[tuple[int, int, int], dict[str, str]]] = {}
        self.upgrades = 0
        """Number of upgrades this updater installed (for tests and metrics)."""

    # ---- state -----------------------------------------------------------------------------

    @property
    def state(self) -> UpgradeState:
        """What the updater is doing now."""
        return self._state

    @property
    def last_error(self) -> str | None:
        """Why the last attempt failed, if it did."""
        return self._error

    @property
    def on_trial(self) -> bool:
        """This process runs a new version that has not confirmed its health yet."""
        return self._on_trial

    def _set(self, state: UpgradeState, error: str | None = None) -> None:
        with self._lock:
            self._state = state
            if error is not None or state in (UpgradeState.IDLE, UpgradeState.DOWNLOADING):
                self._error = error
        log.debug("state %s%s", state.value, f" ({error})" if error else "")

    def heartbeat(self) -> Heartbeat:
        """The heartbeat that would be sent now."""
        with self._lock:
            return Heartbeat(
                host=self.config.host,
                version=self.version,
                state=self._state,
                error=self._error,
                task_id=self._task_id,
                failed_version=self._failed_version,
                labels=self.config.labels,
                files={r.value: d for r, d in self._installed_digests(_SMALL_ROLES).items()},
                confirmed=not (self._on_trial or self._installed),
                failures=self._failure_count(),
                served_by=dict(self._served_by),
            )

    # ---- start-up --------------------------------------------------------------------------

    def on_start(self) -> None:
        """Count this start with the installer and pick up how the last upgrade ended.

        ``start()`` and ``run()`` call this; call it yourself only when driving the updater by
        hand with :meth:`tick`.
        """
        if self._started:
            return
        self._started = True
        problem = os.environ.pop(GUARD_PROBLEM_ENV, "")
        if problem:
            log.error("the guard reported: %s", problem)
            self._set(UpgradeState.IDLE, f"guard: {problem}")
        report = self._installer.boot(now=self._now(), claim=True)
        for message in report.messages:
            log.info("%s", message)
        status = report.status
        if report.rolled_back:
            # This very process is the failed version; the old files are back. Start them.
            self._restart("the trial failed at this start")
            return
        last = status.last_result
        if last is not None and last.outcome == "rolled_back" and status.pending is None:
            failed = parse_version(last.version)
            if failed != self.version:
                self._failed_version = failed
                self._set(UpgradeState.ROLLED_BACK, last.reason)
                self._failures[str(failed)] = FailureRecord(str(failed), 1, last.at)
        pending = status.pending
        if (
            pending is not None
            and "bin" in pending.roles
            and parse_version(pending.version) != self.version
        ):
            # the new program does not say the version it was released as: a mislabelled
            # build (or the program was not replaced); confirming it would loop forever
            reason = (
                f"the program installed as {pending.version} reports version {self.version}; "
                "rolled back"
            )
            log.error("%s", reason)
            self._installer.rollback(reason)
            self._restart(reason)
            return
        if status.pending is not None:
            self._on_trial = True
            self._trial_deadline = status.pending.deadline
            self._set(UpgradeState.CONFIRMING)
            log.info("running %s on trial; confirming health", status.pending.version)

    # ---- one cycle -------------------------------------------------------------------------

    def tick(self) -> float:
        """Beat once, act on the reply, advance a trial; return the delay until the next tick."""
        order: UpgradeOrder | None = None
        if self._on_trial and self._health_check is not None:
            # A health check of its own needs no network: confirm before the heartbeat, which
            # a slow or partitioned network can hold past the trial's deadline.
            self._advance_trial(roll_back=False)
        try:
            order = self._transport.heartbeat(self.heartbeat())
            self._beat_ok = True
        except OrderRejected as exc:
            log.error("refused the server's order: %s", exc)
            self._set(UpgradeState.FAILED, f"order refused: {exc}")
        except SelfUpgradeError as exc:
            log.warning("heartbeat failed: %s", exc)
        except Exception:  # a plug-in's own failure must not kill the loop
            log.exception("heartbeat failed in the transport")
        if self._on_trial:
            self._advance_trial()
            return min(self.config.confirm_poll_s, self.config.interval_s)
        if order is not None:
            self._consider(order)
        return self._next_beat_in()

    def _next_beat_in(self) -> float:
        """The wait until the next heartbeat: the server's, when it asked for one and no
        upgrade is under way, within ``interval_s`` and ``paced_max_s``; else the own one."""
        c = self.config
        asked = self._transport.next_beat_s if isinstance(self._transport, PacedTransport) else None
        if asked is None or self._state not in (UpgradeState.IDLE, UpgradeState.FAILED):
            return jittered_interval(c.interval_s, c.jitter, self._uniform())
        return paced_interval(asked, c.interval_s, c.paced_max_s)

    def _advance_trial(self, *, roll_back: bool = True) -> None:
        """Confirm the version on trial if healthy; past its deadline (with ``roll_back``),
        roll it back."""
        healthy = False
        try:
            healthy = self._health_check() if self._health_check is not None else self._beat_ok
        except Exception:
            log.exception("the health check raised; counting it as unhealthy")
        healthy = healthy and ready_or_unsupervised()
        if healthy:
            self._installer.confirm()
            self._on_trial = False
            self._set(UpgradeState.IDLE)
            log.info("version %s confirmed healthy", self.version)
            return
        if roll_back and self._trial_deadline is not None and self._now() > self._trial_deadline:
            timeout = self.config.confirm.timeout_s
            reason = f"{self.version} did not confirm its health within {timeout:g}s"
            log.error("%s; rolling back", reason)
            self._installer.rollback(reason)
            self._restart(reason)

    def _consider(self, order: UpgradeOrder) -> None:
        if self._busy.locked():
            return
        if order.rollback:
            self._consider_rollback(order)
            return
        try:
            applies = order_applies(
                order, current=self.version, installed=self._installed_digests(order.release.roles)
            )
        except OrderRejected as exc:
            with self._lock:
                self._task_id = order.task_id
            if self._failed_version != order.version or self._state != UpgradeState.FAILED:
                self._record_failure(order, str(exc))
            return
        if not applies:
            return
        record = self._failures.get(str(order.version))
        if record is not None:
            at = retry_allowed_at(
                record,
                base_s=self.config.failure_backoff_s,
                cap_s=self.config.failure_backoff_cap_s,
            )
            if self._now() < at:
                log.debug("not retrying %s before %.0f", order.version, at)
                return
        if not self._busy.acquire(blocking=False):
            return
        self._worker = threading.Thread(
            target=self._work, args=(order,), name="selfupgrade-upgrade", daemon=True
        )
        self._worker.start()

    def _consider_rollback(self, order: UpgradeOrder) -> None:
        """A fleet rollback: restore the backup generation when it holds the wanted version,
        else install the order's artifacts like any (downgrade) order."""
        if order.version == self.version:
            return
        if self._installer.status().previous_version == str(order.version):
            if self._busy.acquire(blocking=False):
                self._worker = threading.Thread(
                    target=self._restore, args=(order,), name="selfupgrade-rollback", daemon=True
                )
                self._worker.start()
            return
        if order.release.artifacts:
            if self._busy.acquire(blocking=False):
                self._worker = threading.Thread(
                    target=self._work, args=(order,), name="selfupgrade-upgrade", daemon=True
                )
                self._worker.start()
            return
        if self._failed_version != order.version or self._state != UpgradeState.FAILED:
            self._record_failure(
                order,
                f"cannot roll back to {order.version}: no backup generation of it on this host "
                "and the order has no artifacts",
            )

    def _restore(self, order: UpgradeOrder) -> None:
        try:
            with self._lock:
                self._task_id = order.task_id
            self._set(UpgradeState.INSTALLING)
            restored = self._installer.rollback(
                f"fleet rollback to {order.version} (rollout {order.task_id or '-'})"
            )
            log.warning("fleet rollback: restored %s", restored)
            self._installed = True
            self._restart(f"rolled back to {restored}")
        except SelfUpgradeError as exc:
            self._record_failure(order, str(exc))
        except Exception as exc:
            log.exception("fleet rollback failed")
            self._record_failure(order, f"{type(exc).__name__}: {exc}")
        finally:
            self._busy.release()

    def _work(self, order: UpgradeOrder) -> None:
        try:
            self.upgrade(order, _locked=True)
        except SelfUpgradeError:
            pass  # already reported by upgrade()
        except Exception:
            log.exception("unexpected failure in the upgrade worker")
        finally:
            self._busy.release()

    # ---- the upgrade -----------------------------------------------------------------------

    def upgrade(self, order: UpgradeOrder, *, _locked: bool = False) -> bool:
        """Carry out ``order`` now, in this thread: download, verify, install, restart.

        Returns ``False`` when nothing had to change. When the restart returns (it usually
        does not), returns ``True``.

        Raises:
            SelfUpgradeError: any failure, after it was recorded for the next heartbeat; the
                old files are in place.
        """
        if not _locked and not self._busy.acquire(blocking=False):
            raise RetryLater("an upgrade is already running in this updater")
        try:
            return self._upgrade(order)
        except SelfUpgradeError as exc:
            self._record_failure(order, str(exc))
            raise
        except Exception as exc:
            self._record_failure(order, f"{type(exc).__name__}: {exc}")
            raise SelfUpgradeError(f"upgrade to {order.version} failed: {exc}") from exc
        finally:
            if not _locked:
                self._busy.release()

    def _upgrade(self, order: UpgradeOrder) -> bool:
        with self._lock:
            self._task_id = order.task_id
            self._served_by = {}
        self._set(UpgradeState.DOWNLOADING)
        log.info("upgrading %s -> %s (task %s)", self.version, order.version, order.task_id or "-")
        self._verifier.check_order(order, current=self.version)
        targets = {a.role: self.layout.resolve(a) for a in order.release.artifacts}
        self._installer.preflight([(targets[a.role], a.size) for a in order.release.artifacts])
        staged: list[StagedFile] = []
        try:
            for artifact in order.release.artifacts:
                target = targets[artifact.role]
                path = self._installer.staging_path(target)
                fetched = download_artifact(
                    artifact,
                    path,
                    fetcher=self._fetcher,
                    verifier=self._verifier,
                    max_bytes=self.config.max_download_bytes,
                    timeout_s=self.config.download_timeout_s,
                    on_verifying=lambda: self._set(UpgradeState.VERIFYING),
                    check_room=functools.partial(self._room_for, target),
                    base=self._patch_base(artifact, target),
                )
                with self._lock:
                    self._served_by[artifact.role.value] = fetched.url[:256]
                staged.append(
                    StagedFile(artifact.role, targets[artifact.role], path, artifact.mode)
                )
                self._set(UpgradeState.DOWNLOADING)
            self._set(UpgradeState.INSTALLING)
            changed = self._installer.install(
                str(order.version),
                staged,
                from_version=str(self.version),
                confirm=self.config.confirm,
            )
        finally:
            for f in staged:
                try:
                    os.unlink(f.staged)
                except FileNotFoundError:
                    pass
                except OSError as exc:  # must not hide why the upgrade failed
                    log.warning("could not remove the staged %s: %s", f.staged, exc)
        self._digest_cache.clear()
        if not changed:
            self._set(UpgradeState.IDLE)
            return False
        self.upgrades += 1
        self._installed = True
        try:
            self._restart(f"installed {order.version}")
        except RestartFailed as exc:
            # this process, the old version, runs on: its files must be the ones on disk
            restored = self._installer.rollback(f"the restart into {order.version} failed: {exc}")
            self._installed = False
            log.error("the restart into %s failed; %s is back on disk", order.version, restored)
            raise
        return True

    def _patch_base(self, artifact: Artifact, target: Path) -> PatchBase | None:
        """What a patch of ``artifact`` applies to: the running version's file at ``target``
        (``None`` when the release has no patch from this version or the file is missing)."""
        if artifact.patch_from(self.version) is None or not target.is_file():
            return None
        return PatchBase(self.version, target, self._installer.staging_path(target))

    def _room_for(self, target: Path, size: int) -> None:
        """Refuse a download whose announced ``size`` cannot fit beside ``target``."""
        self._installer.preflight([(target, size)])

    def _failure_count(self) -> int:
        if self._failed_version is None:
            return 0
        record = self._failures.get(str(self._failed_version))
        return record.attempts if record is not None else 0

    def _record_failure(self, order: UpgradeOrder, reason: str) -> None:
        key = str(order.version)
        previous = self._failures.get(key)
        self._failures[key] = FailureRecord(
            key, (previous.attempts if previous else 0) + 1, self._now()
        )
        with self._lock:
            self._failed_version = order.version
        self._set(UpgradeState.FAILED, reason)
        log.error("upgrade to %s failed: %s", order.version, reason)

    def _restart(self, why: str) -> None:
        self._set(UpgradeState.RESTARTING)
        with contextlib.suppress(Exception):
            self._transport.heartbeat(self.heartbeat())
        log.info("restarting (%s)", why)
        self._restarter.restart()

    def confirm(self) -> None:
        """Declare the running version healthy now (instead of waiting for the health check)."""
        if self._on_trial:
            self._installer.confirm()
            self._on_trial = False
            self._set(UpgradeState.IDLE)

    # ---- digests of installed files --------------------------------------------------------

    def _installed_digests(self, roles: Iterable[Role]) -> dict[Role, dict[str, str]]:
        """md5 and sha256 of the installed config and service file (cached by inode/size/mtime).

        The program is identified by its version, so it is never hashed here.
        """
        out: dict[Role, dict[str, str]] = {}
        for role in roles:
            path = self.layout.path(role) if role in _SMALL_ROLES else None
            if path is None:
                continue
            try:
                st = path.stat()
            except OSError:
                continue
            key = (st.st_ino, st.st_size, st.st_mtime_ns)
            cached = self._digest_cache.get(path)
            if cached is None or cached[0] != key:
                data = path.read_bytes()
                digests = {
                    "md5": hashlib.md5(data, usedforsecurity=False).hexdigest(),
                    "sha256": hashlib.sha256(data).hexdigest(),
                }
                cached = (key, digests)
                self._digest_cache[path] = cached
            out[role] = cached[1]
        return out

    # ---- embedding: thread -----------------------------------------------------------------

    def start(self) -> None:
        """Run heartbeats in a background daemon thread until :meth:`stop`."""
        if self._thread is not None:
            raise RuntimeError("the updater is already running")
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="selfupgrade", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        try:
            self.on_start()
        except SelfUpgradeError as exc:
            log.error("could not read the install state: %s", exc)
            self._set(UpgradeState.IDLE, f"could not read the install state: {exc}")
        while not self._stop.is_set():
            delay = self.tick()
            self._stop.wait(delay)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the background thread (an upgrade in progress finishes or fails on its own)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None
        self._transport.close()
        self._fetcher.close()

    # ---- embedding: asyncio ----------------------------------------------------------------

    async def run(self) -> None:
        """Run heartbeats until cancelled; blocking work runs in worker threads."""
        await asyncio.to_thread(self.on_start)
        try:
            while True:
                delay = await asyncio.to_thread(self.tick)
                await asyncio.sleep(delay)
        finally:
            await asyncio.to_thread(self._transport.close)
