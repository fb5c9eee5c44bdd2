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
from selfupgrade.errors import UntrustedContent
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
    """The size of the download."""
    return download_artifact(
        artifact,
        dest,
        fetcher=fetcher,
        verifier=DigestVerifier(allow_md5=md5),  # type: ignore[arg-type]
        max_bytes=cap,
        timeout_s=10,
    ).size


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


# A download larger than one batch (1 MiB) is written on a writer thread and hashed on another.
BIG = bytes(range(256)) * (5 * 4096)  # 5 MiB


def _writer_threads() -> list[str]:
    import threading

    names = ("download-writer", "download-hasher")
    return [t.name for t in threading.enumerate() if t.name in names]


def test_a_large_download_is_written_whole_and_verified(
    tmp_path: Path, artifact_server: ArtifactServer
) -> None:
    url = artifact_server.add("big", BIG)
    dest = tmp_path / "staged"
    assert _run(_artifact(url, BIG, size=len(BIG)), dest, HttpFetcher()) == len(BIG)
    assert dest.read_bytes() == BIG
    assert _writer_threads() == []


def test_a_large_download_with_wrong_bytes_is_deleted_and_the_writer_stopped(
    tmp_path: Path, artifact_server: ArtifactServer
) -> None:
    url = artifact_server.add("big", BIG, fault=Fault(wrong_bytes=True))
    dest = tmp_path / "staged"
    with pytest.raises(DigestMismatch):
        _run(_artifact(url, BIG), dest, HttpFetcher())
    assert not dest.exists()
    assert _writer_threads() == []


def test_a_large_download_resumed_after_a_drop_is_byte_exact(
    tmp_path: Path, artifact_server: ArtifactServer
) -> None:
    url = artifact_server.add("big", BIG, fault=Fault(drop_after=3_000_000))
    dest = tmp_path / "staged"
    assert _run(_artifact(url, BIG), dest, HttpFetcher()) == len(BIG)
    assert dest.read_bytes() == BIG


def test_a_large_download_without_range_support_starts_over_cleanly(
    tmp_path: Path,
) -> None:
    # The fetcher restarts the sink when the server sends the whole file again.
    class Twice:
        def fetch(self, url: str, sink: object, *, deadline: float, max_bytes: int) -> None:
            for start in range(0, 3_000_000, 65536):
                sink.write(BIG[start : start + 65536])  # type: ignore[attr-defined]
            sink.restart()  # type: ignore[attr-defined]
            for start in range(0, len(BIG), 65536):
                sink.write(BIG[start : start + 65536])  # type: ignore[attr-defined]

        def close(self) -> None:
            pass

    dest = tmp_path / "staged"
    assert _run(_artifact("http://127.0.0.1/big", BIG), dest, Twice()) == len(BIG)
    assert dest.read_bytes() == BIG


def test_a_fetcher_that_reuses_its_buffer_still_gives_the_exact_file(tmp_path: Path) -> None:
    """The sink writes and hashes later, on other threads: what a fetcher passes to write()
    is copied unless it is bytes, so refilling one buffer changes nothing that was sent."""

    class Refilling:
        def fetch(self, url: str, sink: object, *, deadline: float, max_bytes: int) -> None:
            buffer = bytearray(65536)
            for start in range(0, len(BIG), len(buffer)):
                buffer[:] = BIG[start : start + len(buffer)]
                sink.write(buffer)  # type: ignore[attr-defined]
            buffer[:] = bytes(len(buffer))

        def close(self) -> None:
            pass

    dest = tmp_path / "staged"
    assert _run(_artifact("http://127.0.0.1/big", BIG), dest, Refilling()) == len(BIG)
    assert dest.read_bytes() == BIG


def test_an_error_of_the_stream_check_on_the_writer_thread_reaches_the_caller(
    tmp_path: Path, artifact_server: ArtifactServer
) -> None:
    class Exploding:
        def begin(self, artifact: Artifact) -> object:
            class Check:
                def update(self, chunk: bytes) -> None:
                    raise UntrustedContent(f"checker gave up on {artifact.url}")

                def finish(self) -> None:
                    pass

            return Check()

    url = artifact_server.add("big", BIG)
    dest = tmp_path / "staged"
    with pytest.raises(UntrustedContent, match="checker gave up"):
        download_artifact(
            _artifact(url, BIG),
            dest,
            fetcher=HttpFetcher(),
            verifier=Exploding(),  # type: ignore[arg-type]
            max_bytes=1 << 30,
            timeout_s=10,
        )
    assert not dest.exists()
    assert _writer_threads() == []
