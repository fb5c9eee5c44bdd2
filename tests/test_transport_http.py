"""HttpTransport and HttpFetcher against real HTTP servers on 127.0.0.1."""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
import time
from collections.abc import Iterator

import pytest

from selfupgrade import (
    DeadlineExceeded,
    DownloadError,
    Heartbeat,
    HttpFetcher,
    HttpSettings,
    HttpTransport,
    OrderRejected,
    SizeMismatch,
    TransportError,
    UnsafeURL,
    parse_version,
)
from selfupgrade.testing import ArtifactServer, ControlServer, Fault, toy_release

FAST = HttpSettings(connect_timeout_s=1, read_timeout_s=1, backoff_base_s=0.01, backoff_cap_s=0.05)
BEAT = Heartbeat(host="h1", version=parse_version("1.0"))


class _Sink:
    def __init__(self, cap: int = 1 << 30) -> None:
        self.data = bytearray()
        self.restarts = 0
        self.cap = cap
        self.announced: list[int] = []

    @property
    def received(self) -> int:
        return len(self.data)

    def write(self, chunk: bytes) -> None:
        if len(self.data) + len(chunk) > self.cap:
            raise SizeMismatch(
                "cap", url="u", expected=self.cap, actual=len(self.data) + len(chunk)
            )
        self.data += chunk

    def restart(self) -> None:
        self.data.clear()
        self.restarts += 1

    def announce(self, size: int) -> None:
        self.announced.append(size)


@pytest.fixture
def flaky_server() -> Iterator[tuple[str, list[int]]]:
    """Answers 503 to the first two POSTs, then a valid empty reply; records statuses."""
    statuses: list[int] = []

    class H(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a: object) -> None:
            pass

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            status = 503 if len(statuses) < 2 else 200
            statuses.append(status)
            body = b"busy" if status == 503 else json.dumps({"order": None}).encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hb", statuses
    finally:
        server.shutdown()
        server.server_close()


def test_heartbeat_returns_the_published_order(control_server: ControlServer) -> None:
    order = toy_release("1.1").order("http://127.0.0.1:9/files")
    control_server.publish(order)
    transport = HttpTransport(control_server.url, settings=FAST)
    try:
        assert transport.heartbeat(BEAT) == order
        control_server.publish(None)
        assert transport.heartbeat(BEAT) is None
    finally:
        transport.close()
    assert [b.host for b in control_server.beats] == ["h1", "h1"]


def test_heartbeat_retries_5xx_with_backoff(flaky_server: tuple[str, list[int]]) -> None:
    url, statuses = flaky_server
    sleeps: list[float] = []
    transport = HttpTransport(url, settings=FAST, sleep=sleeps.append, uniform=lambda: 0.5)
    assert transport.heartbeat(BEAT) is None
    assert statuses == [503, 503, 200]
    assert sleeps == [pytest.approx(0.005), pytest.approx(0.01)]  # full jitter: 0.5 * base * 2**n


def test_heartbeat_gives_up_with_the_status(flaky_server: tuple[str, list[int]]) -> None:
    url, statuses = flaky_server
    transport = HttpTransport(url, settings=HttpSettings(heartbeat_attempts=2, backoff_base_s=0.01))
    with pytest.raises(TransportError) as info:
        transport.heartbeat(BEAT)
    assert info.value.status_code == 503
    assert statuses == [503, 503]


def test_heartbeat_times_out_on_a_silent_server(silent_port: int) -> None:
    settings = HttpSettings(
        connect_timeout_s=0.5, read_timeout_s=0.3, heartbeat_attempts=2, backoff_base_s=0.01
    )
    transport = HttpTransport(f"http://127.0.0.1:{silent_port}/hb", settings=settings)
    started = time.monotonic()
    with pytest.raises(TransportError, match="Timeout"):
        transport.heartbeat(BEAT)
    assert time.monotonic() - started < 5


def test_heartbeat_refused_connection_is_a_transport_error(closed_port: int) -> None:
    transport = HttpTransport(f"http://127.0.0.1:{closed_port}/hb", settings=FAST)
    with pytest.raises(TransportError, match="ConnectError"):
        transport.heartbeat(BEAT)


def test_heartbeat_with_a_hostile_order_is_rejected(control_server: ControlServer) -> None:
    wire = toy_release("1.1").order("http://127.0.0.1:9/f").to_wire()
    wire["artifacts"]["bin"]["url"] = "file:///bin/sh"

    class Evil:
        def to_wire(self) -> dict[str, object]:
            return wire

    control_server.publish(Evil())  # type: ignore[arg-type]
    with pytest.raises(OrderRejected, match="only http and https"):
        HttpTransport(control_server.url, settings=FAST).heartbeat(BEAT)


def test_transport_refuses_other_schemes() -> None:
    with pytest.raises(UnsafeURL):
        HttpTransport("file:///tmp/hb")


