"""Issue 15, point 2: delta updates (zstd patch-from patches).

Real HTTP servers on 127.0.0.1 (ArtifactServer) and the real HttpFetcher, the real zstandard
library and the real ``zstd`` command; the end-to-end test runs the example falcon agent under
a real supervisord and a real hbs. A patch may only ever save bytes: every way it can fail
ends with the whole artifact installed, never with other bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from selfupgrade import Role, _delta
from selfupgrade._download import Fetched, PatchBase, download_artifact
from selfupgrade.models import Artifact, Digest, Patch, Release, UpgradeOrder, parse_version
from selfupgrade.server.artifacts import ArtifactCheck, ArtifactUnavailable
from selfupgrade.testing import ArtifactServer
from selfupgrade.testing.artifact_server import Fault
from selfupgrade.transport.http import HttpFetcher
from selfupgrade.verify.base import Verifier
from selfupgrade.verify.digest import DigestVerifier

pytest.importorskip("zstandard", reason="delta updates need: pip install 'selfupgrade[delta]'")

OLD = os.urandom(1 << 20) + bytes(range(256)) * 4096  # 2 MiB, half of it random
NEW = OLD[:700_000] + b"a changed function " * 50 + OLD[700_000:1_900_000] + b"tail" * 10
V_OLD = parse_version("1.0")


def sha256(data: bytes) -> Digest:
    return Digest("sha256", hashlib.sha256(data).hexdigest())


@pytest.fixture
def server() -> Iterator[ArtifactServer]:
    with ArtifactServer() as s:
        yield s


def released(server: ArtifactServer, patch: bytes, *, fault: Fault | None = None) -> Artifact:
    """NEW served whole as ``bin_1.1`` and as ``patch`` from 1.0 at ``bin_1.0-1.1.zst``."""
    url = server.add("bin_1.1", NEW)
    patch_url = server.add("bin_1.0-1.1.zst", patch, fault=fault)
    return Artifact(
        Role.BIN,
        url,
        sha256(NEW),
        size=len(NEW),
        patches=(Patch(V_OLD, patch_url, sha256(patch), size=len(patch)),),
    )


def fetch(
    art: Artifact,
    dir_: Path,
    installed: bytes = OLD,
    *,
    version: str = "1.0",
    verifier: Verifier | None = None,
    timeout_s: float = 60,
) -> Fetched:
    (dir_ / "bin").write_bytes(installed)
    return download_artifact(
        art,
        dir_ / "staged",
        fetcher=HttpFetcher(),
        verifier=verifier or DigestVerifier(),
        max_bytes=1 << 30,
        timeout_s=timeout_s,
        base=PatchBase(parse_version(version), dir_ / "bin", dir_ / "scratch"),
    )


def paths(server: ArtifactServer) -> list[str]:
    return [r.path for r in server.requests]


def test_a_patch_builds_the_new_file_and_the_whole_file_is_not_fetched(
    tmp_path: Path, server: ArtifactServer, caplog: pytest.LogCaptureFixture
) -> None:
    patch = _delta.make_patch(OLD, NEW)
    caplog.set_level(logging.INFO, "selfupgrade.download")
    fetched = fetch(released(server, patch), tmp_path)
    print(f"{len(patch):,} bytes fetched for {len(NEW):,}; requests {paths(server)}")
    assert (tmp_path / "staged").read_bytes() == NEW
    assert fetched.patch is not None and fetched.url.endswith("bin_1.0-1.1.zst")
    assert paths(server) == ["/bin_1.0-1.1.zst"]
    assert len(patch) < len(NEW) // 50
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bin", "staged"]  # the patch is gone
    assert "from the patch from 1.0" in caplog.text


def _other_patch() -> bytes:
    """A well-formed patch from OLD, with its own right digest, that builds other bytes."""
    return _delta.make_patch(OLD, NEW[:-1] + b"!")


FAILURES = {
    "the patch URL answers 404": (Fault(status=404), None, OLD),
    "the patch server sends other bytes": (Fault(wrong_bytes=True), None, OLD),
    "the patch server drops the connection": (
        Fault(drop_after=100, drop_times=99, no_range=True),
        None,
        OLD,
    ),
    "the installed file is not the release's 1.0": (
        None,
        None,
        OLD[:800_000] + b"xyz" + OLD[800_003:],
    ),
    "the patch builds other bytes than the release's": (None, _other_patch, OLD),
}


@pytest.mark.parametrize("case", FAILURES)
def test_every_failure_of_a_patch_ends_with_the_whole_file(
    case: str, tmp_path: Path, server: ArtifactServer, caplog: pytest.LogCaptureFixture
) -> None:
    fault, make, installed = FAILURES[case]
    patch = make() if make is not None else _delta.make_patch(OLD, NEW)
    art = released(server, patch, fault=fault)
    fetched = fetch(art, tmp_path, installed)
    warning = next(r.getMessage() for r in caplog.records if "the patch from" in r.getMessage())
    print(f"{case}: {warning}")
    assert (tmp_path / "staged").read_bytes() == NEW
    assert fetched.patch is None and fetched.url == art.url
    assert paths(server)[-1] == "/bin_1.1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bin", "staged"]


def test_a_patch_slower_than_half_the_deadline_leaves_the_other_half_to_the_whole_file(
    tmp_path: Path, server: ArtifactServer, caplog: pytest.LogCaptureFixture
) -> None:
    patch = _delta.make_patch(OLD, NEW)
    art = released(server, patch, fault=Fault(trickle_bytes_per_s=max(1, len(patch) // 20)))
    start = time.monotonic()
    fetched = fetch(art, tmp_path, timeout_s=4)
    took = time.monotonic() - start
    print(f"whole file after {took:.1f} s: {caplog.records[0].getMessage()}")
    assert (tmp_path / "staged").read_bytes() == NEW and fetched.patch is None
    assert "deadline" in caplog.text


def test_without_zstandard_the_whole_file_is_fetched_and_the_patch_is_not(
    tmp_path: Path,
    server: ArtifactServer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    art = released(server, _delta.make_patch(OLD, NEW))
    monkeypatch.setitem(sys.modules, "zstandard", None)  # import zstandard raises ImportError
    fetched = fetch(art, tmp_path)
    assert (tmp_path / "staged").read_bytes() == NEW and fetched.patch is None
    assert paths(server) == ["/bin_1.1"]
    assert "pip install 'selfupgrade[delta]'" in caplog.text


def test_an_agent_on_a_version_without_a_patch_fetches_only_the_whole_file(
    tmp_path: Path, server: ArtifactServer
) -> None:
    fetched = fetch(released(server, _delta.make_patch(OLD, NEW)), tmp_path, version="0.9")
    assert fetched.patch is None and paths(server) == ["/bin_1.1"]


@pytest.mark.real
def test_a_signed_release_installs_only_the_signed_bytes_whatever_the_patch_builds(
    tmp_path: Path, server: ArtifactServer
) -> None:
    """The patch is not signed, what it builds is: a patch hbs got wrong (well-formed, its
    own digest right) is refused by the manifest's sha256 and the whole file follows."""
    sig = pytest.importorskip("selfupgrade.verify.signature")
    private, public = sig.generate_key()
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "bin_1.1").write_bytes(NEW)
    signed = sig.manifest_for_directory(
        tmp_path / "files", version="1.1", product="p", platform="x", expires=time.time() + 600
    )
    manifest = sig.sign_manifest(signed, [sig.load_private_key(private)])
    verifier = sig.SignatureVerifier([sig.load_public_key(public)], product="p", platform="x")
    for patch, built_from_patch in ((_other_patch(), False), (_delta.make_patch(OLD, NEW), True)):
        for name in ("bin_1.1", "bin_1.0-1.1.zst"):
            server.remove(name)
        art = released(server, patch)
        order = UpgradeOrder(Release(parse_version("1.1"), (art,)), manifest=manifest)
        verifier.check_order(order, current=V_OLD)
        (tmp_path / "staged").unlink(missing_ok=True)
        fetched = fetch(art, tmp_path, verifier=verifier)
        assert (tmp_path / "staged").read_bytes() == NEW
        assert (fetched.patch is not None) == built_from_patch


