"""Building releases for tests: from a user's own files, or from the toy daemon; optionally signed.

::

    factory = ReleaseFactory()                     # or the ``release_factory`` fixture
    v2 = factory.from_files("2.0", bin=Path("dist/mydaemon"), cfg=b'{"port": 8080}')
    toy = factory.toy("1.1", behaviour="crash")
    signed = factory.signed(v2, product="mydaemon", platform="linux-x86_64")
    order = signed.order(server.base_url)

A release is a :class:`~selfupgrade.testing.toy.ToyRelease`: the bytes of each role, the file
names they are installed under, and (when signed) the manifest that goes with the order.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..models import Role, parse_version
from .toy import TOY_FILES, Behaviour, ToyRelease, toy_release

__all__ = ["ReleaseFactory"]


def _bytes(value: bytes | str | Path) -> bytes:
    if isinstance(value, bytes):
        return value
    return Path(value).read_bytes()


class ReleaseFactory:
    """Builds releases; holds one Ed25519 signing key (made on first use) for signed ones.

    Args:
        names: file names of the roles in an install directory (default: the toy's).
    """

    def __init__(self, names: Mapping[Role, str] | None = None) -> None:
        self.names = dict(names or TOY_FILES)
        self._private_pem: bytes | None = None
        self._public_pem: bytes | None = None

    def toy(
        self,
        version: str,
        *,
        behaviour: Behaviour = "ok",
        config: Mapping[str, object] | None = None,
    ) -> ToyRelease:
        """The toy daemon's triple of ``version`` (see :func:`toy_release`)."""
        return toy_release(version, behaviour=behaviour, config=config)

    def from_files(
        self,
        version: str,
        *,
        bin: bytes | str | Path | None = None,
        cfg: bytes | str | Path | None = None,
        service: bytes | str | Path | None = None,
    ) -> ToyRelease:
        """A release of the user's own files (paths or bytes); any subset of the roles.

        Raises:
            ValueError: no file given, or an invalid version.
        """
        parse_version(version)
        given = {Role.BIN: bin, Role.CFG: cfg, Role.SERVICE: service}
        files = {role: _bytes(v) for role, v in given.items() if v is not None}
        if not files:
            raise ValueError("a release needs at least one of bin, cfg, service")
        return ToyRelease(version=version, files=files, names=self.names)

    # ---- signing -----------------------------------------------------------------------

    @property
    def public_key_pem(self) -> bytes:
        """The factory's public key (PEM), for the agents under test to trust."""
        self._ensure_key()
        assert self._public_pem is not None
        return self._public_pem

    def trusted_keys(self) -> list[Any]:
        """The factory's public key as a list for :class:`SignatureVerifier`."""
        from ..verify.signature import load_public_key

        return [load_public_key(self.public_key_pem)]

    def _ensure_key(self) -> None:
        if self._private_pem is None:
            from ..verify.signature import generate_key

            self._private_pem, self._public_pem = generate_key()

    def signed(
        self,
        release: ToyRelease,
        *,
        product: str,
        platform: str,
        expires_s: float = 3600.0,
        rollback: bool = False,
    ) -> ToyRelease:
        """``release`` with a manifest signed by the factory's key (needs ``selfupgrade[sign]``)."""
        from ..verify.signature import MANIFEST_TYPE, load_private_key, sign_manifest

        self._ensure_key()
        assert self._private_pem is not None
        signed = {
            "_type": MANIFEST_TYPE,
            "product": product,
            "platform": platform,
            "version": release.version,
            "expires": int(time.time() + expires_s),
            "rollback": rollback,
            "artifacts": {
                role.value: {
                    "name": release.artifact_name(role),
                    "size": len(data),
                    "sha256": hashlib.sha256(data).hexdigest(),
                }
                for role, data in release.files.items()
            },
        }
        manifest = sign_manifest(signed, [load_private_key(self._private_pem)])
        return replace(release, manifest=manifest)
