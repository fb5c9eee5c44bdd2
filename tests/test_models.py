"""Models: versions, digests, artifacts, orders and heartbeats refuse bad input clearly."""

from __future__ import annotations

import pytest

from selfupgrade import (
    Artifact,
    Digest,
    Heartbeat,
    InvalidVersion,
    OrderRejected,
    Release,
    Role,
    UnsafePath,
    UnsafeURL,
    UpgradeOrder,
    UpgradeState,
    parse_version,
)

SHA = "a" * 64


@pytest.mark.parametrize("text", ["1.0", "6.0.1", "2.0rc1", "1.2.3.post4", "10!1.0"])
def test_valid_versions_parse(text: str) -> None:
    assert str(parse_version(text)) == str(parse_version(text))
    assert parse_version(text) == parse_version(text)


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("../../etc/passwd", "path separator"),
        ("1.0/../x", "path separator"),
        ("1..0", "'..'"),
        ("1.0\x00", "NUL"),
        ("1.0 ", "whitespace"),
        ("1.0\n", "whitespace"),
        ("1\\0", "path separator"),
        ("", "empty"),
        ("banana", "PEP 440"),
        ("1" * 65, "longer than"),
    ],
)
def test_hostile_versions_are_refused_with_the_reason(text: str, why: str) -> None:
    with pytest.raises(InvalidVersion) as info:
        parse_version(text)
    assert why in str(info.value)
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, OrderRejected)


def test_non_string_version_is_refused() -> None:
    with pytest.raises(InvalidVersion, match="must be a string"):
        parse_version(1.0)


def test_digest_normalises_case_and_compares() -> None:
    d = Digest("md5", "35AC8534C0B31237E844EF8EE2BB9B9E")
    assert d.hex == "35ac8534c0b31237e844ef8ee2bb9b9e"
    assert d.matches("35ac8534c0b31237e844ef8ee2bb9b9e")
    assert d.matches("35AC8534C0B31237E844EF8EE2BB9B9E")
    assert not d.matches("0" * 32)
    assert d.integrity_only
    assert not Digest("sha256", SHA).integrity_only
    assert Digest.parse(f"sha256:{SHA}") == Digest("sha256", SHA)


@pytest.mark.parametrize(
    ("algorithm", "value", "match"),
    [
        ("md5", "abc", "32 hex digits"),
        ("sha256", "g" * 64, "64 hex digits"),
        ("crc32", "0" * 8, "unknown digest algorithm"),
    ],
)
def test_bad_digests_are_refused(algorithm: str, value: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Digest(algorithm, value)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "ftp://example.invalid/x",
        "http:///nohost",
        "http://user:pw@127.0.0.1/x",
        "http://127.0.0.1/a b",
        "",
    ],
)
def test_artifact_urls_must_be_plain_http(url: str) -> None:
    with pytest.raises(UnsafeURL):
        Artifact(Role.BIN, url, Digest("sha256", SHA))


@pytest.mark.parametrize("target", ["/etc/passwd", "../x", "a/../../x", "a//b", "a\x00", "."])
def test_artifact_targets_stay_relative(target: str) -> None:
    with pytest.raises(UnsafePath):
        Artifact(Role.CFG, "http://127.0.0.1/x", Digest("sha256", SHA), target=target)


def test_artifact_size_and_mode_are_checked() -> None:
    with pytest.raises(ValueError, match="size"):
        Artifact(Role.BIN, "http://127.0.0.1/x", Digest("sha256", SHA), size=-1)
    with pytest.raises(ValueError, match="mode"):
        Artifact(Role.BIN, "http://127.0.0.1/x", Digest("sha256", SHA), mode=0o4755)


def test_release_needs_unique_roles() -> None:
    a = Artifact(Role.BIN, "http://127.0.0.1/x", Digest("sha256", SHA))
    with pytest.raises(ValueError, match="one artifact per role"):
        Release(parse_version("1.0"), (a, a))
    with pytest.raises(ValueError, match="only a rollback may have none"):
        UpgradeOrder(Release(parse_version("1.0"), ()))
    rollback = UpgradeOrder(Release(parse_version("1.0"), ()), rollback=True)
    assert UpgradeOrder.from_wire(rollback.to_wire()) == rollback


def test_order_round_trips_through_the_wire_form() -> None:
    order = UpgradeOrder(
        release=Release(
            parse_version("1.1"),
            (
                Artifact(Role.BIN, "http://127.0.0.1/bin_1.1", Digest("md5", "0" * 32), size=10),
                Artifact(Role.CFG, "https://127.0.0.1/cfg_1.1", Digest("sha256", SHA), mode=0o600),
            ),
        ),
        task_id="t-1",
        allow_downgrade=True,
    )
    again = UpgradeOrder.from_wire(order.to_wire())
    assert again == order
    assert again.release.artifact(Role.CFG).mode == 0o600  # type: ignore[union-attr]
    assert again.release.artifact(Role.SERVICE) is None


@pytest.mark.parametrize(
    ("mutate", "error", "match"),
    [
        (lambda w: w.update(version="../../etc/passwd"), InvalidVersion, "path separator"),
        (lambda w: w["artifacts"]["bin"].update(url="file:///bin/sh"), UnsafeURL, "http"),
        (lambda w: w["artifacts"]["bin"].update(target="../../x"), UnsafePath, "relative"),
        (lambda w: w["artifacts"].update(evil={}), ValueError, "unknown role"),
        (lambda w: w["artifacts"]["bin"].update(digest="md5"), ValueError, "sha256:<hex>"),
        (lambda w: w.update(allow_downgrade="yes"), ValueError, "allow_downgrade"),
        (lambda w: w.update(artifacts=[]), ValueError, "artifacts must be a JSON object"),
    ],
)
def test_malformed_orders_name_the_field(mutate, error, match) -> None:  # type: ignore[no-untyped-def]
    wire = UpgradeOrder(
        Release(
            parse_version("1.1"),
            (Artifact(Role.BIN, "http://127.0.0.1/bin_1.1", Digest("sha256", SHA)),),
        )
    ).to_wire()
    mutate(wire)
    with pytest.raises(error, match=match):
        UpgradeOrder.from_wire(wire)


def test_heartbeat_round_trips_and_validates() -> None:
    beat = Heartbeat(
        host="h1",
        version=parse_version("1.0"),
        state=UpgradeState.ROLLED_BACK,
        error="1.1 crashed",
        task_id="t",
        failed_version=parse_version("1.1"),
        labels={"dc": "bj"},
        files={"cfg": {"md5": "0" * 32}},
        confirmed=True,
    )
    assert Heartbeat.from_wire(beat.to_wire()) == beat
    with pytest.raises(ValueError, match=r"heartbeat\.state"):
        Heartbeat.from_wire({**beat.to_wire(), "state": "dancing"})
    with pytest.raises(ValueError, match=r"heartbeat\.host"):
        Heartbeat.from_wire({**beat.to_wire(), "host": ""})
    with pytest.raises(ValueError, match="labels"):
        Heartbeat.from_wire({**beat.to_wire(), "labels": {"dc": 1}})
    with pytest.raises(InvalidVersion):
        Heartbeat.from_wire({**beat.to_wire(), "version": "1.0\x00"})