def test_hbs_checks_each_patch_before_a_publish(server: ArtifactServer) -> None:
    patch = _delta.make_patch(OLD, NEW)
    check = ArtifactCheck(deadline_s=10)
    check.check(Release(parse_version("1.1"), (released(server, patch),)))
    art = released(server, patch)
    server.set_fault("bin_1.0-1.1.zst", Fault(wrong_bytes=True))
    with pytest.raises(ArtifactUnavailable) as refused:
        check.check(Release(parse_version("1.1"), (art,)))
    print(refused.value)
    assert "bin_1.0-1.1.zst" in str(refused.value) and "sha256" in str(refused.value)


def test_patches_travel_in_the_order_and_bad_ones_name_their_field() -> None:
    patch = {"from": "1.0", "url": "http://127.0.0.1/p", "digest": str(sha256(b"p")), "size": 1}
    order = {
        "version": "1.1",
        "artifacts": {"bin": {"url": "http://127.0.0.1/b", "digest": str(sha256(NEW))}},
    }
    order["artifacts"]["bin"]["patches"] = [patch]  # type: ignore[index]
    parsed = UpgradeOrder.from_wire(order)
    assert parsed.to_wire()["artifacts"]["bin"]["patches"] == [patch]
    assert parsed.release.artifacts[0].patch_from(V_OLD) == Patch(
        V_OLD, "http://127.0.0.1/p", sha256(b"p"), 1
    )
    bad = {
        "a path in the version": ({**patch, "from": "../1"}, "patches[0]: invalid version"),
        "a file URL": ({**patch, "url": "file:///etc/passwd"}, "patches[0]: URL"),
        "an unknown field": ({**patch, "format": "bsdiff"}, "unknown field(s) ['format']"),
        "a negative size": ({**patch, "size": -1}, "size must be a non-negative"),
    }
    for what, (entry, message) in bad.items():
        order["artifacts"]["bin"]["patches"] = [entry]  # type: ignore[index]
        with pytest.raises(ValueError, match=re.escape(message)):
            UpgradeOrder.from_wire(order)
        print(f"{what}: refused")
    order["artifacts"]["bin"]["patches"] = [patch, patch]  # type: ignore[index]
    with pytest.raises(ValueError, match="one patch per earlier version"):
        UpgradeOrder.from_wire(order)


