"""The event log: an append-only, offset-addressed stream of accepted events plus a dead-letter table.

Two roles, two protocols: the server appends (`EventLog`), the trainer reads (`EventSource`).
Positions are a dict {position key: next offset to read}, one key per partition ("sqlite" for the
embedded log, "kafka:<topic>:<partition>" for Kafka); a key that is absent means "from the start".
The trainer keeps these dicts in its checkpoint: they are the truth for resume.

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
from typing import Callable, Iterable, Mapping, NamedTuple, Protocol, Sequence

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


class EventBatch(NamedTuple):
    events: list[StoredEvent]      # valid events, in offset order within each partition
    next_offsets: dict[str, int]   # the input positions advanced past everything read (dead letters too)
    dead_lettered: int = 0         # malformed records read, sent to the dead-letter topic/table, skipped


class EventLog(Protocol):
    """The server's side: append accepted events, dead-letter rejected ones."""
    def append(self, events: Sequence[pb.Event]) -> int: ...
    def dead_letter(self, payload: bytes, reason: str) -> None: ...
    def close(self) -> None: ...


class EventSource(Protocol):
    """The trainer's side: read onwards from checkpointed positions."""
    def read_batch(self, offsets: Mapping[str, int], limit: int) -> EventBatch: ...
    def lag(self, offsets: Mapping[str, int]) -> dict[str, int]: ...       # unread events per position key
    def commit(self, offsets: Mapping[str, int]) -> None: ...              # after a checkpoint; monitoring only
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

    def read_batch(self, offsets: Mapping[str, int], limit: int) -> EventBatch:
        start = offsets.get(SOURCE_KEY, 1)
        events = self.read(start, limit)
        return EventBatch(events, {**offsets, SOURCE_KEY: events[-1].offset + 1 if events else start})

    def lag(self, offsets: Mapping[str, int]) -> dict[str, int]:
        return {SOURCE_KEY: max(0, self.end_offset() - offsets.get(SOURCE_KEY, 1))}

    def commit(self, offsets: Mapping[str, int]) -> None:
        """Nothing to do: the checkpoint's positions are the only record of progress here."""

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
