"""A bounded HTTP load on 127.0.0.1, to show that an upgrade drops no connection::

    with HttpLoad(port, rate=200) as load:
        upgrade_the_daemon()
    report = load.report()
    assert report.refused == 0 and report.failed == 0

Its workers share ``rate`` requests per second: a share ``keep_alive`` of them reuse one
connection each (HTTP/1.1 keep-alive), the others open a new connection per request. Every
request is recorded (start, end, outcome, the answer's body), so a report can cover any window
of the run.

What counts as failed, said plainly: a request refused at connect is *refused*; one that gets
no complete ``200`` answer within ``timeout_s`` is *failed*. A request sent on a reused
keep-alive connection that the server closed before answering (no byte of an answer came) is
sent once more on a new connection, as RFC 9112 section 9.3.1 lets a client do for an
idempotent request and as HTTP client libraries do; it is counted as *retried*, and as failed
only if the second try fails.
"""

from __future__ import annotations

import http.client
import itertools
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

__all__ = ["HttpLoad", "LoadReport", "Request"]

Outcome = Literal["ok", "refused", "failed"]


@dataclass(frozen=True)
class Request:
    """One request of the load: when it started and ended (``time.monotonic()``), its outcome,
    the answer's body (``""`` without one), whether it was retried, and the error, if any."""

    start: float
    end: float
    outcome: Outcome
    body: str = ""
    retried: bool = False
    error: str = ""


@dataclass(frozen=True)
class LoadReport:
    """Figures over a window of the load."""

    requests: list[Request] = field(repr=False)

    @property
    def answered(self) -> int:
        """Requests answered ``200``."""
        return sum(r.outcome == "ok" for r in self.requests)

    @property
    def refused(self) -> int:
        """Requests whose connection was refused."""
        return sum(r.outcome == "refused" for r in self.requests)

    @property
    def failed(self) -> int:
        """Requests without a complete ``200`` answer (refused ones not counted)."""
        return sum(r.outcome == "failed" for r in self.requests)

    @property
    def retried(self) -> int:
        """Requests sent again after a keep-alive connection closed under them."""
        return sum(r.retried for r in self.requests)

    @property
    def errors(self) -> Counter[str]:
        """The errors of refused and failed requests, by kind."""
        return Counter(r.error for r in self.requests if r.outcome != "ok")

    @property
    def bodies(self) -> Counter[str]:
        """The answers' bodies (a daemon that says its version there shows who answered)."""
        return Counter(r.body for r in self.requests if r.outcome == "ok")

    def latency_s(self, quantile: float) -> float:
        """A latency quantile of the answered requests (0 without any)."""
        took = sorted(r.end - r.start for r in self.requests if r.outcome == "ok")
        if not took:
            return 0.0
        return took[min(len(took) - 1, int(quantile * len(took)))]

    @property
    def longest_gap_s(self) -> float:
        """The longest time between two consecutive answers."""
        ends = sorted(r.end for r in self.requests if r.outcome == "ok")
        return max((b - a for a, b in itertools.pairwise(ends)), default=0.0)

    def summary(self) -> str:
        """One line of figures."""
        return (
            f"{len(self.requests)} requests: {self.answered} answered, {self.refused} refused, "
            f"{self.failed} failed, {self.retried} retried; p99 {self.latency_s(0.99) * 1000:.1f}"
            f" ms, longest gap {self.longest_gap_s * 1000:.0f} ms"
        )


class HttpLoad:
    """``GET path`` on ``127.0.0.1:port`` at ``rate`` requests per second in all.

    Args:
        port: the daemon's port on 127.0.0.1.
        rate: requests per second over all workers (each waits for its answer, so a slow
            daemon gets fewer).
        keep_alive: the share of workers that keep their connection.
        workers: threads.
        timeout_s: for connecting and for each answer.
        path: what to ask for.
    """

    def __init__(
        self,
        port: int,
        *,
        rate: float = 200.0,
        keep_alive: float = 0.5,
        workers: int = 8,
        timeout_s: float = 10.0,
        path: str = "/",
    ) -> None:
        if rate <= 0 or workers < 1 or not 0 <= keep_alive <= 1:
            raise ValueError("rate must be > 0, workers >= 1 and keep_alive within 0..1")
        self.port = port
        self.path = path
        self._period = workers / rate
        self._timeout_s = timeout_s
        self._kinds = [i < round(workers * keep_alive) for i in range(workers)]
        self._done: list[Request] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> HttpLoad:
        for i, keep in enumerate(self._kinds):
            thread = threading.Thread(target=self._work, args=(keep,), name=f"load-{i}")
            thread.daemon = True
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop sending and wait for the requests in flight."""
        self._stop.set()
        for thread in self._threads:
            thread.join(self._timeout_s + 5)

    def report(self, since: float = 0.0, until: float = float("inf")) -> LoadReport:
        """The requests that started within ``[since, until)`` (``time.monotonic()``)."""
        with self._lock:
            return LoadReport([r for r in self._done if since <= r.start < until])

    def _connect(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=self._timeout_s)

    def _work(self, keep: bool) -> None:
        conn: http.client.HTTPConnection | None = None
        due = time.monotonic()
        while not self._stop.is_set():
            start = time.monotonic()
            reused = conn is not None
            if conn is None:
                conn = self._connect()
            request, conn = self._ask(conn, start, reused, keep)
            with self._lock:
                self._done.append(request)
            due = max(due + self._period, time.monotonic() - self._period)
            self._stop.wait(max(0.0, due - time.monotonic()))
        if conn is not None:
            conn.close()

    def _ask(
        self, conn: http.client.HTTPConnection, start: float, reused: bool, keep: bool
    ) -> tuple[Request, http.client.HTTPConnection | None]:
        retried = False
        while True:
            try:
                conn.request("GET", self.path, headers={} if keep else {"Connection": "close"})
                answer = conn.getresponse()
                body = answer.read().decode(errors="replace")
            except ConnectionRefusedError as exc:
                conn.close()
                return Request(start, time.monotonic(), "refused", "", retried, repr(exc)), None
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as exc:
                conn.close()
                if reused and not retried:
                    retried, conn = True, self._connect()
                    continue
                return Request(start, time.monotonic(), "failed", "", retried, repr(exc)), None
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                return Request(start, time.monotonic(), "failed", "", retried, repr(exc)), None
            end = time.monotonic()
            if answer.status != 200:
                conn.close()
                error = f"HTTP {answer.status}"
                return Request(start, end, "failed", body, retried, error), None
            if not keep or answer.will_close:
                conn.close()
                return Request(start, end, "ok", body, retried), None
            return Request(start, end, "ok", body, retried), conn
