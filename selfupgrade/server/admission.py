"""Which heartbeats hbs listens to at all: the checks made before a heartbeat is recorded.

Without per-host tokens a heartbeat proves nothing about the host it names, and host names are
public (``/agentversions``). So, for a heartbeat whose front end tells the address it came from
(:attr:`~selfupgrade.models.Heartbeat.source`):

* **a host name is bound to the address it was first heard from** (trust on first use): a
  heartbeat for that name from another address is refused and logged, until an operator
  re-binds the host (:meth:`~selfupgrade.server.commands.Commands.rebind`) or the host's
  record expires (``host_ttl_s``);
* **new names are rate-limited per address**: at most ``new_hosts_per_source`` names an
  address has not named before per ``new_hosts_window_s`` (a token bucket: a whole batch at
  once, then the rate);
* **the fleet view is capped** at ``max_hosts`` names (also for heartbeats without a source).

A refused heartbeat is neither recorded nor answered with an order; its front end tells the
caller why. Hosts that do prove themselves (per-host tokens) come with no source, and only the
cap applies. Probation, the third defence (a host first heard from during a rollout takes no
slot and spends no budget before ``probation_s``), is a rule of the rollout:
:func:`~selfupgrade.server.rules.on_heartbeat`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from ..models import Heartbeat
from .fleet import FleetView

__all__ = ["Admission"]

log = logging.getLogger("selfupgrade.server")

MAX_SOURCES = 65_536
"""Addresses whose new-name budget is tracked at once; beyond, addresses that have not named
a new host within a window are forgotten, and while every one of them has, a new address may
not name a new host."""


class Admission:
    """The checks of the module docstring over a fleet view.

    Args:
        fleet: the fleet view (what is known and bound).
        max_hosts: names the fleet view may hold.
        new_hosts_per_source: new names an address may bring per window (0: no limit).
        new_hosts_window_s: that window.
        clock: wall-clock time, for the once-a-minute log lines.
    """

    def __init__(
        self,
        fleet: FleetView,
        *,
        max_hosts: int,
        new_hosts_per_source: int,
        new_hosts_window_s: float,
        clock: Callable[[], float],
    ) -> None:
        self._fleet = fleet
        self._max_hosts = max_hosts
        self._burst = new_hosts_per_source
        self._rate = new_hosts_per_source / new_hosts_window_s if new_hosts_window_s > 0 else 0
        self._window_s = new_hosts_window_s
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()
        self._logged: dict[str, float] = {}
        self._clock = clock

    def refusal(self, beat: Heartbeat, now: float) -> str:
        """Why ``beat`` is refused (``""``: it is not)."""
        known = self._fleet.known(beat.host)
        source = beat.source
        if known is not None:
            if source and known.address and known.address != source:
                self._log_once(
                    f"bound:{beat.host}",
                    "refused a heartbeat for %s from %s: the name is bound to %s (if the host "
                    "moved, re-bind it: POST /selfupgrade/v1/hosts/%s/rebind)",
                    beat.host,
                    source,
                    known.address,
                    beat.host,
                )
                return (
                    f"{beat.host} is bound to the address it was first heard from; if the host "
                    "moved, an operator re-binds it (POST /selfupgrade/v1/hosts/<host>/rebind)"
                )
            return ""
        if self._fleet.size() >= self._max_hosts:
            self._log_once(
                "cap",
                "the fleet view holds max_hosts=%d hosts: heartbeats of new hosts are not "
                "recorded or answered",
                self._max_hosts,
            )
            return f"hbs keeps at most {self._max_hosts} hosts and knows that many"
        if source and self._burst and not self._take(source, now):
            self._log_once(
                f"rate:{source}",
                "refused new host %s from %s: that address named %d new hosts within %g s",
                beat.host,
                source,
                self._burst,
                self._window_s,
            )
            return (
                f"{source} named {self._burst} new hosts within {self._window_s:g} s; "
                "new names from it are refused for now"
            )
        return ""

    def _take(self, source: str, now: float) -> bool:
        """Take one new name from ``source``'s bucket; whether there was one."""
        with self._lock:
            bucket = self._buckets.get(source)
            if bucket is None:
                if len(self._buckets) >= MAX_SOURCES and not self._prune(now):
                    return False
                tokens = float(self._burst)
            else:
                tokens = min(float(self._burst), bucket[0] + (now - bucket[1]) * self._rate)
            if tokens < 1:
                self._buckets[source] = (tokens, now)
                return False
            self._buckets[source] = (tokens - 1, now)
            return True

    def _prune(self, now: float) -> bool:
        """Forget the addresses whose bucket has filled up again; whether any was."""
        full = [s for s, (_, at) in self._buckets.items() if now - at >= self._window_s]
        for source in full:
            del self._buckets[source]
        return bool(full)

    def _log_once(self, key: str, message: str, *args: object) -> None:
        """Log ``message`` at most once a minute per ``key`` (a flood logs a line a minute)."""
        now = self._clock()
        if now - self._logged.get(key, -1e18) < 60:
            return
        if len(self._logged) >= MAX_SOURCES:
            self._logged.clear()
        self._logged[key] = now
        log.warning(message, *args)
