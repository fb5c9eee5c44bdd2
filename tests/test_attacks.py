"""The attacks The Update Framework names, each performed for real and shown to fail.

Each test runs a real Updater (SignatureVerifier, HttpFetcher against a real HTTP server on
127.0.0.1, TripleInstaller on real files) on a host running toy 1.0, performs one attack, and
checks that the attack is refused with a clear error, that the three installed files are still
exactly 1.0's, that nothing is left behind, and that nothing restarted. The positive controls
show the same setup installs a correctly signed release.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from selfupgrade import (
    Artifact,
    DeadlineExceeded,
    Digest,
    DigestMismatch,
    HttpFetcher,
    HttpSettings,
    Layout,
    Release,
    Role,
    SelfUpgradeError,
    SignatureError,
    SizeMismatch,
    TripleInstaller,
    Updater,
    UpdaterConfig,
    UpgradeOrder,
)
from selfupgrade.testing import (
    TOY_FILES,
    ArtifactServer,
    FakeRestarter,
    FakeTransport,
    Fault,
    ToyRelease,
    toy_release,
)
from selfupgrade.verify.signature import (
    MANIFEST_TYPE,
    SignatureVerifier,
    generate_key,
    load_private_key,
    load_public_key,
    sign_manifest,
)

PRODUCT, PLATFORM = "toyd", "linux-x86_64"
OLD, NEW, OLDER = toy_release("1.0"), toy_release("1.1"), toy_release("0.9")
KEYS = [generate_key() for _ in range(3)]  # two trusted, one stranger
TRUSTED = [load_public_key(pub) for _, pub in KEYS[:2]]
SIGNERS = [load_private_key(priv) for priv, _ in KEYS]


def signed_part(
    release: ToyRelease,
    *,
    version: str | None = None,
    product: str = PRODUCT,
    platform: str = PLATFORM,
    expires: float | None = None,
    rollback: bool = False,
    roles: Iterable[Role] = tuple(Role),
) -> dict[str, Any]:
    return {
        "_type": MANIFEST_TYPE,
        "product": product,
        "platform": platform,
        "version": version or release.version,
        "expires": int(expires if expires is not None else time.time() + 3600),
        "rollback": rollback,
        "artifacts": {
            r.value: {
                "name": release.artifact_name(r),
                "size": len(release.files[r]),
                "sha256": hashlib.sha256(release.files[r]).hexdigest(),
            }
            for r in roles
        },
    }


def order_for(
    release: ToyRelease,
    server: ArtifactServer,
    manifest: bytes | None,
    *,
    version: str | None = None,
    roles: Iterable[Role] = tuple(Role),
    digests: dict[Role, bytes] | None = None,
    sizes: bool = True,
    allow_downgrade: bool = False,
) -> UpgradeOrder:
    """What a (possibly hostile) server sends: URLs on ``server``, digests it chose."""
    artifacts = []
    for role in roles:
        data = (digests or {}).get(role, release.files[role])
        artifacts.append(
            Artifact(
                role,
                server.url(release.artifact_name(role)),
                Digest("sha256", hashlib.sha256(data).hexdigest()),
                size=len(data) if sizes else None,
            )
        )
    from selfupgrade import parse_version

    return UpgradeOrder(
        Release(parse_version(version or release.version), tuple(artifacts)),
        allow_downgrade=allow_downgrade,
        manifest=manifest,
    )


class Host:
    def __init__(self, tmp: Path, *, threshold: int = 1, timeout_s: float = 10.0) -> None:
        self.install = tmp / "opt"
        OLD.install(self.install)
        self.restarter = FakeRestarter()
        self.updater = Updater(
            version="1.0",
            layout=Layout(self.install, TOY_FILES),
            transport=FakeTransport(),
            installer=TripleInstaller(tmp / "state"),
            restarter=self.restarter,
            config=UpdaterConfig(host="victim", download_timeout_s=timeout_s),
            verifier=SignatureVerifier(
                TRUSTED, threshold=threshold, product=PRODUCT, platform=PLATFORM
            ),
            fetcher=HttpFetcher(settings=HttpSettings(read_timeout_s=2, max_resumes=0)),
        )

    def attempt(self, order: UpgradeOrder) -> SelfUpgradeError | None:
        try:
            self.updater.upgrade(order)
        except SelfUpgradeError as exc:
            return exc
        return None

    def files(self) -> dict[Role, bytes]:
        return {r: (self.install / n).read_bytes() for r, n in TOY_FILES.items()}

    def assert_untouched(self) -> None:
        assert self.files() == dict(OLD.files)
        assert self.restarter.restarts == 0
        assert [p.name for p in self.install.iterdir() if ".su-" in p.name] == []


@pytest.fixture
def host(tmp_path: Path) -> Host:
    return Host(tmp_path)


def serve(server: ArtifactServer, release: ToyRelease, **faults: Fault) -> None:
    for role in Role:
        server.add(release.artifact_name(role), release.files[role], fault=faults.get(role.value))


# ---- positive controls -------------------------------------------------------------------


def test_a_correctly_signed_release_installs(host: Host, artifact_server: ArtifactServer) -> None:
    serve(artifact_server, NEW)
    manifest = sign_manifest(signed_part(NEW), SIGNERS[:1])
    assert host.attempt(order_for(NEW, artifact_server, manifest)) is None
    assert host.files() == dict(NEW.files) and host.restarter.restarts == 1


def test_a_threshold_of_two_needs_two_trusted_signatures(
    tmp_path: Path, artifact_server: ArtifactServer
) -> None:
    serve(artifact_server, NEW)
    host = Host(tmp_path, threshold=2)
    one = sign_manifest(signed_part(NEW), SIGNERS[:1])
    err = host.attempt(order_for(NEW, artifact_server, one))
    assert isinstance(err, SignatureError) and "1 valid trusted signature(s); 2 needed" in str(err)
    host.assert_untouched()
    stranger_too = sign_manifest(signed_part(NEW), [SIGNERS[0], SIGNERS[2]])
    assert isinstance(host.attempt(order_for(NEW, artifact_server, stranger_too)), SignatureError)
    host.assert_untouched()
    two = sign_manifest(signed_part(NEW), SIGNERS[:2])
    assert host.attempt(order_for(NEW, artifact_server, two)) is None
    assert host.files() == dict(NEW.files)


# ---- what a signature must carry ---------------------------------------------------------


def test_unsigned_orders_are_refused(host: Host, artifact_server: ArtifactServer) -> None:
    serve(artifact_server, NEW)
    err = host.attempt(order_for(NEW, artifact_server, None))
    assert isinstance(err, SignatureError) and "no signed manifest" in str(err)
    host.assert_untouched()


def test_a_manifest_signed_by_an_unknown_key_is_refused(
    host: Host, artifact_server: ArtifactServer
) -> None:
    serve(artifact_server, NEW)
    err = host.attempt(
        order_for(NEW, artifact_server, sign_manifest(signed_part(NEW), SIGNERS[2:]))
    )
    assert isinstance(err, SignatureError) and "only by unknown keys" in str(err)
    host.assert_untouched()


def test_a_manifest_altered_after_signing_is_refused(
    host: Host, artifact_server: ArtifactServer
) -> None:
    evil = toy_release("1.1", config={"backdoor": True})
    serve(artifact_server, evil)
    manifest = sign_manifest(signed_part(NEW), SIGNERS[:1])
    altered = manifest.replace(
        hashlib.sha256(NEW.files[Role.CFG]).hexdigest().encode(),
        hashlib.sha256(evil.files[Role.CFG]).hexdigest().encode(),
    )
    altered = altered.replace(
        f'"size": {len(NEW.files[Role.CFG])}'.encode(),
        f'"size": {len(evil.files[Role.CFG])}'.encode(),
    )
    assert altered != manifest
    err = host.attempt(order_for(evil, artifact_server, altered))
    assert isinstance(err, SignatureError) and "altered after signing" in str(err)
    host.assert_untouched()


# ---- the attacks -------------------------------------------------------------------------


def test_arbitrary_install_an_artifact_swapped_on_the_server(
    host: Host, artifact_server: ArtifactServer
) -> None:
    """The download server holds other bytes of the same size, and the (compromised) control
    server sends the digest of those bytes: the manifest's sha256 still decides."""
    serve(artifact_server, NEW, bin=Fault(wrong_bytes=True))
    swapped = bytes((b + 1) % 256 for b in NEW.files[Role.BIN])
    manifest = sign_manifest(signed_part(NEW), SIGNERS[:1])
    err = host.attempt(order_for(NEW, artifact_server, manifest, digests={Role.BIN: swapped}))
    assert isinstance(err, DigestMismatch), err
    assert err.expected == hashlib.sha256(NEW.files[Role.BIN]).hexdigest()
    assert err.actual == hashlib.sha256(swapped).hexdigest()
    host.assert_untouched()


