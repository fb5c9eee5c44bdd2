"""The Transport role: heartbeats to the control server, and fetching artifacts."""

from .base import ByteSink, Fetcher, KeepingSink, PacedTransport, Transport
from .falcon_rpc import FalconRpcTransport
from .http import HttpFetcher, HttpSettings, HttpTransport

__all__ = [
    "ByteSink",
    "FalconRpcTransport",
    "Fetcher",
    "HttpFetcher",
    "HttpSettings",
    "HttpTransport",
    "KeepingSink",
    "PacedTransport",
    "Transport",
]
