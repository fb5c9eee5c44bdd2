"""The embedded store: SQLite in one file, for one hbs process; survives restarts.

State is kept in memory (see :class:`~selfupgrade.server.memory.MemoryStore`) and every
change is written through to SQLite in the same locked step, in one transaction, before the
heartbeat is answered. At start the file is read back, so an hbs restarted mid-rollout carries
on with the same task, leases and counters. SQLite runs in WAL mode with ``synchronous=NORMAL``:
a crash of hbs loses nothing; a power loss may lose the last moments' heartbeats, never a
half-written row.

One file serves one hbs process: a second process opening the same file is refused (several
hbs replicas share state through :class:`~selfupgrade.server.redis.RedisStore`).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Mapping
from pathlib import Path

import filelock

from .memory import MemoryStore, _TaskRecord
from .store import StoreError
from .tasks import HostProgress, HostSeen, Task, WaveCounters

__all__ = ["SqliteStore"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    id TEXT PRIMARY KEY,
    body TEXT NOT NULL,
    status TEXT NOT NULL,
    halt_reason TEXT NOT NULL DEFAULT '',
    done INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0,
    failures INTEGER NOT NULL DEFAULT 0,
    wave INTEGER NOT NULL DEFAULT 0,
    wave_done_at REAL,
    waves TEXT NOT NULL DEFAULT '[]',
    active INTEGER NOT NULL DEFAULT 0,
    seq INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS progress (
    task_id TEXT NOT NULL,
    host TEXT NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (task_id, host)
);
CREATE TABLE IF NOT EXISTS members (
    task_id TEXT NOT NULL,
    host TEXT NOT NULL,
    wave INTEGER NOT NULL,
    PRIMARY KEY (task_id, host)
);
CREATE TABLE IF NOT EXISTS hosts (
    host TEXT PRIMARY KEY,
    body TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS bad_versions (
    version TEXT PRIMARY KEY,
    reason TEXT NOT NULL
);
"""

_UPSERT_TASK = """
INSERT INTO tasks (id, body, status, halt_reason, done, failed, failures, wave, wave_done_at,
                   waves, active, seq)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT(id) DO UPDATE SET
    status = excluded.status, halt_reason = excluded.halt_reason, done = excluded.done,
    failed = excluded.failed, failures = excluded.failures, wave = excluded.wave,
    wave_done_at = excluded.wave_done_at, waves = excluded.waves, active = excluded.active
"""


class SqliteStore(MemoryStore):
    """The embedded store. ``path`` is created if missing.

    Raises:
        StoreError: the file cannot be opened, or another process uses it.
    """

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        self._seq = 0
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._flock = filelock.FileLock(str(self.path) + ".lock", timeout=0)
        try:
            self._flock.acquire()
        except filelock.Timeout:
            raise StoreError(
                f"another hbs process uses {self.path}; one embedded store serves one process "
                "(use the Redis store for several hbs replicas)"
            ) from None
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            self._load()
        except sqlite3.Error as exc:
            self._flock.release()
            raise StoreError(f"cannot use {self.path}: {exc}") from exc

    def _load(self) -> None:
        rows = self._db.execute(
            "SELECT id, body, status, halt_reason, done, failed, failures, wave, wave_done_at,"
            " waves, active FROM tasks ORDER BY seq"
        ).fetchall()
        for row in rows:
            task_id, body, status, halt, done, failed, failures, wave, done_at, waves, active = row
            record = _TaskRecord(
                Task.from_json(json.loads(body)),
                status,
                halt,
                done,
                failed,
                failures,
                wave,
                done_at,
            )
            record.waves = [WaveCounters(**w) for w in json.loads(waves)]
            for host, pbody in self._db.execute(
                "SELECT host, body FROM progress WHERE task_id = ?", (task_id,)
            ):
                progress = HostProgress.from_json(json.loads(pbody))
                record.progress[host] = progress
                if progress.state == "admitted":
                    record.hold(host, progress.lease_until)
            record.members = dict(
                self._db.execute("SELECT host, wave FROM members WHERE task_id = ?", (task_id,))
            )
            self._tasks[task_id] = record
            if active:
                self._active = task_id
            self._seq = max(self._seq, len(self._tasks))
        for (body,) in self._db.execute("SELECT body FROM hosts"):
            seen = HostSeen.from_json(json.loads(body))
            self._hosts[seen.host] = seen
        self._bad = dict(self._db.execute("SELECT version, reason FROM bad_versions"))

    def _persist(
        self, task_id: str, *, hosts: Iterable[str], members: Mapping[str, int] | None = None
    ) -> None:
        record = self._tasks[task_id]
        self._seq += 1
        waves = json.dumps([w.__dict__ for w in record.waves])
        try:
            self._db.execute("BEGIN")
            self._db.execute(
                _UPSERT_TASK,
                (
                    task_id,
                    json.dumps(record.task.to_json()),
                    record.status,
                    record.halt_reason,
                    record.done,
                    record.failed,
                    record.failures,
                    record.wave,
                    record.wave_done_at,
                    waves,
                    int(self._active == task_id),
                    self._seq,
                ),
            )
            self._db.executemany(
                "INSERT OR REPLACE INTO progress (task_id, host, body) VALUES (?, ?, ?)",
                [(task_id, h, json.dumps(record.progress[h].to_json())) for h in hosts],
            )
            if members:
                self._db.executemany(
                    "INSERT OR REPLACE INTO members (task_id, host, wave) VALUES (?, ?, ?)",
                    [(task_id, h, w) for h, w in members.items()],
                )
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise StoreError(f"writing to {self.path} failed: {exc}") from exc

    def _persist_hosts(self, seen: list[HostSeen]) -> None:
        try:
            self._db.executemany(
                "INSERT OR REPLACE INTO hosts (host, body) VALUES (?, ?)",
                [(s.host, json.dumps(s.to_json())) for s in seen],
            )
        except sqlite3.Error as exc:
            raise StoreError(f"writing to {self.path} failed: {exc}") from exc

    def _persist_bad(self, version: str, reason: str) -> None:
        try:
            self._db.execute(
                "INSERT OR REPLACE INTO bad_versions (version, reason) VALUES (?, ?)",
                (version, reason),
            )
        except sqlite3.Error as exc:
            raise StoreError(f"writing to {self.path} failed: {exc}") from exc

    def close(self) -> None:
        """Close the database and release the file."""
        with self._lock:
            self._db.close()
            self._flock.release()
