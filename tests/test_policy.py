"""Pure agent-side decisions: when an order applies, back-off, heartbeat jitter."""

from __future__ import annotations

import hashlib

import pytest

from selfupgrade import Artifact, Digest, DowngradeRefused, Release, Role, UpgradeOrder
from selfupgrade.models import parse_version
from selfupgrade.policy import (
    FailureRecord,
    full_jitter,
    jittered_interval,
    order_applies,
    retry_allowed_at,
)

V = parse_version


def _order(
    version: str, roles: tuple[Role, ...] = (Role.BIN,), *, cfg: bytes = b"new", down: bool = False
) -> UpgradeOrder:
    arts = tuple(
        Artifact(
            r,
            f"http://127.0.0.1/{r.value}",
            Digest("md5", hashlib.md5(cfg).hexdigest())
            if r == Role.CFG
            else Digest("sha256", "0" * 64),
        )
        for r in roles
    )
    return UpgradeOrder(Release(V(version), arts), allow_downgrade=down)


def test_bin_orders_are_decided_by_version() -> None:
    assert order_applies(_order("1.1"), current=V("1.0"), installed={})
    assert not order_applies(_order("1.0"), current=V("1.0"), installed={})
    assert not order_applies(_order("1.0.0"), current=V("1.0"), installed={})  # PEP 440 equal


def test_downgrade_needs_explicit_permission() -> None:
    with pytest.raises(DowngradeRefused, match=r"older than the running 2\.0"):
        order_applies(_order("1.9"), current=V("2.0"), installed={})
    assert order_applies(_order("1.9", down=True), current=V("2.0"), installed={})


def test_cfg_only_order_applies_until_the_digest_matches() -> None:
    order = _order("1.0", (Role.CFG,), cfg=b"new")
    old = {Role.CFG: {"md5": hashlib.md5(b"old").hexdigest()}}
    new = {Role.CFG: {"md5": hashlib.md5(b"new").hexdigest()}}
    assert order_applies(order, current=V("1.0"), installed=old)
    assert not order_applies(order, current=V("1.0"), installed=new)
    assert order_applies(order, current=V("1.0"), installed={})


def test_full_jitter_stays_within_the_exponential_envelope() -> None:
    assert full_jitter(0.5, 8, 0, 0.999) < 0.5
    assert full_jitter(0.5, 8, 3, 0.999) == pytest.approx(3.996)
    assert full_jitter(0.5, 8, 30, 1.0) == 8
    assert full_jitter(0.5, 8, 2, 0.0) == 0


def test_heartbeat_interval_is_spread_by_the_jitter() -> None:
    assert jittered_interval(60, 0.2, 0.0) == pytest.approx(48)
    assert jittered_interval(60, 0.2, 1.0) == pytest.approx(72)
    assert jittered_interval(60, 0.2, 0.5) == pytest.approx(60)
    values = {round(jittered_interval(60, 0.2, u / 10), 3) for u in range(11)}
    assert len(values) == 11


def test_failure_backoff_doubles_up_to_the_cap() -> None:
    at = [
        retry_allowed_at(FailureRecord("1.1", n, 1000.0), base_s=60, cap_s=600)
        for n in (1, 2, 3, 10)
    ]
    assert at == [1060.0, 1120.0, 1240.0, 1600.0]
