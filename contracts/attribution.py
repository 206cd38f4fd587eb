"""Attribution: Recommend responses (impressions) joined to what users then did, per arm and engine version.

Two writers, one file (`<data_dir>/attribution.sqlite`, WAL):
- the server records every Recommend response it answers as an impression (contracts/impressions.py: a
  bounded queue and its own thread, one transaction per flush of `insert_impressions`; the request never waits
  for the disk and never fails for it: on overflow the impression is dropped and counted), and counts it into
  `outcomes` in the same transaction, so an impression is counted exactly once (INSERT OR IGNORE: a replayed one adds nothing);
- the joiner (`Joiner`) reads the event stream (the SQLite event log, or the Kafka topic: attribution_sources.py)
  in offset order from its own positions and, for events that name an impression, adds joined / hit / late /
  mismatch counts to that impression's (arm, version).

Exactly once: a joiner batch's counter updates, its impressions' hit flags and its new positions commit in ONE
transaction, so a kill -9 at any point keeps or discards the whole batch, and a restart resumes from the
committed positions. An event whose impression is not in the store yet (the server flushes every ~100 ms) is
waited for until it was received `grace_ms` ago; its position key (the log, or its Kafka partition) stops there
for this batch, so each key's order is kept.

Join rules, for an event with impression_id set:
  unknown impression (after the grace) -> unknown_events (no arm: counted on the joiner's own row);
  other user than the impression's    -> user_mismatch_events;
  event time outside [served_ms, served_ms + window_ms] -> late_events (an event stamped before the response
                                         counts here too: it cannot have been caused by it);
  otherwise joined_events, and a hit (hit_events) when its item was one of the impression's items; the first
  hit of an impression also counts it in hit_impressions.
Read side: `read_outcomes(path)` -> {(arm, engine_version): Outcome}, one small table scan.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Sequence

from contracts.attribution_sources import JoinSource, LogJoinSource
from contracts.eventlog import SOURCE_KEY, SqliteEventLog

ATTRIBUTION_FILE = "attribution.sqlite"
JOINER = "joiner"  # the joiner's row in joiner_state (one joiner per data directory)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS impressions (
  seq INTEGER PRIMARY KEY,             -- rowid: insertion order
  impression_id TEXT NOT NULL UNIQUE,
  user_id TEXT NOT NULL,
  arm TEXT NOT NULL,                   -- "stable" | "canary" | an experiment arm's name
  engine_version INTEGER NOT NULL,
  item_ids TEXT NOT NULL,              -- JSON array, best first
  served_ms INTEGER NOT NULL,
  hit INTEGER NOT NULL DEFAULT 0       -- 1 once a joined event hit one of its items (set by the joiner)
);
CREATE INDEX IF NOT EXISTS impressions_by_time ON impressions (served_ms);  -- retention (prune_impressions)
CREATE TABLE IF NOT EXISTS outcomes (
  arm TEXT NOT NULL,
  engine_version INTEGER NOT NULL,
  impressions INTEGER NOT NULL DEFAULT 0,          -- recorded by the server
  hit_impressions INTEGER NOT NULL DEFAULT 0,      -- impressions with >= 1 hit
  hit_events INTEGER NOT NULL DEFAULT 0,           -- joined events whose item was shown
  joined_events INTEGER NOT NULL DEFAULT 0,        -- events joined within the window
  late_events INTEGER NOT NULL DEFAULT 0,          -- event time outside [served, served + window]
  user_mismatch_events INTEGER NOT NULL DEFAULT 0, -- another user's event named this impression
  PRIMARY KEY (arm, engine_version)
);
CREATE TABLE IF NOT EXISTS joiner_state (
  name TEXT PRIMARY KEY,
  next_offset INTEGER NOT NULL,        -- SQLite event log offset: everything below is counted
  positions TEXT NOT NULL DEFAULT '{}', -- other sources' positions (Kafka: one per partition), JSON
  unknown_events INTEGER NOT NULL,     -- events naming an impression the store never got (dropped, forged)
  updated_ms INTEGER NOT NULL
);
"""
_COUNTERS = ("impressions", "hit_impressions", "hit_events", "joined_events", "late_events", "user_mismatch_events")


