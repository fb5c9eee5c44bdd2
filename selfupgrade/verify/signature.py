"""Signed releases: an Ed25519-signed manifest binds a version to its artifacts' bytes.

Needs ``selfupgrade[sign]`` (the ``cryptography`` package). A manifest is JSON::

    {"signed": {"_type": "selfupgrade-release", "product": "falcon-agent",
                "platform": "linux-x86_64", "version": "6.0.1", "expires": 1798761600,
                "rollback": false,
                "artifacts": {"bin": {"name": "bin_6.0.1", "size": 8812, "sha256": "..."},
                              "cfg": {"name": "cfg_6.0.1", "size": 510, "sha256": "..."}}},
     "signatures": [{"keyid": "<sha256 of the raw public key, hex>", "sig": "<base64>"}]}

The signature covers the canonical JSON of ``signed`` (sorted keys, no spaces, UTF-8). An agent
configured with trusted keys and a threshold (:class:`SignatureVerifier`) installs an order
only if its manifest is signed by at least ``threshold`` distinct trusted keys, has not expired,
is for this product and platform, names the order's version, lists exactly the order's
artifacts, and, when it is older than the running version, says ``rollback: true``. The bytes
are then checked against the manifest's sha256 and size while they stream, whatever the order
or the server claims. The attacks this answers are listed in ``docs/security.md``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

try:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "selfupgrade.verify.signature needs the 'sign' extra: pip install 'selfupgrade[sign]'"
    ) from exc

from ..errors import DigestMismatch, SignatureError, SizeMismatch
from ..models import Artifact, Role, UpgradeOrder, Version, parse_version

__all__ = [
    "MANIFEST_TYPE",
    "Manifest",
    "ManifestArtifact",
    "SignatureVerifier",
    "canonical",
    "generate_key",
    "key_id",
    "load_private_key",
    "load_public_key",
    "manifest_for_directory",
    "sign_manifest",
]

MANIFEST_TYPE = "selfupgrade-release"
MAX_MANIFEST_BYTES = 256 * 1024
_HEX64 = frozenset("0123456789abcdef")


def canonical(signed: Mapping[str, Any]) -> bytes:
    """The bytes a signature covers: sorted keys, no whitespace, UTF-8."""
    return json.dumps(signed, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def key_id(key: Ed25519PublicKey) -> str:
    """A public key's id: the sha256 of its 32 raw bytes, in hex."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def generate_key() -> tuple[bytes, bytes]:
    """A new Ed25519 key pair as PEM: ``(private, public)``. Keep the private one offline."""
    private = Ed25519PrivateKey.generate()
    return (
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
    )


def load_private_key(pem: bytes) -> Ed25519PrivateKey:
    """An Ed25519 private key from PEM.

    Raises:
        ValueError: not an Ed25519 private key.
    """
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError("not an Ed25519 private key")
    return key


def load_public_key(pem: bytes) -> Ed25519PublicKey:
    """An Ed25519 public key from PEM.

    Raises:
        ValueError: not an Ed25519 public key.
    """
    key = serialization.load_pem_public_key(pem)
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError("not an Ed25519 public key")
    return key


