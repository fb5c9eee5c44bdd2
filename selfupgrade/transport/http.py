"""Heartbeats and downloads over HTTP, on httpx.

:class:`HttpTransport` posts a heartbeat as JSON and reads ``{"order": ...}`` back, retrying
passing failures with exponential back-off and full jitter. :class:`HttpFetcher` streams an
artifact into the updater's sink: timeouts on every call, a total deadline, redirects followed
by hand so each hop is checked (http/https only, never https to http, optionally the same host
only), and resumption with ``Range``/``If-Range`` after a dropped connection when the server
advertises ``Accept-Ranges: bytes``.
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
import ssl
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpcore
import httpx

from ..errors import (
    DeadlineExceeded,
    DownloadError,
    OrderRejected,
    SizeMismatch,
    TransportError,
    UnsafeURL,
)
from ..models import Heartbeat, UpgradeOrder, check_url
from ..policy import full_jitter
from .base import ByteSink, KeepingSink

__all__ = ["HttpFetcher", "HttpSettings", "HttpTransport"]

log = logging.getLogger("selfupgrade.transport")

# Downloads ask the socket for up to 1 MiB at a time: at httpcore's 64 KiB, the Python work
# per read made a 64 MiB download half as fast as curl on loopback.
_DOWNLOAD_READ_BYTES = 1 << 20

_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_RETRY_STATUS = frozenset({429, 500, 502, 503, 504})


@dataclass(frozen=True)
class HttpSettings:
    """Timeouts, retries and TLS for :class:`HttpTransport` and :class:`HttpFetcher`.

    Attributes:
        connect_timeout_s: to open a connection.
        read_timeout_s: between two reads; a server silent this long is given up on.
        write_timeout_s: to send a request.
        heartbeat_attempts: tries per heartbeat before :class:`TransportError` is raised.
        backoff_base_s, backoff_cap_s: full-jitter back-off between those tries.
        max_reply_bytes: the largest heartbeat reply read.
        max_redirects: hops followed per download.
        same_host_redirects: refuse a redirect to another host.
        max_resumes: how many times a dropped download is resumed with ``Range``.
        verify: ``True`` for the system CAs, a path to a CA bundle to pin, an
            :class:`ssl.SSLContext`, or ``False`` (tests only).
        headers: sent with every request (an ``Authorization`` header, for example).
    """

    connect_timeout_s: float = 5.0
    read_timeout_s: float = 15.0
    write_timeout_s: float = 15.0
    heartbeat_attempts: int = 3
    backoff_base_s: float = 0.5
    backoff_cap_s: float = 8.0
    max_reply_bytes: int = 1 << 20
    max_redirects: int = 5
    same_host_redirects: bool = False
    max_resumes: int = 5
    verify: bool | str | ssl.SSLContext = True
    headers: Mapping[str, str] = field(default_factory=dict)

    def client(self, *, read_bytes: int | None = None) -> httpx.Client:
        """A client configured with these settings (no automatic redirects).

        Args:
            read_bytes: read from the socket up to this many bytes at a time (httpcore reads
                64 KiB): for downloads of large files, where each read costs the same
                Python work whatever its size.
        """
        verify: bool | ssl.SSLContext = (
            ssl.create_default_context(cafile=self.verify)
            if isinstance(self.verify, str)
            else self.verify
        )
        transport = None
        if read_bytes is not None:
            transport = httpx.HTTPTransport(verify=verify, trust_env=False)
            _widen_reads(transport, read_bytes)
        return httpx.Client(
            transport=transport,
            timeout=httpx.Timeout(
                connect=self.connect_timeout_s,
                read=self.read_timeout_s,
                write=self.write_timeout_s,
                pool=self.connect_timeout_s,
            ),
            verify=verify,
            follow_redirects=False,
            trust_env=False,
            headers=dict(self.headers),
        )


class HttpTransport:
    """Posts heartbeats as JSON to ``url`` and returns the order in the reply.

    The reply is ``{"order": null}`` or ``{"order": {...}}`` (see
    :meth:`UpgradeOrder.to_wire`), with ``"next_beat_s"`` when the server paces check-ins
    (kept in :attr:`next_beat_s`; a value that is not a positive number is ignored, with a
    warning). Connection failures, timeouts and 429/5xx replies are retried
    ``settings.heartbeat_attempts`` times with full jitter.

    Args:
        url: the heartbeat endpoint, for example ``http://127.0.0.1:6031/selfupgrade/v1/heartbeat``.
        settings: timeouts, retries, TLS.
        token: sent as ``Authorization: Bearer <token>`` when given.
        client: an httpx client to use instead of one built from ``settings``.
        uniform: source of random numbers in [0, 1) for the jitter.
        sleep: how to wait between tries.

    Raises:
        UnsafeURL: if ``url`` is not http or https.
    """

    def __init__(
        self,
        url: str,
        *,
        settings: HttpSettings | None = None,
        token: str | None = None,
        client: httpx.Client | None = None,
        uniform: Callable[[], float] = random.random,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.url = check_url(url)
        self._settings = settings or HttpSettings()
        self._client = client or self._settings.client()
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._uniform = uniform
        self._sleep = sleep
        self.next_beat_s: float | None = None

    def heartbeat(self, beat: Heartbeat) -> UpgradeOrder | None:
        """Send ``beat`` and return the server's order, or ``None``.

        Raises:
            TransportError: after the last try failed; ``status_code`` is set when the server
                answered with an error status.
            OrderRejected: the reply's order is malformed or unsafe.
        """
        self.next_beat_s = None
        body = json.dumps(beat.to_wire()).encode()
        headers = {"Content-Type": "application/json", **self._headers}
        attempts = max(1, self._settings.heartbeat_attempts)
        last: TransportError | None = None
        for attempt in range(attempts):
            if attempt:
                delay = full_jitter(
                    self._settings.backoff_base_s,
                    self._settings.backoff_cap_s,
                    attempt - 1,
                    self._uniform(),
                )
                self._sleep(delay)
            try:
                reply = self._post(body, headers)
            except TransportError as exc:
                last = exc
                if exc.status_code is not None and exc.status_code not in _RETRY_STATUS:
                    break
                log.debug("heartbeat try %d/%d failed: %s", attempt + 1, attempts, exc)
                continue
            order = _order_from_reply(reply, self.url)
            self.next_beat_s = _pace_from_reply(reply, self.url)
            return order
        assert last is not None
        raise last

    def _post(self, body: bytes, headers: dict[str, str]) -> object:
        try:
            with self._client.stream("POST", self.url, content=body, headers=headers) as resp:
                data = bytearray()
                for chunk in resp.iter_bytes():
                    data += chunk
                    if len(data) > self._settings.max_reply_bytes:
                        raise TransportError(
                            f"heartbeat reply from {self.url} exceeds "
                            f"{self._settings.max_reply_bytes} bytes",
                            url=self.url,
                        )
                if resp.status_code != 200:
                    raise TransportError(
                        f"heartbeat to {self.url} answered {resp.status_code}: "
                        f"{bytes(data[:200]).decode('utf-8', 'replace')}",
                        url=self.url,
                        status_code=resp.status_code,
                    )
        except httpx.HTTPError as exc:
            raise TransportError(
                f"heartbeat to {self.url} failed: {type(exc).__name__}: {exc}", url=self.url
            ) from exc
        try:
            return json.loads(bytes(data))
        except ValueError as exc:
            raise TransportError(
                f"heartbeat reply from {self.url} is not JSON", url=self.url
            ) from exc

    def close(self) -> None:
        """Close the connection pool."""
        self._client.close()


def _order_from_reply(reply: object, url: str) -> UpgradeOrder | None:
    if not isinstance(reply, dict) or "order" not in reply:
        raise TransportError(f"heartbeat reply from {url} has no 'order' field", url=url)
    raw = reply["order"]
    if raw is None:
        return None
    try:
        return UpgradeOrder.from_wire(raw)
    except OrderRejected:
        raise
    except ValueError as exc:
        raise OrderRejected(f"the order from {url} is malformed: {exc}") from exc


def _pace_from_reply(reply: object, url: str) -> float | None:
    wait = reply.get("next_beat_s") if isinstance(reply, dict) else None
    if wait is None:
        return None
    if isinstance(wait, bool) or not isinstance(wait, (int, float)) or not 0 < wait < math.inf:
        log.warning("ignoring next_beat_s from %s: %r is not a positive number", url, wait)
        return None
    return float(wait)


class HttpFetcher:
    """Streams an artifact over HTTP into a sink, resuming with ``Range`` when it can.

    Args:
        settings: timeouts, redirects, resumption, TLS.
        client: an httpx client to use instead of one built from ``settings``.
        sleep: how to wait before a resumption.
    """

    def __init__(
        self,
        *,
        settings: HttpSettings | None = None,
        client: httpx.Client | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._settings = settings or HttpSettings()
        self._client = client or self._settings.client(read_bytes=_DOWNLOAD_READ_BYTES)
        self._sleep = sleep

    def fetch(self, url: str, sink: ByteSink, *, deadline: float, max_bytes: int) -> None:
        """Fetch ``url`` into ``sink``; see :meth:`Fetcher.fetch`.

        Raises:
            DownloadError: connection failure, error status, or too many resumptions.
            DeadlineExceeded: ``deadline`` passed.
            UnsafeURL: a redirect to another scheme (or host, when configured).
            SizeMismatch: the server announced more than ``max_bytes``.
        """
        check_url(url)
        resumes = 0
        validator: str | None = None
        ranges_ok = False
        while True:
            offset = sink.received
            headers = {"Accept-Encoding": "identity"}
            if offset:
                headers["Range"] = f"bytes={offset}-"
                if validator:
                    headers["If-Range"] = validator
            try:
                with self._open(url, headers, deadline) as resp:
                    if offset and resp.status_code == 206:
                        _check_content_range(resp, offset, url)
                    elif resp.status_code == 200:
                        if offset:
                            log.info("%s: server sent the whole file again; starting over", url)
                            sink.restart()
                        ranges_ok = resp.headers.get("accept-ranges", "").lower() == "bytes"
                        validator = _validator(resp)
                        length = resp.headers.get("content-length")
                        if length and length.isdigit() and int(length) > max_bytes:
                            raise SizeMismatch(
                                f"{url} announces {length} bytes, "
                                f"more than the allowed {max_bytes}",
                                url=url,
                                expected=max_bytes,
                                actual=int(length),
                            )
                        if length and length.isdigit():
                            sink.announce(int(length))
                    else:
                        raise DownloadError(
                            f"GET {url} answered {resp.status_code}",
                            url=url,
                            status_code=resp.status_code,
                        )
                    # httpx's chunks are new objects nobody changes: a sink may keep them
                    put = sink.take if isinstance(sink, KeepingSink) else sink.write
                    for chunk in resp.iter_raw():
                        if time.monotonic() > deadline:
                            raise DeadlineExceeded(
                                f"GET {url}: deadline passed after {sink.received} bytes", url=url
                            )
                        put(chunk)
                    return
            except httpx.TimeoutException as exc:
                if time.monotonic() >= deadline:
                    raise DeadlineExceeded(f"GET {url}: deadline passed", url=url) from exc
                failure: Exception = exc
            except httpx.TransportError as exc:
                failure = exc
            got = sink.received
            if not (ranges_ok and got > 0 and resumes < self._settings.max_resumes):
                raise DownloadError(
                    f"GET {url} failed after {got} bytes: {type(failure).__name__}: {failure}",
                    url=url,
                ) from failure
            resumes += 1
            log.info("%s: connection lost after %d bytes; resuming (%d)", url, got, resumes)
            self._sleep(min(0.2 * resumes, max(0.0, deadline - time.monotonic())))

    @contextmanager
    def _open(self, url: str, headers: dict[str, str], deadline: float) -> Iterator[httpx.Response]:
        current = url
        for _ in range(self._settings.max_redirects + 1):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DeadlineExceeded(f"GET {url}: deadline passed", url=url)
            s = self._settings
            timeout = httpx.Timeout(
                connect=min(s.connect_timeout_s, remaining),
                read=min(s.read_timeout_s, remaining),
                write=min(s.write_timeout_s, remaining),
                pool=min(s.connect_timeout_s, remaining),
            )
            request = self._client.build_request("GET", current, headers=headers, timeout=timeout)
            resp = self._client.send(request, stream=True, follow_redirects=False)
            if not resp.is_redirect:
                try:
                    yield resp
                finally:
                    resp.close()
                return
            location = resp.headers.get("location", "")
            resp.close()
            target = urljoin(current, location)
            self._check_redirect(current, target)
            log.debug("%s redirects to %s", current, target)
            current = target
        raise DownloadError(
            f"GET {url}: more than {self._settings.max_redirects} redirects", url=url
        )

    def _check_redirect(self, source: str, target: str) -> None:
        try:
            check_url(target)
        except UnsafeURL as exc:
            raise UnsafeURL(f"{source} redirects to a refused URL: {exc}", url=target) from None
        src, dst = urlsplit(source), urlsplit(target)
        if src.scheme == "https" and dst.scheme != "https":
            raise UnsafeURL(f"{source} redirects from https to {dst.scheme}", url=target)
        if self._settings.same_host_redirects and src.hostname != dst.hostname:
            raise UnsafeURL(f"{source} redirects to another host, {dst.hostname}", url=target)

    def close(self) -> None:
        """Close the connection pool."""
        self._client.close()


def _validator(resp: httpx.Response) -> str | None:
    etag: str | None = resp.headers.get("etag")
    if etag and not etag.startswith("W/"):
        return etag
    modified: str | None = resp.headers.get("last-modified")
    return modified


def _check_content_range(resp: httpx.Response, offset: int, url: str) -> None:
    match = _CONTENT_RANGE.fullmatch(resp.headers.get("content-range", "").strip())
    if not match or int(match.group(1)) != offset:
        raise DownloadError(
            f"GET {url}: resumed at byte {offset} but the server sent "
            f"{resp.headers.get('content-range')!r}",
            url=url,
        )


class _WideStream(httpcore.NetworkStream):
    """A network stream whose reads ask the socket for at least ``read_bytes``."""

    def __init__(self, inner: httpcore.NetworkStream, read_bytes: int) -> None:
        self._inner = inner
        self._read_bytes = read_bytes

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max(max_bytes, self._read_bytes), timeout)

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, timeout)

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        inner = self._inner.start_tls(ssl_context, server_hostname, timeout)
        return _WideStream(inner, self._read_bytes)

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _WideBackend(httpcore.NetworkBackend):
    def __init__(self, inner: httpcore.NetworkBackend, read_bytes: int) -> None:
        self._inner = inner
        self._read_bytes = read_bytes

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        stream = self._inner.connect_tcp(host, port, timeout, local_address, socket_options)
        return _WideStream(stream, self._read_bytes)

    def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        stream = self._inner.connect_unix_socket(path, timeout, socket_options)
        return _WideStream(stream, self._read_bytes)

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


def _widen_reads(transport: httpx.HTTPTransport, read_bytes: int) -> None:
    """Give ``transport``'s connection pool a backend with wide reads. httpx has no public
    way to pass httpcore a network backend; if its pool is not where it was, downloads keep
    httpcore's reads (correct, only slower)."""
    pool = getattr(transport, "_pool", None)
    backend = getattr(pool, "_network_backend", None)
    if isinstance(backend, httpcore.NetworkBackend):
        pool._network_backend = _WideBackend(backend, read_bytes)  # type: ignore[union-attr]
    else:
        log.debug("httpx's connection pool has changed; downloads read 64 KiB at a time")