class Impression(NamedTuple):
    impression_id: str
    user_id: str
    arm: str               # "stable" | "canary" | an experiment arm's name
    engine_version: int
    item_ids: Sequence[str]
    served_ms: int


class Outcome(NamedTuple):
    impressions: int
    hit_impressions: int
    hit_events: int
    joined_events: int
    late_events: int
    user_mismatch_events: int


def connect(path: Path, *, busy_timeout_ms: int = 10_000) -> sqlite3.Connection:
    """A connection to the attribution store (created with its schema when missing). Autocommit mode: every
    write below opens its own BEGIN IMMEDIATE ... COMMIT. synchronous=NORMAL in WAL: a committed transaction
    survives a kill -9 of the process; an OS crash may lose the last ones, but never half of one (counters and
    positions share the file, so they roll back together)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, timeout=busy_timeout_ms / 1000, check_same_thread=False, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.executescript(_SCHEMA)
    if "positions" not in {r[1] for r in conn.execute("PRAGMA table_info(joiner_state)")}:  # a store from before
        conn.execute("ALTER TABLE joiner_state ADD COLUMN positions TEXT NOT NULL DEFAULT '{}'")
    return conn


def _transaction(conn: sqlite3.Connection, body: Callable[[sqlite3.Cursor], object]) -> object:
    cur = conn.cursor()
    cur.execute("BEGIN IMMEDIATE")
    try:
        result = body(cur)
        cur.execute("COMMIT")
    except BaseException:
        cur.execute("ROLLBACK")
        raise
    return result


def _add_counts(cur: sqlite3.Cursor, deltas: dict[tuple[str, int], dict[str, int]]) -> None:
    for (arm, version), d in deltas.items():
        cols = [c for c in _COUNTERS if d.get(c)]
        if not cols:
            continue
        cur.execute(f"INSERT INTO outcomes (arm, engine_version, {', '.join(cols)}) VALUES (?, ?{', ?' * len(cols)})"
                    f" ON CONFLICT(arm, engine_version) DO UPDATE SET "
                    + ", ".join(f"{c} = {c} + excluded.{c}" for c in cols), (arm, version, *(d[c] for c in cols)))


def insert_impressions(conn: sqlite3.Connection, impressions: Sequence[Impression]) -> int:
    """Store impressions and count them into outcomes, in one transaction; returns how many were new (an id
    already stored is ignored and not counted again)."""
    def body(cur: sqlite3.Cursor) -> int:
        deltas: dict[tuple[str, int], dict[str, int]] = {}
        new = 0
        for imp in impressions:
            cur.execute("INSERT OR IGNORE INTO impressions (impression_id, user_id, arm, engine_version, item_ids,"
                        " served_ms) VALUES (?, ?, ?, ?, ?, ?)",
                        (imp.impression_id, imp.user_id, imp.arm, int(imp.engine_version),
                         json.dumps(list(imp.item_ids), separators=(",", ":")), int(imp.served_ms)))
            if cur.rowcount == 1:
                new += 1
                d = deltas.setdefault((imp.arm, int(imp.engine_version)), {})
                d["impressions"] = d.get("impressions", 0) + 1
        _add_counts(cur, deltas)
        return new

    return _transaction(conn, body) if impressions else 0


def prune_impressions(conn: sqlite3.Connection, served_before_ms: int) -> int:
    """Delete the impressions served before served_before_ms (their counts stay in outcomes); how many."""
    return _transaction(conn, lambda cur: cur.execute("DELETE FROM impressions WHERE served_ms < ?",
                                                      (served_before_ms,)).rowcount)


def read_outcomes(path_or_conn: Path | sqlite3.Connection) -> dict[tuple[str, int], Outcome]:
    """{(arm, engine_version): Outcome}: the whole outcomes table (one row per arm and version: cheap)."""
    conn = path_or_conn if isinstance(path_or_conn, sqlite3.Connection) else connect(path_or_conn)
    try:
        rows = conn.execute(f"SELECT arm, engine_version, {', '.join(_COUNTERS)} FROM outcomes"
                            " ORDER BY engine_version, arm").fetchall()
    finally:
        if conn is not path_or_conn:
            conn.close()
    return {(r[0], r[1]): Outcome(*r[2:]) for r in rows}


def window_counts(path: Path, served_from_ms: int, served_to_ms: int) -> dict[tuple[str, int], tuple[int, int]]:
    """{(arm, engine_version): (impressions, impressions with >= 1 hit)} over the impressions served in
    [served_from_ms, served_to_ms): what a canary or experiment is judged on (its own window, not the arm's
    lifetime). A range scan of the served_ms index; {} while the store does not exist yet."""
    if not path.exists():
        return {}
    conn = connect(path)
    try:
        rows = conn.execute("SELECT arm, engine_version, COUNT(*), SUM(hit) FROM impressions"
                            " WHERE served_ms >= ? AND served_ms < ? GROUP BY arm, engine_version",
                            (served_from_ms, served_to_ms)).fetchall()
    finally:
        conn.close()
    return {(r[0], r[1]): (r[2], r[3] or 0) for r in rows}


def read_joiner_state(path: Path) -> tuple[int, int]:
    """(the joiner's next event log offset, events it counted as naming an unknown impression); (1, 0) before it ran."""
    conn = connect(path)
    try:
        row = conn.execute("SELECT next_offset, unknown_events FROM joiner_state WHERE name = ?", (JOINER,)).fetchone()
    finally:
        conn.close()
    return (row[0], row[1]) if row else (1, 0)


@dataclass(kw_only=True, frozen=True, slots=True)
class JoinConfig:
    """How the joiner attributes events to impressions."""

    window_s: float = 1800.0    # an event counts for an impression when its time is within this after the response
    grace_s: float = 5.0        # an unknown impression id is waited for until its event was received this long ago
    batch_events: int = 5_000   # events read and committed per transaction at most
    poll_interval_s: float = 1.0  # the loop sleeps this long when it has caught up (or waits on an impression)

    def __post_init__(self) -> None:
        for name in ("window_s", "grace_s"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"JoinConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.batch_events < 1:
            raise ValueError(f"JoinConfig.batch_events must be >= 1, got {self.batch_events}")
        if not self.poll_interval_s > 0:
            raise ValueError(f"JoinConfig.poll_interval_s must be > 0, got {self.poll_interval_s}")


def _chunks(ids: list[str], size: int = 500) -> Iterator[list[str]]:
    """ids in slices of at most `size`: the bound parameters of one `IN (...)` (SQLite caps them)."""
    for i in range(0, len(ids), size):
        yield ids[i:i + size]


class JoinStep(NamedTuple):
    events: int                 # records consumed (committed) by this step
    next_offset: int            # the committed SQLite log position after it (1 with a Kafka source)
    waiting: bool               # stopped at an event whose impression is not stored yet (within the grace)
    positions: dict[str, int] = {}  # every committed position (one per Kafka partition)


class Joiner:
    """Joins an event source (the SQLite log by default; contracts/attribution_sources.py) to the impressions;
    one committed transaction per `step`."""

    def __init__(self, data_dir: Path, cfg: JoinConfig = JoinConfig(), *, event_log: SqliteEventLog | None = None,
                 source: JoinSource | None = None, owns_source: bool = False):
        """source: None reads the data dir's SQLite log (event_log, when given, is that log opened by the caller).
        owns_source: close() closes the source handed in too (one it made itself, it always closes)."""
        self.cfg = cfg
        self.conn = connect(Path(data_dir) / ATTRIBUTION_FILE)
        self.source = source or LogJoinSource(Path(data_dir), event_log)
        self._own_source = source is None or owns_source
        self.conn.execute("INSERT OR IGNORE INTO joiner_state (name, next_offset, unknown_events, updated_ms)"
                          " VALUES (?, 1, 0, ?)", (JOINER, int(time.time() * 1000)))

    def positions(self, cur: sqlite3.Cursor | sqlite3.Connection | None = None) -> dict[str, int]:
        """Everything below each position is counted. The SQLite log's lives in next_offset (as before there
        were other sources), the others in the positions JSON."""
        offset, other = (cur or self.conn).execute("SELECT next_offset, positions FROM joiner_state WHERE name = ?",
                                                   (JOINER,)).fetchone()
        return {**json.loads(other or "{}"), SOURCE_KEY: offset}

    def position(self) -> int:
        return self.positions()[SOURCE_KEY]

    def unknown_events(self) -> int:
        return self.conn.execute("SELECT unknown_events FROM joiner_state WHERE name = ?", (JOINER,)).fetchone()[0]

    def _impressions(self, ids: set[str]) -> dict[str, tuple[str, str, int, frozenset[str], int, int]]:
        """id -> (user_id, arm, engine_version, item set, served_ms, hit)."""
        out = {}
        for chunk in _chunks(sorted(ids)):
            for r in self.conn.execute(
                    "SELECT impression_id, user_id, arm, engine_version, item_ids, served_ms, hit FROM impressions"
                    f" WHERE impression_id IN ({','.join('?' * len(chunk))})", chunk):
                out[r[0]] = (r[1], r[2], r[3], frozenset(json.loads(r[4])), r[5], r[6])
        return out

    def step(self, now_ms: int | None = None) -> JoinStep:
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        start = self.positions()
        rows = self.source.read(start, self.cfg.batch_events)
        known = self._impressions({r.event.impression_id for r in rows if r.event and r.event.impression_id})
        window_ms, grace_ms = int(self.cfg.window_s * 1000), int(self.cfg.grace_s * 1000)
        deltas: dict[tuple[str, int], dict[str, int]] = {}
        newly_hit: set[str] = set()
        unknown, nxt, consumed = 0, dict(start), 0
        blocked: set[str] = set()  # keys stopped at an impression not flushed yet: their order is kept

        def add(key: tuple[str, int], counter: str) -> None:
            d = deltas.setdefault(key, {})
            d[counter] = d.get(counter, 0) + 1

        for r in rows:
            if r.key in blocked:
                continue
            ev = r.event
            if ev is not None and ev.impression_id:
                imp = known.get(ev.impression_id)
                if imp is None:
                    if now_ms - r.received_ms < grace_ms:
                        blocked.add(r.key)  # its impression may still be in the server's writer queue
                        continue
                    unknown += 1
                else:
                    user_id, arm, version, items, served_ms, hit = imp
                    key = (arm, version)
                    if ev.user_id != user_id:
                        add(key, "user_mismatch_events")
                    elif not 0 <= ev.timestamp_ms - served_ms <= window_ms:
                        add(key, "late_events")
                    else:
                        add(key, "joined_events")
                        if ev.item_id in items:
                            add(key, "hit_events")
                            if not hit and ev.impression_id not in newly_hit:
                                newly_hit.add(ev.impression_id)
                                add(key, "hit_impressions")
            nxt[r.key] = r.offset + 1
            consumed += 1
        if nxt == start:
            return JoinStep(0, start[SOURCE_KEY], bool(blocked), start)

        def body(cur: sqlite3.Cursor) -> None:
            # Guard against a second joiner on the same store: the positions must still be where this batch began.
            now = self.positions(cur)
            if now != start:
                raise RuntimeError(f"attribution positions moved from {start} to {now} under this joiner: "
                                   "is another joiner running on this data directory?")
            _add_counts(cur, deltas)
            for chunk in _chunks(sorted(newly_hit)):
                cur.execute(f"UPDATE impressions SET hit = 1 WHERE impression_id IN ({','.join('?' * len(chunk))})",
                            chunk)
            others = {k: v for k, v in nxt.items() if k != SOURCE_KEY}
            cur.execute("UPDATE joiner_state SET next_offset = ?, positions = ?, unknown_events = unknown_events + ?,"
                        " updated_ms = ? WHERE name = ?",
                        (nxt[SOURCE_KEY], json.dumps(others, sort_keys=True), unknown, now_ms, JOINER))

        _transaction(self.conn, body)
        self.source.commit(nxt)  # after the commit: the log's retention may now drop what was joined
        return JoinStep(consumed, nxt[SOURCE_KEY], bool(blocked), nxt)

    def run(self, stop: threading.Event, *, once: bool = False,
            progress: Callable[[JoinStep], None] | None = None) -> None:
        """Step until `stop` (or, with once, until caught up or waiting on an impression)."""
        while not stop.is_set():
            result = self.step()
            if progress is not None and result.events:
                progress(result)
            if result.events == self.cfg.batch_events:
                continue  # more to read at once
            if once:
                return
            stop.wait(self.cfg.poll_interval_s)

    def close(self) -> None:
        self.conn.close()
        if self._own_source:
            self.source.close()