@dataclass(frozen=True)
class ManifestArtifact:
    """One artifact as the manifest describes it."""

    name: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """A parsed manifest (its signatures are checked by :class:`SignatureVerifier`)."""

    product: str
    platform: str
    version: Version
    expires: float
    rollback: bool
    artifacts: Mapping[Role, ManifestArtifact]
    signed: Mapping[str, Any]
    signatures: tuple[tuple[str, bytes], ...]

    @classmethod
    def parse(cls, data: bytes) -> Manifest:
        """Parse and check the structure of a manifest.

        Raises:
            SignatureError: naming what is malformed.
        """
        if len(data) > MAX_MANIFEST_BYTES:
            raise SignatureError(f"the manifest is larger than {MAX_MANIFEST_BYTES} bytes")
        try:
            obj = json.loads(data)
            signed = obj["signed"]
            raw_sigs = obj["signatures"]
            if signed.get("_type") != MANIFEST_TYPE:
                raise ValueError(f"_type is not {MANIFEST_TYPE!r}")
            artifacts = {}
            for role_name, spec in signed["artifacts"].items():
                sha = spec["sha256"]
                size = spec["size"]
                if not (isinstance(sha, str) and len(sha) == 64 and set(sha) <= _HEX64):
                    raise ValueError(f"artifacts.{role_name}.sha256 is not 64 lowercase hex digits")
                if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                    raise ValueError(f"artifacts.{role_name}.size is not a byte count")
                artifacts[Role(role_name)] = ManifestArtifact(str(spec["name"]), size, sha)
            if not artifacts:
                raise ValueError("no artifacts")
            sigs = tuple(
                (str(s["keyid"]), base64.b64decode(s["sig"], validate=True)) for s in raw_sigs
            )
            expires = signed["expires"]
            if isinstance(expires, bool) or not isinstance(expires, (int, float)):
                raise ValueError("expires is not a time")
            return cls(
                product=str(signed["product"]),
                platform=str(signed["platform"]),
                version=parse_version(signed["version"]),
                expires=float(expires),
                rollback=signed.get("rollback") is True,
                artifacts=artifacts,
                signed=signed,
                signatures=sigs,
            )
        except SignatureError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError, binascii.Error) as exc:
            raise SignatureError(f"malformed manifest: {exc}") from None


def manifest_for_directory(
    directory: Path,
    *,
    version: str,
    product: str,
    platform: str,
    expires: float,
    rollback: bool = False,
) -> dict[str, Any]:
    """The ``signed`` part for the artifacts in ``directory``.

    Files named ``bin_<version>``, ``cfg_<version>`` and ``service_<version>`` are taken, the
    layout falcon's file server uses.

    Raises:
        ValueError: no such file in the directory, or an invalid version.
    """
    parse_version(version)
    artifacts = {}
    for role in Role:
        path = directory / f"{role.value}_{version}"
        if path.is_file():
            data = path.read_bytes()
            artifacts[role.value] = {
                "name": path.name,
                "size": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
            }
    if not artifacts:
        raise ValueError(f"no bin_{version}, cfg_{version} or service_{version} in {directory}")
    return {
        "_type": MANIFEST_TYPE,
        "product": product,
        "platform": platform,
        "version": version,
        "expires": int(expires),
        "rollback": rollback,
        "artifacts": artifacts,
    }


def sign_manifest(
    signed: Mapping[str, Any],
    keys: Iterable[Ed25519PrivateKey],
    *,
    existing: bytes | None = None,
) -> bytes:
    """A manifest of ``signed`` with a signature by each key (added to ``existing``'s).

    Raises:
        ValueError: ``existing`` signs something else.
    """
    sigs: list[dict[str, str]] = []
    if existing is not None:
        old = json.loads(existing)
        if canonical(old["signed"]) != canonical(signed):
            raise ValueError("the existing manifest signs different content")
        sigs = list(old["signatures"])
    message = canonical(signed)
    for key in keys:
        kid = key_id(key.public_key())
        sigs = [s for s in sigs if s["keyid"] != kid]
        sigs.append({"keyid": kid, "sig": base64.b64encode(key.sign(message)).decode()})
    return json.dumps({"signed": dict(signed), "signatures": sigs}, indent=1).encode()


class _ManifestCheck:
    """Hashes a stream and holds it to the manifest's size and sha256."""

    def __init__(self, url: str, expected: ManifestArtifact) -> None:
        self._url = url
        self._expected = expected
        self._hash = hashlib.sha256()
        self._size = 0

    def update(self, chunk: bytes | bytearray) -> None:
        self._size += len(chunk)
        if self._size > self._expected.size:
            raise SizeMismatch(
                f"{self._url} sent more than the {self._expected.size} bytes its signed "
                "manifest allows",
                url=self._url,
                expected=self._expected.size,
                actual=self._size,
            )
        self._hash.update(chunk)

    def finish(self) -> None:
        if self._size != self._expected.size:
            raise SizeMismatch(
                f"{self._url} ended after {self._size} of the {self._expected.size} bytes its "
                "signed manifest names",
                url=self._url,
                expected=self._expected.size,
                actual=self._size,
            )
        actual = self._hash.hexdigest()
        if not hmac.compare_digest(actual, self._expected.sha256):
            raise DigestMismatch(
                url=self._url, algorithm="sha256", expected=self._expected.sha256, actual=actual
            )


