"""The event log: an append-only, offset-addressed stream of accepted events plus a dead-letter table.

`SqliteEventLog` is the embedded default (one file under the data directory, WAL mode so the
server appends while the trainer reads from another process). Offsets are SQLite rowids: dense,
increasing, starting at 1. Appends commit with synchronous=FULL, so an event the server reported
as accepted survives a crash of either process.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from typing import Callable, Iterable, NamedTuple, Protocol, Sequence

from proto import livetower_v1_pb2 as pb

SOURCE_KEY = "sqlite"  # key of this log's offset in checkpoints and manifests


class StoredEvent(NamedTuple):
    offset: int
    event_id: str
    user_id: str
    item_id: str
    action: str
    weight: float
    timestamp_ms: int


class EventLog(Protocol):
    def append(self, events: Sequence[pb.Event]) -> int: ...
    def dead_letter(self, payload: bytes, reason: str) -> None: ...
    def read(self, start_offset: int, limit: int) -> list[StoredEvent]: ...
    def end_offset(self) -> int: ...
    def close(self) -> None: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
  offset INTEGER PRIMARY KEY,  -- rowid; no AUTOINCREMENT, so an ignored duplicate burns no offset
  event_id TEXT NOT NULL UNIQUE,
  user_id TEXT NOT NULL,
  item_id TEXT NOT NULL,
  action TEXT NOT NULL,
  weight REAL NOT NULL,
  timestamp_ms INTEGER NOT NULL,
  received_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS dead_letters (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  received_ms INTEGER NOT NULL,
  reason TEXT NOT NULL,
  payload BLOB NOT NULL
);
"""


class SqliteEventLog:
    def __init__(self, path: Path, *, busy_timeout_ms: int = 10_000) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # One connection guarded by a lock: appends come from a worker thread of the server.
        self._conn = sqlite3.connect(self.path, timeout=busy_timeout_ms / 1000, check_same_thread=False,
                                     isolation_level=None)
        self._lock = threading.Lock()
        with self._lock:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.executescript(_SCHEMA)

    def append(self, events: Sequence[pb.Event]) -> int:
        """Append validated events in one transaction. A repeated event_id is ignored (idempotent
        retries). Returns how many rows were new."""
        now = int(time.time() * 1000)
        rows = [(e.event_id, e.user_id, e.item_id, e.action, float(e.weight), int(e.timestamp_ms), now)
                for e in events]
        with self._lock:
            before = self._conn.total_changes
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._conn.executemany(
                    "INSERT OR IGNORE INTO events (event_id, user_id, item_id, action, weight, timestamp_ms,"
                    " received_ms) VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            return self._conn.total_changes - before

    def append_all(self, events: Iterable[pb.Event], *, chunk: int = 10_000,
                   progress: Callable[[int], None] | None = None) -> int:
        """Append a (possibly huge) stream in transactions of `chunk`; progress(new rows so far) after each."""
        batch, added = [], 0
        for ev in events:
            batch.append(ev)
            if len(batch) == chunk:
                added += self.append(batch)
                batch.clear()
                if progress:
                    progress(added)
        if batch:
            added += self.append(batch)
        return added

    def dead_letter(self, payload: bytes, reason: str) -> None:
        with self._lock:
            self._conn.execute("INSERT INTO dead_letters (received_ms, reason, payload) VALUES (?, ?, ?)",
                               (int(time.time() * 1000), reason, payload))

    def dead_letters(self, limit: int = 100) -> list[tuple[str, bytes]]:
        with self._lock:
            return self._conn.execute("SELECT reason, payload FROM dead_letters ORDER BY id DESC LIMIT ?",
                                      (limit,)).fetchall()

    def read(self, start_offset: int, limit: int) -> list[StoredEvent]:
        """Events with offset >= start_offset, oldest first, at most `limit`."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT offset, event_id, user_id, item_id, action, weight, timestamp_ms FROM events"
                " WHERE offset >= ? ORDER BY offset LIMIT ?", (start_offset, limit)).fetchall()
        return [StoredEvent(*r) for r in rows]

    def latest(self, limit: int) -> list[StoredEvent]:
        """The newest `limit` events, oldest first (to warm per-user histories at start-up)."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT offset, event_id, user_id, item_id, action, weight, timestamp_ms FROM events"
                " ORDER BY offset DESC LIMIT ?", (limit,)).fetchall()
        return [StoredEvent(*r) for r in reversed(rows)]

    def end_offset(self) -> int:
        """The offset the next appended event will have at the earliest (max offset + 1)."""
        with self._lock:
            (top,) = self._conn.execute("SELECT COALESCE(MAX(offset), 0) FROM events").fetchone()
        return top + 1

    def count(self) -> int:
        with self._lock:
            return self._conn.execute("SELECT COUNT(*) FROM events").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._conn.close()
