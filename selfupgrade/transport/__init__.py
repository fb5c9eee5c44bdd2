"""The Transport role: heartbeats to the control server, and fetching artifacts."""

from .base import ByteSink, Fetcher, Transport
from .http import HttpFetcher, HttpSettings, HttpTransport

__all__ = ["ByteSink", "Fetcher", "HttpFetcher", "HttpSettings", "HttpTransport", "Transport"]