def test_rollback_attack_an_older_signed_release_offered_as_new(
    host: Host, artifact_server: ArtifactServer
) -> None:
    serve(artifact_server, OLDER)
    manifest = sign_manifest(signed_part(OLDER), SIGNERS[:1])
    err = host.attempt(order_for(OLDER, artifact_server, manifest, allow_downgrade=True))
    assert isinstance(err, SignatureError) and "not signed as a rollback" in str(err)
    host.assert_untouched()
    allowed = sign_manifest(signed_part(OLDER, rollback=True), SIGNERS[:1])
    assert host.attempt(order_for(OLDER, artifact_server, allowed, allow_downgrade=True)) is None
    assert host.files() == dict(OLDER.files)


def test_indefinite_freeze_an_expired_manifest(host: Host, artifact_server: ArtifactServer) -> None:
    serve(artifact_server, NEW)
    stale = sign_manifest(signed_part(NEW, expires=time.time() - 60), SIGNERS[:1])
    err = host.attempt(order_for(NEW, artifact_server, stale))
    assert isinstance(err, SignatureError) and "expired" in str(err)
    host.assert_untouched()


@pytest.mark.parametrize("how", ["endless", "oversize"])
def test_endless_data_is_cut_at_the_signed_size(
    host: Host, artifact_server: ArtifactServer, how: str
) -> None:
    serve(artifact_server, NEW)
    if how == "endless":
        artifact_server.add(NEW.artifact_name(Role.BIN), b"", fault=Fault(endless=True))
    else:
        artifact_server.add(NEW.artifact_name(Role.BIN), NEW.files[Role.BIN] + b"#" * 100_000)
    manifest = sign_manifest(signed_part(NEW), SIGNERS[:1])
    started = time.monotonic()
    err = host.attempt(order_for(NEW, artifact_server, manifest, sizes=False))
    assert isinstance(err, SizeMismatch) and "signed manifest allows" in str(err)
    assert time.monotonic() - started < 10
    host.assert_untouched()


