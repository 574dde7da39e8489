"""The embedded history store: one SQLite file in WAL mode (stdlib sqlite3), no server to run.

Reads run inline on the server's event loop: in WAL mode a reader never waits for a writer, and a
primary-key lookup of one row costs a few microseconds, less than a hand-off to a thread would.
Writes run on one thread of their own with their own connection, since a write may wait for the
file lock (another process on the same file) or for the disk. synchronous=NORMAL: a commit is
durable once the WAL is checkpointed; a power cut may lose the last commits, never corrupt the file.
Several processes on one host may share the file; across hosts use Redis (WAL needs shared memory,
which network file systems do not give).

Each user is one row: the item ids and timestamps as JSON lists, oldest first, and when the user
was last written (for the TTL: an expired row reads as empty, and rows expired for a while are
deleted by the writer, at most once a minute).
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

from .history_store import HistoryStore, Read

SCHEMA_VERSION = 1
PURGE_EVERY_S = 60.0
_SCHEMA = """
CREATE TABLE IF NOT EXISTS histories (
    namespace TEXT NOT NULL,
    user_id TEXT NOT NULL,
    items TEXT NOT NULL,
    timestamps TEXT NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (namespace, user_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS histories_by_age ON histories (namespace, updated_at);
CREATE TABLE IF NOT EXISTS unavailable (
    namespace TEXT NOT NULL,
    item TEXT NOT NULL,
    PRIMARY KEY (namespace, item)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS generations (
    namespace TEXT PRIMARY KEY,
    generation INTEGER NOT NULL
) WITHOUT ROWID;
"""


def _connect(path: str) -> sqlite3.Connection:
    # isolation_level=None: autocommit, every SELECT its own read transaction; writes BEGIN explicitly.
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=5.0)
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


class SqliteHistoryStore(HistoryStore):
    errors = (sqlite3.Error, OSError)

    def __init__(self, path: str | Path, *, namespace: str, ttl_s: int) -> None:
        self.path, self.namespace, self.ttl_s = Path(path), namespace, ttl_s
        self.name = f"file://{self.path}"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = _connect(str(self.path))
            conn.execute("PRAGMA journal_mode=WAL")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise ValueError(f"schema version {version}: written by a newer attnrec (this one reads 1)")
            conn.executescript(_SCHEMA)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except (sqlite3.Error, OSError, ValueError) as exc:
            raise ValueError(f"--history-store {self.name}: cannot use {self.path}: {exc}") from None
        self._reader = conn
        self._writer_conn: sqlite3.Connection | None = None
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="attnrec-history")
        self._last_purge = 0.0

    def _live_since(self) -> float:
        """Rows written before this are expired (-inf: no TTL)."""
        return time.time() - self.ttl_s if self.ttl_s > 0 else float("-inf")

    # ── reads: inline ─────────────────────────────────────────────────────────────────────────
    async def read(self, user_id: str | None) -> Read:
        cur = self._reader.cursor()
        items: list[str] = []
        stamps: list[int] = []
        if user_id is not None:
            row = cur.execute(
                "SELECT items, timestamps, updated_at FROM histories WHERE namespace = ? AND user_id = ?",
                (self.namespace, user_id),
            ).fetchone()
            if row is not None and row[2] >= self._live_since():
                items, stamps = json.loads(row[0]), json.loads(row[1])
        gen = cur.execute("SELECT generation FROM generations WHERE namespace = ?", (self.namespace,)).fetchone()
        return Read(items, gen[0] if gen else 0, stamps)

    async def unavailable(self) -> tuple[int, frozenset[str]]:
        cur = self._reader.cursor()
        cur.execute("BEGIN")  # one snapshot for both
        try:
            gen = cur.execute("SELECT generation FROM generations WHERE namespace = ?", (self.namespace,)).fetchone()
            items = cur.execute("SELECT item FROM unavailable WHERE namespace = ?", (self.namespace,)).fetchall()
        finally:
            cur.execute("COMMIT")
        return (gen[0] if gen else 0), frozenset(r[0] for r in items)

    # ── writes: on the writer thread ──────────────────────────────────────────────────────────
    async def _write(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._writer, fn, *args)

    def _conn(self) -> sqlite3.Connection:
        if self._writer_conn is None:
            self._writer_conn = _connect(str(self.path))
        return self._writer_conn

    async def append(self, user_id: str, items: Sequence[str], timestamps: Sequence[int], limit: int) -> int:
        return await self._write(self._append, user_id, list(items), [int(t) for t in timestamps], limit)

    def _append(self, user_id: str, items: list[str], timestamps: list[int], limit: int) -> int:
        conn, now = self._conn(), time.time()
        conn.execute("BEGIN IMMEDIATE")
        try:
            row = conn.execute(
                "SELECT items, timestamps, updated_at FROM histories WHERE namespace = ? AND user_id = ?",
                (self.namespace, user_id),
            ).fetchone()
            if row is not None and row[2] >= self._live_since():
                items, timestamps = json.loads(row[0]) + items, json.loads(row[1]) + timestamps
            items, timestamps = items[-limit:], timestamps[-limit:]
            conn.execute(
                "INSERT OR REPLACE INTO histories VALUES (?, ?, ?, ?, ?)",
                (self.namespace, user_id, json.dumps(items), json.dumps(timestamps), now),
            )
            if self.ttl_s > 0 and now - self._last_purge > PURGE_EVERY_S:
                conn.execute(
                    "DELETE FROM histories WHERE namespace = ? AND updated_at < ?", (self.namespace, now - self.ttl_s)
                )
                self._last_purge = now
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return len(items)

    async def set_available(self, items: Sequence[str], available: bool) -> int:
        return await self._write(self._set_available, list(items), available)

    def _set_available(self, items: list[str], available: bool) -> int:
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            before = conn.total_changes
            rows = [(self.namespace, item) for item in items]
            if available:
                conn.executemany("DELETE FROM unavailable WHERE namespace = ? AND item = ?", rows)
            else:
                conn.executemany("INSERT OR IGNORE INTO unavailable VALUES (?, ?)", rows)
            changed = conn.total_changes - before
            conn.execute(
                "INSERT INTO generations VALUES (?, 1) "
                "ON CONFLICT (namespace) DO UPDATE SET generation = generation + 1",
                (self.namespace,),
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return changed

    async def close(self) -> None:
        def close_writer() -> None:
            if self._writer_conn is not None:
                self._writer_conn.close()

        await self._write(close_writer)
        self._writer.shutdown(wait=True)
        self._reader.close()
