"""Issue 15, point 1 (the agent's side and hbs's check): an artifact with mirrors.

Real HTTP servers on 127.0.0.1 (selfupgrade.testing.ArtifactServer, one per mirror, each with
its fault) and the real HttpFetcher: one address with nothing listening, one server that sends
other bytes, one that drops the connection midway every time, one that serves.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from selfupgrade import Role
from selfupgrade._download import Fetched, download_artifact
from selfupgrade.errors import DigestMismatch, DownloadError
from selfupgrade.models import Artifact, Digest, Release, UpgradeOrder, parse_version
from selfupgrade.server.artifacts import ArtifactCheck, ArtifactUnavailable
from selfupgrade.testing import ArtifactServer, free_port
from selfupgrade.testing.artifact_server import Fault
from selfupgrade.transport.http import HttpFetcher
from selfupgrade.verify.digest import DigestVerifier

DATA = bytes(range(256)) * 4096  # 1 MiB


def artifact(urls: list[str], data: bytes = DATA) -> Artifact:
    return Artifact(
        Role.BIN,
        urls[0],
        Digest("sha256", hashlib.sha256(data).hexdigest()),
        size=len(data),
        mirrors=tuple(urls[1:]),
    )


def fetch(art: Artifact, dest: Path) -> Fetched:
    return download_artifact(
        art, dest, fetcher=HttpFetcher(), verifier=DigestVerifier(), max_bytes=1 << 30, timeout_s=60
    )


@pytest.fixture
def mirrors() -> Iterator[list[ArtifactServer]]:
    servers = [ArtifactServer() for _ in range(3)]
    for server in servers:
        server.start()
    yield servers
    for server in servers:
        server.stop()


def test_a_down_a_lying_and_a_dropping_mirror_then_the_file(
    tmp_path: Path, mirrors: list[ArtifactServer]
) -> None:
    liar, dropper, good = mirrors
    down = f"http://127.0.0.1:{free_port()}/bin"
    urls = [
        down,
        liar.add("bin", DATA, fault=Fault(wrong_bytes=True)),
        dropper.add("bin", DATA, fault=Fault(drop_after=100_000, drop_times=1000)),
        good.add("bin", DATA),
    ]
    fetched = fetch(artifact(urls), tmp_path / "staged")
    assert (tmp_path / "staged").read_bytes() == DATA
    assert fetched.url == urls[3] and fetched.resumed_from == (urls[2],)
    resumed = [r for r in good.requests if r.path == "/bin"]
    print(f"{fetched}; the good mirror was asked {[(r.range, r.status) for r in resumed]}")
    # the dropping mirror gave the first part (its own resumptions included); the good one
    # was asked only for the rest
    assert len(resumed) == 1 and resumed[0].status == 206
    start = int(resumed[0].range.removeprefix("bytes=").rstrip("-"))  # type: ignore[union-attr]
    assert 100_000 <= start < len(DATA)


def test_bytes_that_fail_the_digest_are_thrown_away_before_the_next_mirror(
    tmp_path: Path, mirrors: list[ArtifactServer]
) -> None:
    liar, good, _ = mirrors
    urls = [liar.add("bin", DATA, fault=Fault(wrong_bytes=True)), good.add("bin", DATA)]
    fetched = fetch(artifact(urls), tmp_path / "staged")
    assert fetched.url == urls[1] and fetched.resumed_from == ()
    assert [r.range for r in good.requests] == [None]  # the whole file, not a Range
    assert (tmp_path / "staged").read_bytes() == DATA


def test_when_every_mirror_fails_the_error_names_each_and_nothing_is_left(
    tmp_path: Path, mirrors: list[ArtifactServer]
) -> None:
    missing, dropper, _ = mirrors
    urls = [
        f"http://127.0.0.1:{free_port()}/bin",
        missing.add("bin", DATA, fault=Fault(status=404)),
        dropper.add("bin", DATA, fault=Fault(drop_after=10_000, drop_times=1000)),
    ]
    with pytest.raises(DownloadError) as failed:
        fetch(artifact(urls), tmp_path / "staged")
    print(failed.value)
    assert all(url in str(failed.value) for url in urls)
    assert not (tmp_path / "staged").exists()


def test_the_last_mirror_lying_is_a_digest_mismatch(
    tmp_path: Path, mirrors: list[ArtifactServer]
) -> None:
    missing, liar, _ = mirrors
    urls = [
        missing.add("bin", DATA, fault=Fault(status=503)),
        liar.add("bin", DATA, fault=Fault(wrong_bytes=True)),
    ]
    with pytest.raises(DigestMismatch):
        fetch(artifact(urls), tmp_path / "staged")
    assert not (tmp_path / "staged").exists()


def test_mirrors_travel_in_the_order_and_bad_ones_are_refused() -> None:
    art = artifact(["http://a.example/bin", "https://b.example/bin", "http://c.example/bin"])
    order = UpgradeOrder(release=Release(parse_version("1.1"), (art,)))
    wire = order.to_wire()
    assert wire["artifacts"]["bin"]["mirrors"] == ["https://b.example/bin", "http://c.example/bin"]
    assert UpgradeOrder.from_wire(wire).release.artifacts[0].urls == art.urls
    for bad, says in (
        (["file:///etc/passwd"], "only http and https"),
        ("http://b.example/bin", "must be a list"),
        ([f"http://m{i}.example/bin" for i in range(17)], "at most 16"),
    ):
        wire["artifacts"]["bin"]["mirrors"] = bad
        with pytest.raises(ValueError, match=says):
            UpgradeOrder.from_wire(wire)
    plain = UpgradeOrder(release=Release(parse_version("1.1"), (artifact(["http://a/b"]),)))
    assert "mirrors" not in plain.to_wire()["artifacts"]["bin"]  # the seed's shape


def test_hbs_checks_every_mirror_before_a_publish(mirrors: list[ArtifactServer]) -> None:
    good, liar, _ = mirrors
    check = ArtifactCheck(deadline_s=10)
    fine = artifact([good.add("bin", DATA), liar.add("ok", DATA)])
    check.check(Release(parse_version("1.1"), (fine,)))
    bad_url = liar.add("bin", DATA, fault=Fault(wrong_bytes=True))
    with pytest.raises(ArtifactUnavailable) as refused:
        check.check(Release(parse_version("1.1"), (artifact([good.url("bin"), bad_url]),)))
    print(refused.value)
    assert bad_url in str(refused.value)