def test_mix_and_match_a_cfg_from_another_release(
    host: Host, artifact_server: ArtifactServer
) -> None:
    serve(artifact_server, NEW)
    artifact_server.add(NEW.artifact_name(Role.CFG), OLDER.files[Role.CFG])  # a real, older cfg
    manifest = sign_manifest(signed_part(NEW), SIGNERS[:1])
    err = host.attempt(
        order_for(NEW, artifact_server, manifest, digests={Role.CFG: OLDER.files[Role.CFG]})
    )
    assert isinstance(err, (DigestMismatch, SizeMismatch)), err
    host.assert_untouched()


def test_mix_and_match_a_manifest_for_another_version(
    host: Host, artifact_server: ArtifactServer
) -> None:
    serve(artifact_server, NEW)
    manifest = sign_manifest(signed_part(NEW), SIGNERS[:1])
    err = host.attempt(order_for(NEW, artifact_server, manifest, version="1.2"))
    assert isinstance(
        err, SignatureError
    ) and "manifest is for 1.1 but the order is for 1.2" in str(err)
    host.assert_untouched()


def test_mix_and_match_part_of_a_release(host: Host, artifact_server: ArtifactServer) -> None:
    serve(artifact_server, NEW)
    manifest = sign_manifest(signed_part(NEW), SIGNERS[:1])
    err = host.attempt(order_for(NEW, artifact_server, manifest, roles=(Role.BIN,)))
    assert isinstance(err, SignatureError) and "installed whole" in str(err)
    host.assert_untouched()


def test_slow_retrieval_the_deadline_fires(tmp_path: Path, artifact_server: ArtifactServer) -> None:
    host = Host(tmp_path, timeout_s=1.5)
    serve(artifact_server, NEW, bin=Fault(trickle_bytes_per_s=200))
    manifest = sign_manifest(signed_part(NEW), SIGNERS[:1])
    started = time.monotonic()
    err = host.attempt(order_for(NEW, artifact_server, manifest))
    assert isinstance(err, DeadlineExceeded), err
    assert time.monotonic() - started < 6
    host.assert_untouched()


@pytest.mark.parametrize(
    ("field", "value"), [("product", "another-daemon"), ("platform", "linux-aarch64")]
)
def test_wrong_target_a_manifest_for_another_product_or_platform(
    host: Host, artifact_server: ArtifactServer, field: str, value: str
) -> None:
    serve(artifact_server, NEW)
    manifest = sign_manifest(signed_part(NEW, **{field: value}), SIGNERS[:1])
    err = host.attempt(order_for(NEW, artifact_server, manifest))
    assert isinstance(err, SignatureError) and value in str(err)
    host.assert_untouched()
