"""The event log: an append-only, offset-addressed stream of accepted events plus a dead-letter table.

Two roles, two protocols: the server appends (`EventLog`), the trainer reads (`EventSource`).
Positions are a dict {position key: next offset to read}, one key per partition ("sqlite" for the
embedded log, "kafka:<topic>:<partition>" for Kafka); a key that is absent means "from the start".
The trainer keeps these dicts in its checkpoint: they are the truth for resume.

`SqliteEventLog` is the embedded default (one file under the data directory, WAL mode so the
server appends while the trainer reads from another process). Offsets are SQLite rowids: dense,
increasing, starting at 1. Appends commit with synchronous=FULL, so an event the server reported
as accepted survives a crash of either process.

Retention (`SqliteEventLog.retain`, called by the trainer after it commits): events are deleted only
below every consumer's committed offset (`commit`, table `consumers`), and never the newest row: offsets
are rowids without AUTOINCREMENT, so an empty table would hand out offset 1 again and a consumer past it
would skip new events. Dead letters go by age and count. Kafka topics keep their own retention (the
broker's retention.ms); nothing here deletes records there.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
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
    impression_id: str = ""  # the Recommend response this event answers ("" = none); the SQLite log stores it,
                             # the Kafka and archive sources leave it empty (only the attribution joiner reads it)


class EventBatch(NamedTuple):
    events: list[StoredEvent]      # valid events, in offset order within each partition
    next_offsets: dict[str, int]   # the input positions advanced past everything read (dead letters too)
    dead_lettered: int = 0         # malformed records read, sent to the dead-letter topic/table, skipped


class EventLog(Protocol):
    """The server's side: append accepted events, dead-letter rejected ones."""
    def append(self, events: Sequence[pb.Event]) -> int: ...
    def append_new(self, events: Sequence[pb.Event]) -> list[bool]: ...
    def dead_letter_many(self, letters: Sequence[tuple[bytes, str]]) -> None: ...
    def close(self) -> None: ...


