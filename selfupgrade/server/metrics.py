"""Prometheus metrics of hbs, rendered at scrape time from the control plane's state.

    selfupgrade_hosts{version}              hosts by the version they last reported (the 20
                                            most common; the rest as version="other")
    selfupgrade_hosts_by_state{state}       hosts by upgrade state
    selfupgrade_slots_in_use                upgrade slots held in the active rollout
    selfupgrade_slots_limit                 the current wave's limit
    selfupgrade_rollout_done                hosts that confirmed the active rollout
    selfupgrade_rollout_failed_hosts        hosts given up on
    selfupgrade_rollout_failures_total      failed attempts in the active rollout
    selfupgrade_rollout_silent_total        of those, hosts silent after their order
    selfupgrade_rollout_phase{rollout,phase}  1 for the active rollout's status
    selfupgrade_rollout_wave{rollout}       index of its current wave (0-based)
    selfupgrade_store_round_trips_total     round trips to the store (Redis) so far

A registry is built per scrape, so nothing here is global and two planes in one process (two
tests, say) never mix.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from .views import MetricsSnapshot

__all__ = ["MAX_VERSION_SERIES", "METRICS_CONTENT_TYPE", "render_metrics"]

MAX_VERSION_SERIES = 20
"""``selfupgrade_hosts`` has a series for each of the most common versions, and one ``other``
for the rest: hosts may report any version string, and a series per string would let them
grow the scrape (and the time-series database) without bound."""

METRICS_CONTENT_TYPE = CONTENT_TYPE_LATEST
_PHASES = ("active", "paused", "halted", "aborted", "complete", "cancelled")


class _SnapshotCollector:
    def __init__(self, snapshot: MetricsSnapshot) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot
        by_version = GaugeMetricFamily(
            "selfupgrade_hosts", "Hosts by the version they last reported.", labels=["version"]
        )
        top = sorted(snap.versions.items(), key=lambda kv: (-kv[1], kv[0]))
        for version, n in sorted(top[:MAX_VERSION_SERIES]):
            by_version.add_metric([version], n)
        if len(top) > MAX_VERSION_SERIES:
            by_version.add_metric(["other"], sum(n for _, n in top[MAX_VERSION_SERIES:]))
        yield by_version
        by_state = GaugeMetricFamily(
            "selfupgrade_hosts_by_state", "Hosts by upgrade state.", labels=["state"]
        )
        for state, n in sorted(snap.states.items()):
            by_state.add_metric([state], n)
        yield by_state
        if "round_trips" in snap.store:
            trips = CounterMetricFamily(
                "selfupgrade_store_round_trips", "Round trips to the store so far."
            )
            trips.add_metric([], snap.store["round_trips"])
            yield trips
        task, c = snap.task, snap.rollout
        if task is None:
            return
        yield _gauge("selfupgrade_slots_in_use", "Upgrade slots held.", c.in_flight)
        yield _gauge(
            "selfupgrade_slots_limit", "Upgrade slots the current wave allows.", snap.slot_limit
        )
        yield _gauge("selfupgrade_rollout_done", "Hosts that confirmed the rollout.", c.done)
        yield _gauge("selfupgrade_rollout_failed_hosts", "Hosts given up on.", c.failed)
        failures = CounterMetricFamily(
            "selfupgrade_rollout_failures", "Failed attempts in the active rollout."
        )
        failures.add_metric([], c.failures)
        yield failures
        silent = CounterMetricFamily(
            "selfupgrade_rollout_silent",
            "Failed attempts of hosts that went silent after their order.",
        )
        silent.add_metric([], c.silent)
        yield silent
        phase = GaugeMetricFamily(
            "selfupgrade_rollout_phase",
            "1 for the active rollout's status.",
            labels=["rollout", "phase"],
        )
        for name in _PHASES:
            phase.add_metric([task.id, name], 1 if c.status.value == name else 0)
        yield phase
        wave = GaugeMetricFamily(
            "selfupgrade_rollout_wave", "Current wave (0-based).", labels=["rollout"]
        )
        wave.add_metric([task.id], c.wave)
        yield wave

    def describe(self) -> list[Any]:
        return []


def _gauge(name: str, text: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, text, value=value)


def render_metrics(snapshot: MetricsSnapshot) -> bytes:
    """The exposition text for one scrape."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_SnapshotCollector(snapshot))
    return generate_latest(registry)
