"""The embedded store: SQLite in one file, for one hbs process; survives restarts.

State is kept in memory (see :class:`~selfupgrade.server.memory.MemoryStore`) and every
change is written through to SQLite in the same locked step, in one transaction, before the
heartbeat is answered. At start the file is read back, so an hbs restarted mid-rollout carries
on with the same task, leases and counters. SQLite runs in WAL mode with ``synchronous=NORMAL``:
a crash of hbs loses nothing; a power loss may lose the last moments' heartbeats, never a
half-written row. A thread of the store checkpoints the log every second, on its own
connection, so that no heartbeat waits for a checkpoint.

One file serves one hbs process: a second process opening the same file is refused (several
hbs replicas share state through :class:`~selfupgrade.server.redis.RedisStore`).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path

import filelock

from .memory import MemoryStore, _TaskRecord
from .store import StoreError
from .tasks import HostProgress, HostSeen, Task, WaveCounters

__all__ = ["SqliteStore"]

log = logging.getLogger("selfupgrade.server")

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

_UPSERT_HOST = (
    "INSERT INTO hosts (host, body) VALUES (?, ?)"
    " ON CONFLICT(host) DO UPDATE SET body = excluded.body"
)
_HOSTS_CHUNK = 500
_MEMBERS_CHUNK = 10_000
_CHECKPOINT_S = 1.0


class SqliteStore(MemoryStore):
    """The embedded store. ``path`` is created if missing.

    Raises:
        StoreError: the file cannot be opened, or another process uses it.
    """

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        self._seq = 0
        self._db_lock = threading.Lock()
        self._written: dict[str, tuple[object, ...]] = {}
        self._bodies: dict[str, str] = {}
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
            # Checkpoints (copying the write-ahead log into the database) are left to a
            # thread of their own on a second connection: run by the writing connection, they
            # would stall the heartbeat that happened to cross the log's size limit.
            self._db.execute("PRAGMA wal_autocheckpoint=0")
            self._db.executescript(_SCHEMA)
            self._load()
        except sqlite3.Error as exc:
            self._flock.release()
            raise StoreError(f"cannot use {self.path}: {exc}") from exc
        self._closing = threading.Event()
        self._checkpointer = threading.Thread(
            target=self._checkpoint_loop, name="sqlite-checkpoint", daemon=True
        )
        self._checkpointer.start()

    def _load(self) -> None:
        # Members written for a rollout whose own row never was (hbs stopped in between).
        self._db.execute("DELETE FROM members WHERE task_id NOT IN (SELECT id FROM tasks)")
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
        row = (
            record.status,
            record.halt_reason,
            record.done,
            record.failed,
            record.failures,
            record.wave,
            record.wave_done_at,
            json.dumps([w.__dict__ for w in record.waves]),
            int(self._active == task_id),
        )
        # Admissions and lease renewals change only a host's row: the task's row is written
        # when its status or counters change (and its body, which never changes, once).
        write_task = self._written.get(task_id) != row
        body = self._bodies.get(task_id)
        if body is None:
            body = self._bodies[task_id] = json.dumps(record.task.to_json())
        progress = [(task_id, h, json.dumps(record.progress[h].to_json())) for h in hosts]
        with self._db_lock:
            try:
                self._db.execute("BEGIN")
                if write_task:
                    self._seq += 1
                    self._db.execute(_UPSERT_TASK, (task_id, body, *row, self._seq))
                if progress:
                    self._db.executemany(
                        "INSERT OR REPLACE INTO progress (task_id, host, body) VALUES (?, ?, ?)",
                        progress,
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
                self._written.pop(task_id, None)
                raise StoreError(f"writing to {self.path} failed: {exc}") from exc
        self._written[task_id] = row

    def _persist_members(self, task_id: str, members: Mapping[str, int]) -> None:
        # In transactions of _MEMBERS_CHUNK rows, the database lock released between them, so
        # that heartbeats' writes go on while a rollout of 600,000 hosts is stored. The task's
        # row comes after them: if hbs dies in between, _load removes the rows of no task.
        items = [(task_id, h, w) for h, w in members.items()]
        for start in range(0, len(items), _MEMBERS_CHUNK):
            with self._db_lock:
                try:
                    self._db.execute("BEGIN")
                    self._db.executemany(
                        "INSERT OR REPLACE INTO members (task_id, host, wave) VALUES (?, ?, ?)",
                        items[start : start + _MEMBERS_CHUNK],
                    )
                    self._db.execute("COMMIT")
                except sqlite3.Error as exc:
                    if self._db.in_transaction:
                        self._db.execute("ROLLBACK")
                    raise StoreError(f"writing to {self.path} failed: {exc}") from exc

    def _persist_hosts(self, seen: list[HostSeen]) -> None:
        # In transactions of _HOSTS_CHUNK rows: one commit per chunk instead of one per row,
        # and the database is free between chunks for the writes heartbeats wait on.
        for start in range(0, len(seen), _HOSTS_CHUNK):
            rows = [(s.host, json.dumps(s.to_json())) for s in seen[start : start + _HOSTS_CHUNK]]
            with self._db_lock:
                try:
                    self._db.execute("BEGIN")
                    self._db.executemany(_UPSERT_HOST, rows)
                    self._db.execute("COMMIT")
                except sqlite3.Error as exc:
                    if self._db.in_transaction:
                        self._db.execute("ROLLBACK")
                    raise StoreError(f"writing to {self.path} failed: {exc}") from exc

    def _persist_bad(self, version: str, reason: str) -> None:
        with self._db_lock:
            try:
                self._db.execute(
                    "INSERT OR REPLACE INTO bad_versions (version, reason) VALUES (?, ?)",
                    (version, reason),
                )
            except sqlite3.Error as exc:
                raise StoreError(f"writing to {self.path} failed: {exc}") from exc

    def _checkpoint_loop(self) -> None:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            while not self._closing.wait(_CHECKPOINT_S):
                try:
                    # PASSIVE: copies what it can without waiting for, or holding up, writers.
                    db.execute("PRAGMA wal_checkpoint(PASSIVE)")
                except sqlite3.Error as exc:
                    log.warning("checkpoint of %s failed (will retry): %s", self.path, exc)
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:
            log.warning("final checkpoint of %s failed: %s", self.path, exc)
        finally:
            db.close()

    def close(self) -> None:
        """Stop checkpointing, close the database and release the file."""
        self._closing.set()
        self._checkpointer.join(timeout=30)
        with self._lock, self._db_lock:
            self._db.close()
            self._flock.release()
