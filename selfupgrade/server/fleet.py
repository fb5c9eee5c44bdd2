"""The fleet view: the last heartbeat of every host, kept by the control plane.

Every heartbeat is recorded here first, in memory, without the store. What is new (a new host,
a change of version, state, error or labels) is written to the store at the next flush; a
host's unchanged heartbeat at most every ``seen_save_s``, each host at its own phase of that
period so that the fleet's rewrites are spread over it. The store's view (every hbs
replica's) is merged with this process's newer heartbeats when the whole fleet is asked for.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Collection, Mapping
from dataclasses import replace

from ..models import Heartbeat
from .stores.base import FleetStore, StoreError
from .tasks import HostSeen

__all__ = ["FleetView"]

log = logging.getLogger("selfupgrade.server")


class FleetView:
    """The last heartbeat of every host.

    Args:
        store: where the view is kept for other replicas and restarts.
        seen_save_s: see :attr:`~selfupgrade.server.plane.PlaneConfig.seen_save_s`.
        clock: wall-clock time.
    """

    def __init__(
        self,
        store: FleetStore,
        seen_save_s: float,
        clock: Callable[[], float],
    ) -> None:
        self._store = store
        self._save_s = seen_save_s
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        now = clock()
        # After a restart, a stored last-seen time is taken as up to seen_save_s later (it
        # was written at most that long before the host's last heartbeat).
        self._seen: dict[str, HostSeen] = {
            host: replace(s, seen_at=min(s.seen_at + seen_save_s, max(s.seen_at, now)))
            for host, s in store.hosts().items()
        }
        self._last_beat: dict[str, float] = {h: s.seen_at for h, s in self._seen.items()}
        self._started_at = now
        self._interval: dict[str, float] = {}
        self._dirty: dict[str, HostSeen] = {}
        self._version_text: dict[object, str] = {}

    def record(self, beat: Heartbeat, now: float) -> float | None:
        """Note that ``beat``'s host was heard from; keep (and mark for the store) a new
        :class:`HostSeen` only when it has news. Return the host's heartbeat interval as this
        process measured it: the longest recent gap between two of its heartbeats (``None``:
        heard fewer than three times).

        Most heartbeats repeat the last one: they change one float and allocate nothing that
        outlives the request (with 600,000 hosts, a new object per heartbeat keeps the
        garbage collector's full scans, and their pauses, coming).
        """
        version = self._version_text.get(beat.version)
        if version is None:
            version = self._version_text.setdefault(beat.version, str(beat.version))
        return self._note(
            beat.host, version, beat.state.value, beat.error, beat.labels, beat.source, now
        )

    def _note(
        self,
        host: str,
        version: str,
        state: str,
        error: str | None,
        labels: Mapping[str, str],
        source: str,
        now: float,
    ) -> float | None:
        save_s = self._save_s
        phase = (hash(host) & 0xFFFF) * save_s / 0x10000
        with self._lock:
            before = self._last_beat.get(host)
            self._last_beat[host] = now
            interval = self._interval.get(host)
            if before is not None and before > self._started_at:
                # Trusted from the second gap on (negative: one gap so far); a longer gap
                # counts at once, a shorter one slowly: an extra beat (a reconnect, the report
                # of a new state) must not make a host look faster than it is.
                gap = now - before
                interval = -gap if interval is None else max(gap, 0.75 * abs(interval))
                self._interval[host] = interval
            measured = interval if interval is not None and interval > 0 else None
            prev = self._seen.get(host)
            if (
                prev is not None
                and (prev.seen_at + phase) // save_s == (now + phase) // save_s
                and prev.version == version
                and prev.state == state
                and prev.error == error
                and prev.labels == labels
                and (prev.address or not source)
            ):
                return measured
            address, since = (prev.address or source, prev.since) if prev else (source, now)
            seen = HostSeen(host, version, state, now, error, labels, address, since)
            self._seen[host] = seen
            self._dirty[host] = seen
            return measured

    def heard(self, hosts: Collection[str], now: float) -> None:
        """Note that ``hosts`` were heard at ``now`` and had nothing new to say: for a caller
        that knows what their heartbeats would have been and skipped them (the fleet
        simulator). Only their last-heard times change."""
        with self._lock:
            self._last_beat.update(dict.fromkeys(hosts, now))

    def size(self) -> int:
        """How many hosts the view holds."""
        return len(self._seen)

    def interval(self, host: str) -> float | None:
        """The host's heartbeat interval as this process measured it, from one gap on
        (``None``: heard fewer than twice)."""
        interval = self._interval.get(host)
        return abs(interval) if interval is not None else None

    def quiet(
        self, now: float, *, window_s: float, silent_after_s: float, besides: Collection[str]
    ) -> tuple[int, int]:
        """``(silent, heard)``: of the hosts heard within ``window_s`` (but for ``besides``),
        how many have been silent since, for three of their heartbeat intervals (or
        ``silent_after_s``, for a host whose interval is not known yet). Hosts silent for
        longer than the window (gone for good, or for a while) count in neither."""
        silent = heard = 0
        since = now - window_s
        with self._lock:
            beats = list(self._last_beat.items())
            intervals = dict(self._interval)
        for host, last in beats:
            if last < since or host in besides:
                continue
            heard += 1
            interval = intervals.get(host)
            after = 3 * max(abs(interval), 1.0) if interval is not None else silent_after_s
            if now - last > after:
                silent += 1
        return silent, heard

    def known(self, host: str) -> HostSeen | None:
        """The host's last heartbeat as this process holds it (``None``: not heard of)."""
        return self._seen.get(host)

    def rebind(self, host: str) -> bool:
        """Unbind ``host`` from its address: the next heartbeat binds it to its own. Return
        whether hbs knows the host."""
        with self._lock:
            prev = self._seen.get(host)
            if prev is None:
                return False
            self._seen[host] = self._dirty[host] = replace(prev, address="")
            return True

    def forget_silent(self, cutoff: float) -> list[str]:
        """Forget the hosts no replica has heard from since ``cutoff`` (their records, their
        bindings); return their names.

        Raises:
            StoreError: the store failed.
        """
        stored = self._store.hosts()
        with self._lock:
            gone = [
                h
                for h, s in stored.items()
                if s.seen_at < cutoff and self._last_beat.get(h, -1e18) < cutoff
            ]
            for host in gone:
                self._seen.pop(host, None)
                self._last_beat.pop(host, None)
                self._interval.pop(host, None)
        if gone:
            self._store.forget_hosts(gone)
        return gone

    def last_beats(self) -> Mapping[str, float]:
        """Host -> when this process last heard from it (a live mapping: read, do not keep)."""
        return self._last_beat

    def all(self) -> dict[str, HostSeen]:
        """The last heartbeat of every host: the store's view (every replica's), with this
        process's newer heartbeats over it.

        Raises:
            StoreError: the store failed.
        """
        merged = self._store.hosts()
        with self._lock:
            local = list(self._seen.values())
        for s in local:
            other = merged.get(s.host)
            if other is None or other.seen_at < s.seen_at:
                merged[s.host] = s
        return merged

    def flush(self) -> None:
        """Write the heartbeats with news since the last flush to the store (one flush at a
        time, so that an older heartbeat never overwrites a newer one)."""
        with self._flush_lock:
            with self._lock:
                dirty, self._dirty = self._dirty, {}
            if not dirty:
                return
            try:
                self._store.save_hosts(dirty.values())
            except StoreError as exc:
                log.error("could not save heartbeats (will retry): %s", exc)
                with self._lock:
                    for host, seen in dirty.items():
                        self._dirty.setdefault(host, seen)
