"""The embedded store: SQLite in one file, for one hbs process; survives restarts.

Every commit is checked and written in SQL inside one ``BEGIN IMMEDIATE`` transaction per
call (the commits of a heartbeat batch share it), so what a heartbeat was answered is on disk
before the answer leaves. SQLite runs in WAL mode with ``synchronous=NORMAL``: a crash of hbs
loses nothing; a power loss may lose the last moments' commits, never a half-written one. A
thread of the store checkpoints the log every second on its own connection, so that no
heartbeat waits for a checkpoint.

One file serves one hbs process: a second process opening the same file is refused (several
hbs replicas share state through :class:`~selfupgrade.server.stores.redis.RedisStore`).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

from ..effects import Commit, Outcome
from ..tasks import (
    NO_ROLLOUT,
    ROLLOUT_FIELDS,
    HostProgress,
    HostRead,
    HostSeen,
    RolloutState,
    Status,
    Task,
)
from .base import StoreError

__all__ = ["SqliteStore"]

log = logging.getLogger("selfupgrade.server")

SCHEMA_VERSION = 2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS rollouts (
    id TEXT PRIMARY KEY,
    body TEXT NOT NULL,
    seq INTEGER NOT NULL,
    status TEXT NOT NULL,
    halt_reason TEXT NOT NULL DEFAULT '',
    wave INTEGER NOT NULL DEFAULT 0,
    wave_done_at REAL
);
CREATE TABLE IF NOT EXISTS active (one INTEGER PRIMARY KEY CHECK (one = 1), id TEXT);
CREATE TABLE IF NOT EXISTS counters (
    task_id TEXT NOT NULL, name TEXT NOT NULL, value INTEGER NOT NULL,
    PRIMARY KEY (task_id, name)
);
CREATE TABLE IF NOT EXISTS progress (
    task_id TEXT NOT NULL, host TEXT NOT NULL, rev INTEGER NOT NULL, body TEXT NOT NULL,
    PRIMARY KEY (task_id, host)
);
CREATE TABLE IF NOT EXISTS leases (
    task_id TEXT NOT NULL, host TEXT NOT NULL, until REAL NOT NULL,
    PRIMARY KEY (task_id, host)
);
CREATE INDEX IF NOT EXISTS leases_by_deadline ON leases (task_id, until);
CREATE TABLE IF NOT EXISTS members (
    task_id TEXT NOT NULL, host TEXT NOT NULL, wave INTEGER NOT NULL,
    PRIMARY KEY (task_id, host)
);
CREATE TABLE IF NOT EXISTS hosts (host TEXT PRIMARY KEY, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS bad_versions (version TEXT PRIMARY KEY, reason TEXT NOT NULL);
"""

_CHUNK = 500
_MEMBERS_CHUNK = 10_000
_CHECKPOINT_S = 1.0
_WAL_LIMIT_BYTES = 64 << 20


class _Stale(Exception):
    def __init__(self, outcome: Outcome) -> None:
        self.outcome = outcome