class EventSource(Protocol):
    """The trainer's side: read onwards from checkpointed positions."""
    def read_batch(self, offsets: Mapping[str, int], limit: int) -> EventBatch: ...
    def lag(self, offsets: Mapping[str, int]) -> dict[str, int]: ...       # unread events per position key
    def commit(self, offsets: Mapping[str, int]) -> None: ...              # after a checkpoint; retention keeps
                                                                           # what is not committed
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
  received_ms INTEGER NOT NULL,
  impression_id TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS dead_letters (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  received_ms INTEGER NOT NULL,
  reason TEXT NOT NULL,
  payload BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS consumers (
  name TEXT PRIMARY KEY,
  next_offset INTEGER NOT NULL,  -- everything below was consumed and checkpointed by this consumer
  updated_ms INTEGER NOT NULL
);
"""

_COLUMNS = "offset, event_id, user_id, item_id, action, weight, timestamp_ms, impression_id"  # StoredEvent's order


def _migrate(conn: sqlite3.Connection) -> None:
    """Bring a log written by an older version up to _SCHEMA in place (CREATE TABLE IF NOT EXISTS leaves an
    existing table as it was). ADD COLUMN with a constant default rewrites no rows: old events read as ''."""
    columns = {row[1] for row in conn.execute("PRAGMA table_info(events)")}
    if "impression_id" not in columns:
        try:
            conn.execute("ALTER TABLE events ADD COLUMN impression_id TEXT NOT NULL DEFAULT ''")
        except sqlite3.OperationalError as e:  # another process (server, trainer) migrated it first
            if "duplicate column" not in str(e):
                raise


@dataclass(kw_only=True, frozen=True, slots=True)
class RetentionConfig:
    """How long the embedded log keeps consumed events and dead letters (SqliteEventLog.retain)."""

    events_max_age_s: float = 7 * 86400.0  # consumed events received longer ago than this are deleted (0: no age limit)
    events_keep_newest: int = 1_000_000    # ...and consumed events beyond the newest this many (0: no count limit);
                                           # the newest event is always kept
    dead_letters_max_age_s: float = 7 * 86400.0  # dead letters older than this are deleted (0: no age limit)
    dead_letters_keep_newest: int = 100_000      # ...and those beyond the newest this many (0: no count limit)
    max_rows_per_pass: int = 100_000       # rows deleted per table per retain() call: bounds how long the server's
                                           # appends wait for the write lock; a backlog goes over later calls
    interval_s: float = 60.0               # the trainer runs retain() at most this often (after a round's commit)

    def __post_init__(self) -> None:
        for name in ("events_max_age_s", "dead_letters_max_age_s", "interval_s"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"RetentionConfig.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("events_keep_newest", "dead_letters_keep_newest"):
            if getattr(self, name) < 0:
                raise ValueError(f"RetentionConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.max_rows_per_pass < 1:
            raise ValueError(f"RetentionConfig.max_rows_per_pass must be >= 1, got {self.max_rows_per_pass}")


class Retained(NamedTuple):
    events_deleted: int
    dead_letters_deleted: int
    safe_offset: int   # events below this offset were consumed by every consumer (0: no consumer committed)


class SqliteEventLog:
    def __init__(self, path: Path, *, busy_timeout_ms: int = 10_000, consumer: str = "trainer") -> None:
        """consumer: the name `commit` records this reader's position under (retention keeps what any
        consumer has not committed)."""
        self.path = Path(path)
        self.consumer = consumer
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # One connection guarded by a lock: appends come from a worker thread of the server.
        self._conn = sqlite3.connect(self.path, timeout=busy_timeout_ms / 1000, check_same_thread=False,
                                     isolation_level=None)
        self._lock = threading.Lock()
        with self._lock:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.executescript(_SCHEMA)
            _migrate(self._conn)

    def append(self, events: Sequence[pb.Event]) -> int:
        """Append validated events in one transaction. A repeated event_id is ignored (idempotent
        retries). Returns how many rows were new."""
        return sum(self.append_new(events))

    def append_new(self, events: Sequence[pb.Event]) -> list[bool]:
        """Append validated events in one transaction; per event, whether it was new. An event_id already
        in the log (an earlier request's, or earlier in this one) is not stored again: False."""
        now = int(time.time() * 1000)
        sql = ("INSERT OR IGNORE INTO events (event_id, user_id, item_id, action, weight, timestamp_ms,"
               " received_ms, impression_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?)")
        with self._lock:
            cur = self._conn.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                new = []
                for e in events:
                    cur.execute(sql, (e.event_id, e.user_id, e.item_id, e.action, float(e.weight),
                                      int(e.timestamp_ms), now, e.impression_id))
                    new.append(cur.rowcount == 1)
                cur.execute("COMMIT")
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            return new

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
        self.dead_letter_many([(payload, reason)])

    def dead_letter_many(self, letters: Sequence[tuple[bytes, str]]) -> None:
        """Store (payload, reason) pairs in one transaction: one fsync however many."""
        if not letters:
            return
        now = int(time.time() * 1000)
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._conn.executemany("INSERT INTO dead_letters (received_ms, reason, payload) VALUES (?, ?, ?)",
                                       [(now, reason, payload) for payload, reason in letters])
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise

    def dead_letter_count(self) -> int:
        with self._lock:
            return self._conn.execute("SELECT COUNT(*) FROM dead_letters").fetchone()[0]

    def dead_letters(self, limit: int = 100) -> list[tuple[str, bytes]]:
        with self._lock:
            return self._conn.execute("SELECT reason, payload FROM dead_letters ORDER BY id DESC LIMIT ?",
                                      (limit,)).fetchall()

    def read(self, start_offset: int, limit: int) -> list[StoredEvent]:
        """Events with offset >= start_offset, oldest first, at most `limit`."""
        with self._lock:
            rows = self._conn.execute(
                f"SELECT {_COLUMNS} FROM events WHERE offset >= ? ORDER BY offset LIMIT ?",
                (start_offset, limit)).fetchall()
        return [StoredEvent(*r) for r in rows]

    def read_received(self, start_offset: int, limit: int) -> list[tuple[StoredEvent, int]]:
        """As `read`, with each event's received_ms (the server's clock when it was appended): the attribution
        joiner's grace for impressions not yet flushed is measured on it."""
        with self._lock:
            rows = self._conn.execute(
                f"SELECT {_COLUMNS}, received_ms FROM events WHERE offset >= ? ORDER BY offset LIMIT ?",
                (start_offset, limit)).fetchall()
        return [(StoredEvent(*r[:-1]), r[-1]) for r in rows]

    def read_batch(self, offsets: Mapping[str, int], limit: int) -> EventBatch:
        start = offsets.get(SOURCE_KEY, 1)
        events = self.read(start, limit)
        return EventBatch(events, {**offsets, SOURCE_KEY: events[-1].offset + 1 if events else start})

    def lag(self, offsets: Mapping[str, int]) -> dict[str, int]:
        return {SOURCE_KEY: max(0, self.end_offset() - offsets.get(SOURCE_KEY, 1))}

    def commit(self, offsets: Mapping[str, int]) -> None:
        """Record this consumer's position (after its checkpoint holds it). The checkpoint stays the truth
        for resume; this row only tells retention what every consumer is done with."""
        if SOURCE_KEY not in offsets:
            return
        with self._lock:
            self._conn.execute(
                "INSERT INTO consumers (name, next_offset, updated_ms) VALUES (?, ?, ?) ON CONFLICT(name) DO "
                "UPDATE SET next_offset = excluded.next_offset, updated_ms = excluded.updated_ms",
                (self.consumer, int(offsets[SOURCE_KEY]), int(time.time() * 1000)))

    def committed(self) -> dict[str, int]:
        """consumer -> its committed next offset."""
        with self._lock:
            return dict(self._conn.execute("SELECT name, next_offset FROM consumers").fetchall())

    def retain(self, cfg: RetentionConfig, *, now_ms: int | None = None) -> Retained:
        """Delete what retention allows (module docstring), at most cfg.max_rows_per_pass rows per table."""
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        with self._lock:
            (safe,) = self._conn.execute("SELECT COALESCE(MIN(next_offset), 0) FROM consumers").fetchone()
            (lo, hi) = self._conn.execute("SELECT MIN(offset), MAX(offset) FROM events").fetchone()
            limit = 0  # delete offsets < limit
            if safe and hi is not None:
                bound = min(safe, hi)  # never the newest row
                limits = []
                if cfg.events_keep_newest:
                    limits.append(hi - cfg.events_keep_newest + 1)
                if cfg.events_max_age_s:
                    limits.append(self._first_received_at(lo, hi, now_ms - int(cfg.events_max_age_s * 1000)))
                if limits:
                    limit = min(bound, max(limits), lo + cfg.max_rows_per_pass)
            events_deleted = dead_deleted = 0
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                if limit > lo:
                    events_deleted = self._conn.execute("DELETE FROM events WHERE offset < ?", (limit,)).rowcount
                conds = []
                if cfg.dead_letters_max_age_s:
                    conds.append(f"received_ms < {now_ms - int(cfg.dead_letters_max_age_s * 1000)}")
                if cfg.dead_letters_keep_newest:
                    (top,) = self._conn.execute("SELECT COALESCE(MAX(id), 0) FROM dead_letters").fetchone()
                    conds.append(f"id <= {top - cfg.dead_letters_keep_newest}")
                if conds:
                    dead_deleted = self._conn.execute(
                        f"DELETE FROM dead_letters WHERE id IN (SELECT id FROM dead_letters WHERE {' OR '.join(conds)}"
                        f" ORDER BY id LIMIT {cfg.max_rows_per_pass})").rowcount
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
        return Retained(events_deleted, dead_deleted, safe)

    def _first_received_at(self, lo: int, hi: int, cutoff_ms: int) -> int:
        """The first offset in [lo, hi] received at or after cutoff_ms (hi when none). A binary search on the
        rowid (received_ms grows with the offset, up to clock steps): a few lookups, not a table scan."""
        def received(offset: int) -> int:
            return self._conn.execute("SELECT received_ms FROM events WHERE offset >= ? ORDER BY offset LIMIT 1",
                                      (offset,)).fetchone()[0]

        a, b = lo, hi  # invariant: the answer is in [a, b]
        while a < b:
            mid = (a + b) // 2
            if received(mid) >= cutoff_ms:
                b = mid
            else:
                a = mid + 1
        return a

    def latest(self, limit: int) -> list[StoredEvent]:
        """The newest `limit` events, oldest first (to warm per-user histories at start-up)."""
        with self._lock:
            rows = self._conn.execute(
                f"SELECT {_COLUMNS} FROM events ORDER BY offset DESC LIMIT ?", (limit,)).fetchall()
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
