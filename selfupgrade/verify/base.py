"""The Verifier role: decides whether an order and its bytes may be trusted.

A verifier is asked twice per upgrade:

1. :meth:`Verifier.check_order`, before anything is downloaded, with the whole order and the
   running version. A signature verifier checks the release manifest here; a digest verifier
   checks that the order's digests use algorithms it accepts.
2. :meth:`Verifier.begin` for each artifact, which returns a :class:`StreamCheck` that sees
   every chunk as it arrives and, at the end, says whether the bytes are the expected ones.

Contract: ``check_order`` raises :class:`~selfupgrade.errors.UntrustedContent` or
:class:`~selfupgrade.errors.OrderRejected`; ``StreamCheck.finish`` raises
:class:`~selfupgrade.errors.DigestMismatch`. Anything else a plug-in raises is treated by the
updater as "do not install" too. The verifier never touches files: the updater owns the bytes
and deletes them when a check fails.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from ..models import Artifact, UpgradeOrder, Version

__all__ = ["StreamCheck", "Verifier"]


@runtime_checkable
class StreamCheck(Protocol):
    """Checks one artifact's bytes as they stream in."""

    def update(self, chunk: bytes | bytearray) -> None:
        """Feed the next chunk (``bytes``, or a ``bytearray`` nobody changes: the check
        reads it during the call and must not keep it)."""

    def finish(self) -> None:
        """Declare the stream complete.

        Raises:
            DigestMismatch: if the bytes are not the expected ones.
        """


@runtime_checkable
class Verifier(Protocol):
    """Decides whether an order, and then each artifact's bytes, may be installed."""

    def check_order(self, order: UpgradeOrder, *, current: Version | None = None) -> None:
        """Accept or refuse the order as a whole, before any download.

        Args:
            order: the order.
            current: the version this host runs (a signed verifier refuses an older release
                unless its manifest is signed as a rollback).

        Raises:
            UntrustedContent: the order's trust data (manifest, digests) is not acceptable.
            OrderRejected: the order asks for something this host does not allow.
        """

    def begin(self, artifact: Artifact) -> StreamCheck:
        """Start checking the bytes of ``artifact``."""
