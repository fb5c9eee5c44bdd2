"""The Verifier role and its implementations."""

from .base import StreamCheck, Verifier
from .digest import DigestCheck, DigestVerifier

__all__ = ["DigestCheck", "DigestVerifier", "StreamCheck", "Verifier"]