class _FileLock:
    """An exclusive ``flock`` on the database file itself: the same file reached through a
    symlink or a hard link is the same lock. An existing empty file is refused (it is not a
    store; SQLite would take it for a new one)."""

    def __init__(self, path: Path) -> None:
        try:
            if path.exists() and path.stat().st_size == 0:
                raise StoreError(
                    f"{path} is an empty file, not an hbs store; remove it to start a new store"
                )
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StoreError(f"cannot open {path}: {exc}") from exc
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._fd)
            raise StoreError(
                f"another hbs process uses {path} (perhaps through another name: a link); one "
                "embedded store serves one process (use the Redis store for several hbs "
                "replicas)"
            ) from None

    def release(self) -> None:
        """Let another process open the store."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class SqliteStore:
    """The embedded store. ``path`` is created if missing.

    Raises:
        StoreError: the file cannot be opened, is empty, was written by an older hbs, or
            another process uses it (under any of its names).
    """

    def __init__(self, path: str | Path, *, timeout_s: float = 5.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._flock = _FileLock(self.path)
        self._lock = threading.Lock()
        self._tasks: dict[str, Task] = {}
        try:
            self._db = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=timeout_s
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            # Checkpoints are left to a thread of their own on a second connection: run by
            # the writing connection, they would stall the commit that crossed the limit.
            self._db.execute("PRAGMA wal_autocheckpoint=0")
            # Once checkpointed, a WAL that grew past this is cut back to it when writing
            # starts over at its beginning: a burst (a publish to 600,000 hosts, a flood of
            # new names) does not leave a file of gigabytes for as long as hbs runs.
            self._db.execute(f"PRAGMA journal_size_limit={_WAL_LIMIT_BYTES}")
            self._check_schema()
            self._db.executescript(_SCHEMA)
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            # Members written for a rollout whose own row never was (hbs stopped between).
            self._db.execute("DELETE FROM members WHERE task_id NOT IN (SELECT id FROM rollouts)")
        except sqlite3.Error as exc:
            self._flock.release()
            raise StoreError(f"cannot use {self.path}: {exc}") from exc
        except StoreError:
            self._flock.release()
            raise
        self._closing = threading.Event()
        self._checkpointer = threading.Thread(
            target=self._checkpoint_loop, name="sqlite-checkpoint", daemon=True
        )
        self._checkpointer.start()

    def _check_schema(self) -> None:
        (version,) = self._db.execute("PRAGMA user_version").fetchone()
        tables = {r[0] for r in self._db.execute("SELECT name FROM sqlite_master")}
        if tables and version != SCHEMA_VERSION:
            raise StoreError(
                f"{self.path} was written by another version of hbs (schema {version}, this "
                f"one reads {SCHEMA_VERSION}); start hbs on a new file, or finish the rollout "
                "with the hbs that wrote it"
            )

    @contextmanager
    def _sql(self, *, write: bool = False) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                if write:
                    self._db.execute("BEGIN IMMEDIATE")
                yield self._db
                if write:
                    self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise StoreError(f"{self.path}: {exc}") from exc
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    # ---- rollouts ------------------------------------------------------------------------

    def publish(self, task: Task, members: Mapping[str, int], counters: Mapping[str, int]) -> None:
        """Store a new active rollout: members first, in chunks (heartbeats go on being
        committed between them), then the rollout's row and counters in one transaction."""
        items = [(task.id, h, w) for h, w in members.items()]
        for start in range(0, len(items), _MEMBERS_CHUNK):
            with self._sql(write=True) as db:
                db.executemany(
                    "INSERT OR REPLACE INTO members (task_id, host, wave) VALUES (?, ?, ?)",
                    items[start : start + _MEMBERS_CHUNK],
                )
        body = json.dumps(task.to_json())
        with self._sql(write=True) as db:
            (seq,) = db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM rollouts").fetchone()
            db.execute(
                "INSERT OR REPLACE INTO rollouts (id, body, seq, status) VALUES (?, ?, ?, ?)",
                (task.id, body, seq, Status.ACTIVE.value),
            )
            db.executemany(
                "INSERT OR REPLACE INTO counters (task_id, name, value) VALUES (?, ?, ?)",
                [(task.id, k, v) for k, v in counters.items()],
            )
            db.execute("INSERT OR REPLACE INTO active (one, id) VALUES (1, ?)", (task.id,))
        self._tasks[task.id] = task

    def active_id(self) -> str | None:
        """The active rollout's id."""
        with self._sql() as db:
            row = db.execute("SELECT id FROM active WHERE one = 1").fetchone()
        return row[0] if row is not None and row[0] else None

    def task(self, task_id: str) -> Task | None:
        """A stored task (cached: a task never changes once published)."""
        task = self._tasks.get(task_id)
        if task is not None:
            return task
        with self._sql() as db:
            row = db.execute("SELECT body FROM rollouts WHERE id = ?", (task_id,)).fetchone()
        if row is None:
            return None
        task = self._tasks[task_id] = Task.from_json(json.loads(row[0]))
        return task

    def tasks(self) -> list[Task]:
        """Every task, newest first."""
        with self._sql() as db:
            ids = [r[0] for r in db.execute("SELECT id FROM rollouts ORDER BY seq DESC LIMIT 200")]
        return [t for t in (self.task(i) for i in ids) if t is not None]

    def rollout(self, task_id: str, now: float) -> RolloutState:
        """The rollout's state."""
        with self._sql() as db:
            row = db.execute(
                "SELECT status, halt_reason, wave, wave_done_at FROM rollouts WHERE id = ?",
                (task_id,),
            ).fetchone()
            if row is None:
                return NO_ROLLOUT
            counters = dict(
                db.execute("SELECT name, value FROM counters WHERE task_id = ?", (task_id,))
            )
            (live,) = db.execute(
                "SELECT COUNT(*) FROM leases WHERE task_id = ? AND until > ?", (task_id, now)
            ).fetchone()
        return RolloutState(Status(row[0]), row[1], row[2], row[3], counters, live)

    def members(self, task_id: str) -> dict[str, int]:
        """Every member and its wave."""
        with self._sql() as db:
            return dict(db.execute("SELECT host, wave FROM members WHERE task_id = ?", (task_id,)))

    # ---- hosts in a rollout --------------------------------------------------------------

    def read(self, task_id: str, hosts: Sequence[str]) -> list[HostRead]:
        """Progress and wave of each host, in two queries per 500 hosts."""
        progress: dict[str, HostProgress] = {}
        waves: dict[str, int] = {}
        unique = list(dict.fromkeys(hosts))
        with self._sql() as db:
            for start in range(0, len(unique), _CHUNK):
                part = unique[start : start + _CHUNK]
                marks = ",".join("?" * len(part))
                for host, rev, body in db.execute(
                    f"SELECT host, rev, body FROM progress WHERE task_id = ? AND host IN ({marks})",  # noqa: S608 - placeholders only
                    (task_id, *part),
                ):
                    progress[host] = HostProgress.from_json(json.loads(body), rev)
                waves.update(
                    db.execute(
                        f"SELECT host, wave FROM members WHERE task_id = ? AND host IN ({marks})",  # noqa: S608 - placeholders only
                        (task_id, *part),
                    )
                )
        return [HostRead(h, progress.get(h), waves.get(h)) for h in hosts]

    def all_progress(self, task_id: str) -> list[HostProgress]:
        """Every progress record."""
        with self._sql() as db:
            rows = db.execute(
                "SELECT rev, body FROM progress WHERE task_id = ?", (task_id,)
            ).fetchall()
        return [HostProgress.from_json(json.loads(body), rev) for rev, body in rows]

    def due(self, task_id: str, now: float, limit: int = 1000) -> list[str]:
        """Hosts whose lease ran out."""
        with self._sql() as db:
            return [
                r[0]
                for r in db.execute(
                    "SELECT host FROM leases WHERE task_id = ? AND until <= ? ORDER BY until"
                    " LIMIT ?",
                    (task_id, now, limit),
                )
            ]

    def commit(self, commits: Sequence[Commit]) -> list[Outcome]:
        """Check and apply each commit, all in one transaction (a commit that releases other
        rollouts' leases in a savepoint of its own)."""
        if not commits:
            return []
        outcomes = []
        with self._sql(write=True) as db:
            for c in commits:
                saved = bool(c.others)
                if saved:
                    db.execute("SAVEPOINT c")
                try:
                    self._release(db, c)
                    self._check(db, c)
                except _Stale as stale:
                    if saved:
                        db.execute("ROLLBACK TO c")
                        db.execute("RELEASE c")
                    outcomes.append(stale.outcome)
                    continue
                self._apply(db, c)
                if saved:
                    db.execute("RELEASE c")
                outcomes.append(Outcome.OK)
        return outcomes

    @staticmethod
    def _release(db: sqlite3.Connection, c: Commit) -> None:
        """Drop the written hosts' leases in :attr:`Commit.others` (undone with a stale
        commit's savepoint)."""
        others = c.others
        if not others:
            return
        marks = ",".join("?" * len(others))
        for w in c.writes:
            db.execute(
                f"DELETE FROM leases WHERE task_id IN ({marks}) AND host = ?",  # noqa: S608 - placeholders
                (*others, w.host),
            )

    def _check(self, db: sqlite3.Connection, c: Commit) -> None:
        row = db.execute(
            "SELECT status, halt_reason, wave, wave_done_at FROM rollouts WHERE id = ?",
            (c.task_id,),
        ).fetchone()
        if row is None:
            raise _Stale(Outcome.STALE)
        fields = dict(zip(ROLLOUT_FIELDS, row, strict=True))
        g = c.guard
        if g.statuses is not None and fields["status"] not in {s.value for s in g.statuses}:
            raise _Stale(Outcome.STALE)
        for k, v in g.fields.items():
            if fields[k] != (v.value if isinstance(v, Status) else v):
                raise _Stale(Outcome.STALE)
        for k, v in g.counters.items():
            got = db.execute(
                "SELECT value FROM counters WHERE task_id = ? AND name = ?", (c.task_id, k)
            ).fetchone()
            if (got[0] if got else 0) != v:
                raise _Stale(Outcome.STALE)
        for host in c.join:
            if db.execute(
                "SELECT 1 FROM members WHERE task_id = ? AND host = ?", (c.task_id, host)
            ).fetchone():
                raise _Stale(Outcome.STALE)
        for w in c.writes:
            got = db.execute(
                "SELECT rev FROM progress WHERE task_id = ? AND host = ?", (c.task_id, w.host)
            ).fetchone()
            if (got[0] if got else 0) != w.expect_rev:
                raise _Stale(Outcome.STALE)
        takes = c.takes
        if takes:
            pools = c.pools
            marks = ",".join("?" * len(pools))
            # this rollout's leases until released (even run out); the others' while live
            (live,) = db.execute(
                f"SELECT COUNT(*) FROM leases WHERE task_id IN ({marks})"  # noqa: S608 - placeholders only
                " AND (task_id = ? OR until > ?)",
                (*pools, c.task_id, c.now),
            ).fetchone()
            if live + takes > c.slot_limit:
                raise _Stale(Outcome.FULL)
            for w in c.writes:
                if (
                    w.takes_slot
                    and db.execute(
                        f"SELECT 1 FROM leases WHERE task_id IN ({marks})"  # noqa: S608 - placeholders
                        " AND host = ? AND until > ?",
                        (*pools, w.host, c.now),
                    ).fetchone()
                ):
                    raise _Stale(Outcome.FULL)

    @staticmethod
    def _apply(db: sqlite3.Connection, c: Commit) -> None:
        for w in c.writes:
            db.execute(
                "INSERT OR REPLACE INTO progress (task_id, host, rev, body) VALUES (?, ?, ?, ?)",
                (c.task_id, w.host, w.expect_rev + 1, json.dumps(w.progress.to_json())),
            )
            if w.lease_until is not None:
                db.execute(
                    "INSERT OR REPLACE INTO leases (task_id, host, until) VALUES (?, ?, ?)",
                    (c.task_id, w.host, w.lease_until),
                )
            else:
                db.execute("DELETE FROM leases WHERE task_id = ? AND host = ?", (c.task_id, w.host))
        for k, delta in c.add.items():
            db.execute(
                "INSERT INTO counters (task_id, name, value) VALUES (?, ?, ?)"
                " ON CONFLICT(task_id, name) DO UPDATE SET value = value + excluded.value",
                (c.task_id, k, delta),
            )
        for k, v in c.set.items():
            if k not in ROLLOUT_FIELDS:
                raise ValueError(f"a commit may set {ROLLOUT_FIELDS}, not {k!r}")
            db.execute(
                f"UPDATE rollouts SET {k} = ? WHERE id = ?",  # noqa: S608 - k is one of _FIELDS
                (v.value if isinstance(v, Status) else v, c.task_id),
            )
        if c.join:
            db.executemany(
                "INSERT INTO members (task_id, host, wave) VALUES (?, ?, ?)",
                [(c.task_id, h, w) for h, w in c.join.items()],
            )
        if c.deactivate:
            db.execute("UPDATE active SET id = NULL WHERE one = 1 AND id = ?", (c.task_id,))

    # ---- the fleet view and bad versions -------------------------------------------------

    def save_hosts(self, seen: Iterable[HostSeen]) -> None:
        """Record the latest heartbeats, in transactions of 500 rows (the database is free
        between them for the commits heartbeats wait on)."""
        batch = list(seen)
        for start in range(0, len(batch), _CHUNK):
            rows = [(s.host, json.dumps(s.to_json())) for s in batch[start : start + _CHUNK]]
            with self._sql(write=True) as db:
                db.executemany(
                    "INSERT INTO hosts (host, body) VALUES (?, ?)"
                    " ON CONFLICT(host) DO UPDATE SET body = excluded.body",
                    rows,
                )

    def hosts(self) -> dict[str, HostSeen]:
        """The latest heartbeat of every host."""
        with self._sql() as db:
            rows = db.execute("SELECT body FROM hosts").fetchall()
        out = {}
        for (body,) in rows:
            s = HostSeen.from_json(json.loads(body))
            out[s.host] = s
        return out

    def forget_hosts(self, hosts: Iterable[str]) -> None:
        """Drop these hosts' records, 500 to a transaction."""
        names = list(hosts)
        for start in range(0, len(names), _CHUNK):
            with self._sql(write=True) as db:
                db.executemany(
                    "DELETE FROM hosts WHERE host = ?",
                    [(h,) for h in names[start : start + _CHUNK]],
                )

    def mark_bad(self, version: str, reason: str) -> None:
        """Record a bad version."""
        with self._sql(write=True) as db:
            db.execute(
                "INSERT OR REPLACE INTO bad_versions (version, reason) VALUES (?, ?)",
                (version, reason),
            )

    def bad_versions(self) -> dict[str, str]:
        """Versions marked bad."""
        with self._sql() as db:
            return dict(db.execute("SELECT version, reason FROM bad_versions"))

    # ---- lifecycle -----------------------------------------------------------------------

    def ping(self) -> None:
        """Check that the file answers."""
        with self._sql() as db:
            db.execute("SELECT 1").fetchone()

    def stats(self) -> dict[str, float]:
        """Nothing to report."""
        return {}

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
        with self._lock:
            self._db.close()
            self._flock.release()