class SignatureVerifier:
    """Installs only what trusted keys signed for this product and platform.

    Args:
        trusted_keys: the public keys whose signatures count.
        threshold: distinct trusted signatures a manifest needs.
        product: this agent's product name; a manifest for another product is refused.
        platform: this agent's platform (``linux-x86_64``); another platform is refused.
        clock: the current time in seconds since the epoch (for expiry).

    Raises:
        ValueError: no key, or a threshold above the number of keys.
    """

    def __init__(
        self,
        trusted_keys: Iterable[Ed25519PublicKey],
        *,
        threshold: int = 1,
        product: str,
        platform: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._keys = {key_id(k): k for k in trusted_keys}
        if not self._keys:
            raise ValueError("a SignatureVerifier needs at least one trusted key")
        if not 1 <= threshold <= len(self._keys):
            raise ValueError(f"threshold must be between 1 and {len(self._keys)}")
        self.threshold = threshold
        self.product = product
        self.platform = platform
        self._clock = clock
        self._verified: Manifest | None = None

    def check_order(self, order: UpgradeOrder, *, current: Version | None = None) -> None:
        """Check the order's manifest; see the module docstring.

        Raises:
            SignatureError: unsigned, malformed, unknown keys, below the threshold, altered,
                expired, another product or platform, another version, other artifacts, or an
                older release not signed as a rollback.
        """
        self._verified = None
        if order.manifest is None:
            raise SignatureError(
                f"the order for {order.version} has no signed manifest, and this agent installs "
                "only signed releases"
            )
        manifest = Manifest.parse(order.manifest)
        self._check_signatures(manifest)
        now = self._clock()
        if manifest.expires <= now:
            raise SignatureError(
                f"the manifest for {manifest.version} expired "
                f"{int(now - manifest.expires)} s ago; a fresh signature is needed"
            )
        if (manifest.product, manifest.platform) != (self.product, self.platform):
            raise SignatureError(
                f"the manifest is for {manifest.product} on {manifest.platform}; this agent is "
                f"{self.product} on {self.platform}"
            )
        if manifest.version != order.version:
            raise SignatureError(
                f"the manifest is for {manifest.version} but the order is for {order.version}"
            )
        roles = {a.role for a in order.release.artifacts}
        if roles != set(manifest.artifacts):
            raise SignatureError(
                f"the order carries {sorted(r.value for r in roles)} but the signed release is "
                f"{sorted(r.value for r in manifest.artifacts)}; a release is installed whole"
            )
        if current is not None and manifest.version < current and not manifest.rollback:
            raise SignatureError(
                f"{manifest.version} is older than the running {current} and its manifest is "
                "not signed as a rollback"
            )
        self._verified = manifest

    def _check_signatures(self, manifest: Manifest) -> None:
        message = canonical(manifest.signed)
        valid: set[str] = set()
        unknown: list[str] = []
        altered: list[str] = []
        for kid, sig in manifest.signatures:
            key = self._keys.get(kid)
            if key is None:
                unknown.append(kid[:16])
                continue
            try:
                key.verify(sig, message)
            except InvalidSignature:
                altered.append(kid[:16])
                continue
            valid.add(kid)
        if len(valid) >= self.threshold:
            return
        if altered:
            raise SignatureError(
                f"signature(s) by {altered} do not match the manifest: it was altered after signing"
            )
        if not manifest.signatures:
            raise SignatureError("the manifest carries no signature")
        if not valid:
            raise SignatureError(f"the manifest is signed only by unknown keys {unknown}")
        raise SignatureError(
            f"the manifest has {len(valid)} valid trusted signature(s); {self.threshold} needed"
        )

    def begin(self, artifact: Artifact) -> _ManifestCheck:
        """Hold ``artifact``'s bytes to the verified manifest's size and sha256.

        Raises:
            SignatureError: no order was verified, or the manifest does not list the artifact.
        """
        manifest = self._verified
        if manifest is None or artifact.role not in manifest.artifacts:
            raise SignatureError(f"no verified manifest covers the {artifact.role.value} artifact")
        return _ManifestCheck(artifact.url, manifest.artifacts[artifact.role])
