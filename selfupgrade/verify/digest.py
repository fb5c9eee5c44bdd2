"""Digest verification: md5 (integrity only, for the falcon protocol), sha256, sha512."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable

from ..errors import DigestMismatch, OrderRejected
from ..models import Artifact, Digest, HashAlgorithm, UpgradeOrder, Version

__all__ = ["DigestCheck", "DigestVerifier"]

log = logging.getLogger("selfupgrade.verify")


class DigestCheck:
    """Hashes a stream and compares the result with the expected digest in constant time."""

    def __init__(self, url: str, expected: Digest) -> None:
        self._url = url
        self._expected = expected
        self._hash = hashlib.new(expected.algorithm)

    def update(self, chunk: bytes | bytearray) -> None:
        """Feed the next chunk."""
        self._hash.update(chunk)

    def finish(self) -> None:
        """Raises:
        DigestMismatch: naming the URL, the expected and the actual digest.
        """
        actual = self._hash.hexdigest()
        if not self._expected.matches(actual):
            raise DigestMismatch(
                url=self._url,
                algorithm=self._expected.algorithm,
                expected=self._expected.hex,
                actual=actual,
            )


class DigestVerifier:
    """Trusts an artifact when its bytes hash to the digest the order announced.

    This proves the bytes are the ones the *server* meant, not that the server is honest:
    for authenticity use :class:`selfupgrade.verify.signature.SignatureVerifier`.

    Args:
        allow_md5: accept md5 digests. md5 detects a corrupted download but anyone can forge
            a file with a chosen md5, so it is off unless the falcon protocol needs it.
        algorithms: the algorithms accepted besides md5.
    """

    def __init__(
        self, *, allow_md5: bool = False, algorithms: Iterable[HashAlgorithm] = ("sha256", "sha512")
    ) -> None:
        self._accepted = set(algorithms) | ({"md5"} if allow_md5 else set())
        self._warned = False

    def check_order(self, order: UpgradeOrder, *, current: Version | None = None) -> None:
        """Raises:
        OrderRejected: if an artifact's digest uses an algorithm this verifier does not accept.
        """
        for artifact in order.release.artifacts:
            algorithm = artifact.digest.algorithm
            if algorithm not in self._accepted:
                hint = (
                    "; pass allow_md5=True to accept the falcon protocol's md5"
                    if algorithm == "md5"
                    else ""
                )
                raise OrderRejected(
                    f"{artifact.role.value} artifact uses {algorithm}, which this agent does not "
                    f"accept (accepted: {sorted(self._accepted)}){hint}"
                )
            if artifact.digest.integrity_only and not self._warned:
                self._warned = True
                log.warning(
                    "accepting md5 digests: they catch corrupted downloads, not forged ones"
                )

    def begin(self, artifact: Artifact) -> DigestCheck:
        """Start hashing ``artifact``'s bytes with its digest's algorithm."""
        return DigestCheck(artifact.url, artifact.digest)