def test_a_patch_asking_for_a_window_beyond_its_files_fails_before_it_allocates() -> None:
    zstd = _delta.zstandard()
    params = zstd.ZstdCompressionParameters.from_level(3, window_log=27)
    stream = zstd.ZstdCompressor(compression_params=params).compressobj()  # no size: no shrink
    huge_window = stream.compress(b"x" * 100) + stream.flush()
    assert zstd.get_frame_parameters(huge_window).window_size == 1 << 27
    with pytest.raises(ValueError, match="not a zstd patch"):
        _delta.apply_patch(b"small", io.BytesIO(huge_window), lambda b: None, max_output=100)


# ---- selfupgrade release patch ----------------------------------------------------------------


def release_patch(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "selfupgrade", "release", "patch", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


@pytest.mark.real
def test_the_release_command_makes_a_patch_the_zstd_command_applies(tmp_path: Path) -> None:
    (tmp_path / "old").write_bytes(OLD)
    (tmp_path / "new").write_bytes(NEW)
    url = "http://127.0.0.1:8000/bin_1.0-1.1.zst"
    done = release_patch(
        *("--old", str(tmp_path / "old"), "--new", str(tmp_path / "new"), "--from", "1.0"),
        *("--out", str(tmp_path / "p.zst"), "--url", url),
    )
    print(done.stdout, done.stderr)
    assert done.returncode == 0, done.stderr
    patch = (tmp_path / "p.zst").read_bytes()
    entry = json.loads(done.stdout)
    assert entry == {"from": "1.0", "url": url, "digest": str(sha256(patch)), "size": len(patch)}
    Patch.from_wire(entry, "entry")  # what it prints is what a release takes
    if shutil.which("zstd") is None:
        if os.environ.get("SELFUPGRADE_REQUIRE_ZSTD") == "1":
            pytest.fail(
                "the zstd command is required (SELFUPGRADE_REQUIRE_ZSTD=1): apt-get install zstd"
            )
        pytest.skip("install zstd (Debian: zstd) to apply the patch with the zstd command")
    subprocess.run(
        ["zstd", "-q", "-d", f"--patch-from={tmp_path / 'old'}", str(tmp_path / "p.zst"),
         "-o", str(tmp_path / "rebuilt")],
        check=True,
        timeout=60,
    )  # fmt: skip
    assert (tmp_path / "rebuilt").read_bytes() == NEW


def test_the_release_command_refuses_bad_input_and_writes_nothing(tmp_path: Path) -> None:
    (tmp_path / "old").write_bytes(OLD)
    (tmp_path / "taken").write_bytes(b"served")
    files = ("--old", str(tmp_path / "old"), "--new", str(tmp_path / "old"))
    cases = {
        "the same file twice": ((*files, "--from", "1.0"), "the same bytes"),
        "a hostile version": (
            ("--old", str(tmp_path / "old"), "--new", __file__, "--from", "../1"),
            "invalid version",
        ),
        "a file URL": (
            ("--old", str(tmp_path / "old"), "--new", __file__, "--from", "1", "--url", "file:/x"),
            "only http and https",
        ),
    }
    for what, (args, message) in cases.items():
        done = release_patch(*args, "--out", str(tmp_path / "p.zst"))
        print(f"{what}: {done.stderr.strip()}")
        assert done.returncode == 1 and message in done.stderr
        assert not (tmp_path / "p.zst").exists()
    done = release_patch(
        "--old", str(tmp_path / "old"), "--new", __file__, "--from", "1", "--out",
        str(tmp_path / "taken"),
    )  # fmt: skip
    assert done.returncode == 1 and "exists" in done.stderr
    assert (tmp_path / "taken").read_bytes() == b"served"


# ---- end to end: example falcon agents, a real supervisord, a real hbs --------------------------


@pytest.mark.real
def test_agents_upgrade_through_a_patch_and_one_whose_file_differs_through_the_whole_file(
    tmp_path: Path, server: ArtifactServer
) -> None:
    """Two example falcon agents on 6.0.0; the rollout's release carries a patch from 6.0.0
    that ``selfupgrade release patch`` made. agent-01 builds 6.0.1 from the patch; agent-02's
    program was changed on the host, so the patch cannot build 6.0.1 from it, and it fetches
    the whole program instead, without asking hbs. Both end on 6.0.1, byte for byte."""
    from examples.falcon_agent.build import build

    from .fleet import AGENT_CFG, Fleet, Hbs, wait_until
    from .fleet import NEW as V_NEW
    from .fleet import OLD as V_OLD_AGENT

    old, new = build(V_OLD_AGENT, config=AGENT_CFG), build(V_NEW, config=AGENT_CFG)
    (tmp_path / "old").write_bytes(old.program)
    (tmp_path / "new").write_bytes(new.program)
    patch_name = f"bin_{V_OLD_AGENT}-{V_NEW}.zst"
    made = release_patch(
        *("--old", str(tmp_path / "old"), "--new", str(tmp_path / "new"), "--from", V_OLD_AGENT),
        *("--out", str(tmp_path / patch_name), "--url", server.url(patch_name)),
    )
    assert made.returncode == 0, made.stderr
    server.add(patch_name, (tmp_path / patch_name).read_bytes())
    bin_url = server.add(f"bin_{V_NEW}", new.program)
    release = {
        "version": V_NEW,
        "artifacts": {
            "bin": {
                "url": bin_url,
                "digest": str(sha256(new.program)),
                "size": len(new.program),
                "patches": [json.loads(made.stdout)],
            }
        },
    }
    plan = {"waves": [{"name": "all", "percent": 100, "max_in_flight": 2}]}
    with (
        Hbs(f"sqlite:{tmp_path / 'hbs.db'}", tmp_path / "hbs.log") as hbs,
        Fleet(tmp_path, 2, [hbs.url], old=old) as fleet,
    ):
        changed = fleet.home("agent-02") / "opt" / "falcon-agent"
        changed.write_bytes(changed.read_bytes() + b"\n# changed on this host\n")
        wait_until("both on 6.0.0", lambda: len(hbs.versions()) == 2, explain=hbs.log)
        hbs.start_rollout({"release": release, "plan": plan})
        wait_until("done", lambda: hbs.status()["counters"]["done"] == 2, explain=hbs.log)
        logs = {name: fleet.sup.log(name) for name in fleet.names}
        programs = {name: fleet.program(name) for name in fleet.names}
    built = [line for line in logs["agent-01"].splitlines() if "from the patch" in line]
    fell_back = [line for line in logs["agent-02"].splitlines() if "the patch from" in line]
    print(made.stderr.strip())
    print(f"agent-01: {built}\nagent-02: {fell_back}")
    assert programs == {"agent-01": new.program, "agent-02": new.program}
    assert built and f"built the bin artifact from the patch from {V_OLD_AGENT}" in built[0]
    assert fell_back and "fetching the whole of it" in fell_back[0]
    served = [r.path for r in server.requests if r.method == "GET"]
    assert served.count(f"/{patch_name}") >= 3  # hbs's check (once or more), each agent once