def _fetch(
    url: str, *, settings: HttpSettings = FAST, deadline_s: float = 10, cap: int = 1 << 30
) -> _Sink:
    sink = _Sink(cap)
    HttpFetcher(settings=settings, sleep=lambda s: None).fetch(
        url, sink, deadline=time.monotonic() + deadline_s, max_bytes=cap
    )
    return sink


DATA = bytes(range(256)) * 4096  # 1 MiB


def test_fetch_streams_the_bytes(artifact_server: ArtifactServer) -> None:
    sink = _fetch(artifact_server.add("bin_1.1", DATA))
    assert hashlib.sha256(sink.data).digest() == hashlib.sha256(DATA).digest()


def test_fetch_resumes_with_range_after_a_drop(artifact_server: ArtifactServer) -> None:
    url = artifact_server.add("bin", DATA, fault=Fault(drop_after=300_000, drop_times=2))
    sink = _fetch(url)
    assert bytes(sink.data) == DATA
    assert sink.restarts == 0
    ranges = [r.range for r in artifact_server.requests]
    assert ranges[0] is None
    assert ranges[1] == "bytes=300000-"
    assert ranges[2] == "bytes=600000-"
    assert [r.status for r in artifact_server.requests] == [200, 206, 206]


def test_fetch_without_range_support_fails_cleanly_after_a_drop(
    artifact_server: ArtifactServer,
) -> None:
    url = artifact_server.add("bin", DATA, fault=Fault(drop_after=1000, no_range=True))
    with pytest.raises(DownloadError, match="failed after 1000 bytes"):
        _fetch(url)


def test_fetch_restarts_when_the_file_changed_between_tries(
    artifact_server: ArtifactServer,
) -> None:
    url = artifact_server.add("bin", DATA, fault=Fault(drop_after=1000))
    sink = _Sink()
    fetcher = HttpFetcher(settings=FAST, sleep=lambda s: artifact_server.add("bin", DATA[::-1]))
    fetcher.fetch(url, sink, deadline=time.monotonic() + 10, max_bytes=1 << 30)
    assert bytes(sink.data) == DATA[::-1]  # If-Range saw the new ETag: whole new file
    assert sink.restarts == 1


@pytest.mark.parametrize(
    ("fault", "status"),
    [(Fault(status=404), 404), (Fault(status=500), 500), (Fault(status=503), 503)],
)
def test_fetch_error_status_names_the_url(
    artifact_server: ArtifactServer, fault: Fault, status: int
) -> None:
    url = artifact_server.add("bin", DATA, fault=fault)
    with pytest.raises(DownloadError) as info:
        _fetch(url)
    assert info.value.status_code == status
    assert info.value.url == url


def test_fetch_deadline_fires_on_a_trickle(artifact_server: ArtifactServer) -> None:
    url = artifact_server.add("bin", DATA, fault=Fault(trickle_bytes_per_s=20_000))
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        _fetch(url, deadline_s=1.0)
    assert time.monotonic() - started < 4


def test_fetch_refuses_an_announced_oversize_body(artifact_server: ArtifactServer) -> None:
    url = artifact_server.add("bin", DATA)
    with pytest.raises(SizeMismatch, match="announces 1048576 bytes"):
        _fetch(url, cap=1000)


def test_fetch_stops_an_endless_body_at_the_cap(artifact_server: ArtifactServer) -> None:
    url = artifact_server.add("bin", b"", fault=Fault(endless=True))
    with pytest.raises(SizeMismatch):
        _fetch(url, cap=5 << 20)


@pytest.mark.parametrize(
    "target", ["file:///etc/passwd", "ftp://127.0.0.1/x", "gopher://127.0.0.1/"]
)
def test_fetch_refuses_a_redirect_to_another_scheme(
    artifact_server: ArtifactServer, target: str
) -> None:
    url = artifact_server.add("bin", DATA, fault=Fault(redirect_to=target))
    with pytest.raises(UnsafeURL, match="redirects to a refused URL"):
        _fetch(url)


def test_fetch_follows_a_redirect_to_http(artifact_server: ArtifactServer) -> None:
    real = artifact_server.add("real", DATA)
    url = artifact_server.add("bin", b"", fault=Fault(redirect_to=real))
    assert bytes(_fetch(url).data) == DATA


def test_fetch_can_refuse_redirects_to_another_host() -> None:
    with ArtifactServer() as one, ArtifactServer(host="127.0.0.2") as two:
        real = two.add("real", DATA)
        url = one.add("bin", b"", fault=Fault(redirect_to=real))
        with pytest.raises(UnsafeURL, match="another host"):
            _fetch(url, settings=HttpSettings(same_host_redirects=True))
        assert bytes(_fetch(url).data) == DATA


def test_fetch_times_out_on_a_silent_server(silent_port: int) -> None:
    settings = HttpSettings(connect_timeout_s=0.5, read_timeout_s=0.5)
    with pytest.raises(DownloadError):
        _fetch(f"http://127.0.0.1:{silent_port}/bin", settings=settings, deadline_s=5)
