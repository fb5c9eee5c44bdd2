"""The orchestrated download: limits enforced whatever the fetcher does; bad bytes deleted."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from selfupgrade import (
    Artifact,
    Digest,
    DigestMismatch,
    DigestVerifier,
    DownloadError,
    HttpFetcher,
    OrderRejected,
    Role,
    SizeMismatch,
)
from selfupgrade._download import download_artifact
from selfupgrade.testing import ArtifactServer, FakeFetcher, Fault, toy_release

DATA = b"new program\n" * 10_000


def _artifact(
    url: str, data: bytes = DATA, *, algorithm: str = "sha256", size: int | None = None
) -> Artifact:
    return Artifact(
        Role.BIN, url, Digest(algorithm, hashlib.new(algorithm, data).hexdigest()), size=size
    )  # type: ignore[arg-type]


def _run(
    artifact: Artifact, dest: Path, fetcher: object, *, cap: int = 1 << 30, md5: bool = True
) -> int:
    return download_artifact(
        artifact,
        dest,
        fetcher=fetcher,
        verifier=DigestVerifier(allow_md5=md5),  # type: ignore[arg-type]
        max_bytes=cap,
        timeout_s=10,
    )


@pytest.mark.parametrize("algorithm", ["md5", "sha256", "sha512"])
def test_download_verifies_each_algorithm(
    tmp_path: Path, artifact_server: ArtifactServer, algorithm: str
) -> None:
    url = artifact_server.add("bin", DATA)
    dest = tmp_path / "staged"
    assert _run(_artifact(url, algorithm=algorithm), dest, HttpFetcher()) == len(DATA)
    assert dest.read_bytes() == DATA
    assert dest.stat().st_mode & 0o777 == 0o600


def test_wrong_digest_names_url_expected_actual_and_deletes(
    tmp_path: Path, artifact_server: ArtifactServer
) -> None:
    url = artifact_server.add("bin", DATA, fault=Fault(wrong_bytes=True))
    art = _artifact(url)
    dest = tmp_path / "staged"
    with pytest.raises(DigestMismatch) as info:
        _run(art, dest, HttpFetcher())
    err = info.value
    assert err.url == url
    assert err.expected == art.digest.hex
    assert err.actual == hashlib.sha256(bytes((b + 1) % 256 for b in DATA)).hexdigest()
    assert url in str(err) and err.expected in str(err) and err.actual in str(err)
    assert not dest.exists()


def test_truncated_file_fails_on_size_and_is_deleted(
    tmp_path: Path, artifact_server: ArtifactServer
) -> None:
    url = artifact_server.add("bin", DATA, fault=Fault(truncate_to=1000))
    dest = tmp_path / "staged"
    with pytest.raises(SizeMismatch, match="ended after 1000 of"):
        _run(_artifact(url, size=len(DATA)), dest, HttpFetcher())
    assert not dest.exists()


def test_truncated_file_without_size_fails_on_digest(
    tmp_path: Path, artifact_server: ArtifactServer
) -> None:
    url = artifact_server.add("bin", DATA, fault=Fault(truncate_to=1000))
    with pytest.raises(DigestMismatch):
        _run(_artifact(url), tmp_path / "staged", HttpFetcher())
    assert not (tmp_path / "staged").exists()


def test_oversize_is_cut_at_the_announced_size(tmp_path: Path) -> None:
    fetcher = FakeFetcher({"http://127.0.0.1/bin": DATA + b"extra"})
    with pytest.raises(SizeMismatch, match="more than the allowed"):
        _run(_artifact("http://127.0.0.1/bin", size=len(DATA)), tmp_path / "s", fetcher)
    assert not (tmp_path / "s").exists()


def test_the_cap_is_enforced_even_if_the_fetcher_ignores_it(tmp_path: Path) -> None:
    fetcher = FakeFetcher({"http://127.0.0.1/bin": DATA})
    with pytest.raises(SizeMismatch):
        _run(_artifact("http://127.0.0.1/bin"), tmp_path / "s", fetcher, cap=1000)


def test_a_plugin_fetchers_own_exception_is_mapped(tmp_path: Path) -> None:
    class Broken:
        def fetch(self, *a: object, **k: object) -> None:
            raise KeyError("boom")

        def close(self) -> None:
            pass

    with pytest.raises(DownloadError, match="KeyError"):
        _run(_artifact("http://127.0.0.1/bin"), tmp_path / "s", Broken())
    assert not (tmp_path / "s").exists()


def test_md5_is_refused_unless_allowed() -> None:
    order = toy_release("1.1").order("http://127.0.0.1/f", algorithm="md5")
    with pytest.raises(OrderRejected, match="allow_md5=True"):
        DigestVerifier().check_order(order)
    DigestVerifier(allow_md5=True).check_order(order)
    DigestVerifier().check_order(toy_release("1.1").order("http://127.0.0.1/f"))
