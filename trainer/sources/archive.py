"""The event archive: accepted events copied into a Delta Lake table, and read back as an EventSource.

`DeltaArchiver` reads an `EventSource` (the embedded SqliteEventLog, Kafka, anything with the
protocol) onwards from where it last archived and appends each batch to the table as ONE Delta
commit. Exactly once: a batch's rows carry the source positions it archived through
(`source_positions`, JSON) and the commit carries a Delta application transaction
(`txn`: app id = `ArchiveConfig.app_id`, version = batch number), so the data and the resume point
are committed atomically. A restart reads the newest batch back and resumes after it; a crash
before the commit leaves no trace, so the batch is simply written again. Two archivers on one
table cannot both commit the same batch number: Delta refuses the second (concurrent transaction),
it reloads and goes on from the winner's positions. The positions are also written into the
commit's custom metadata (`livetower.archive.positions`, for `DeltaTable.history()` audits); the
rows are the truth because commit infos vanish when old log files are cleaned up.

`DeltaEventSource` reads the table back for `livetower train --backfill PATH`. Its position key is
"delta:<table id>" (the Delta table's metadata id: stable if the table is moved) and its offset is
the next `archive_seq` to read. `archive_seq` numbers rows 0, 1, 2, ... in archive (append) order,
so a table that grows between reads only grows at the end: no row ever changes its offset, and a
checkpointed position resumes correctly whatever was appended since (event time would not do:
late events would land before offsets already read). With `handoff`, each read also carries the
archived source's positions of the last batch it finished, so a trainer that backfilled from the
archive continues on the live log right after the archived events (positions only move forward).

Table columns: event_id, user_id, item_id, action (string), weight (double), timestamp_ms (long),
date (string, UTC day of timestamp_ms; the partition column unless partition_by_date=False),
archive_seq, archive_batch, source_offset (long), source_positions (string), batch_last (bool).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from contracts.eventlog import EventBatch, EventSource, StoredEvent

log = logging.getLogger("livetower.archive")

EVENT_COLUMNS = ("event_id", "user_id", "item_id", "action", "weight", "timestamp_ms")
ARCHIVE_COLUMNS = ("date", "archive_seq", "archive_batch", "source_offset", "source_positions", "batch_last")
METADATA_KEY = "livetower.archive.positions"


class ArchiveError(Exception):
    """The table cannot be archived to or read from (not a livetower archive, missing, wrong schema)."""


class ArchiveRace(RuntimeError):
    """Another archiver committed first; the state was reloaded from the table and the next pass goes on."""


@dataclass(kw_only=True, frozen=True, slots=True)
class ArchiveConfig:
    batch_events: int = 10_000        # events read from the source and written per Delta commit, at most
    max_batches_per_pass: int = 100   # archive_once() stops after this many commits (run() goes on next poll)
    poll_interval_s: float = 5.0      # run(): wait between passes once the source is drained
    partition_by_date: bool = True    # partition a NEW table by the events' UTC day (an existing table keeps its own)
    app_id: str = "livetower-archiver"  # Delta transaction id of this archiver; one per table
    retry_backoff_s: float = 5.0      # run(): wait after a failed pass (then the state is reloaded)

    def __post_init__(self) -> None:
        for name in ("batch_events", "max_batches_per_pass"):
            if getattr(self, name) < 1:
                raise ValueError(f"ArchiveConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("poll_interval_s", "retry_backoff_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ArchiveConfig.{name} must be > 0, got {getattr(self, name)}")
        if not self.app_id:
            raise ValueError("ArchiveConfig.app_id must be a non-empty string")


@dataclass(frozen=True, slots=True)
class ArchivePass:
    batches: int                 # Delta commits written by this pass
    events: int                  # rows appended
    positions: dict[str, int]    # source positions archived through (the resume point)
    table_version: int           # Delta table version after the pass (-1: no table yet)
    seconds: float


def _uri(table: str | Path) -> str:
    return str(table)


def _query(dt, sql: str):
    from deltalake import QueryBuilder

    return QueryBuilder().register("t", dt).execute(sql).read_all()


def _ints(tab, name: str) -> np.ndarray:
    col = tab.column(name)
    return np.asarray(col.combine_chunks()) if tab.num_rows else np.zeros(0, np.int64)


def _check_columns(dt, uri: str) -> None:
    names = {f.name for f in dt.schema().fields}
    missing = [c for c in (*EVENT_COLUMNS, *ARCHIVE_COLUMNS) if c not in names]
    if missing:
        raise ArchiveError(f"the Delta table at {uri} is not a livetower event archive (missing columns "
                           f"{', '.join(missing)}): point --table/--backfill at a table written by "
                           "`livetower archive`, or at a new path to create one")


def _open(uri: str):
    from deltalake import DeltaTable

    if not DeltaTable.is_deltatable(uri):
        return None
    dt = DeltaTable(uri)
    _check_columns(dt, uri)
    return dt


class DeltaArchiver:
    """Copies accepted events from `source` into the Delta table at `table`, exactly once."""

    def __init__(self, source: EventSource, table: str | Path, cfg: ArchiveConfig | None = None) -> None:
        self.source = source
        self.uri = _uri(table)
        self.cfg = cfg or ArchiveConfig()
        self._dt = None
        self.positions: dict[str, int] = {}
        self.next_seq = 0
        self.batch = 0  # the last committed batch number (0: none)
        self._load_state()

    def _load_state(self) -> None:
        """Resume point = the newest committed batch of this archiver (its rows' source_positions)."""
        self._dt = dt = _open(self.uri)
        self.positions, self.next_seq, self.batch = {}, 0, 0
        if dt is None:
            log.info("no Delta table at %s yet: it is created by the first batch", self.uri)
            return
        batch = dt.transaction_version(self.cfg.app_id)
        if batch is None:
            if dt.count() > 0:
                raise ArchiveError(f"the Delta table at {self.uri} has rows but no commit by archiver app id "
                                   f"{self.cfg.app_id!r}: use a new table path, or the app id that wrote it")
            return
        tab = _query(dt, f"SELECT archive_seq, source_positions FROM t WHERE archive_batch = {int(batch)} "
                         "ORDER BY archive_seq DESC LIMIT 1")
        if tab.num_rows == 0:
            raise ArchiveError(f"the Delta table at {self.uri} has no rows for its last archive batch {batch} "
                               "(rows were deleted?): archive into a new table path")
        self.batch, self.next_seq = int(batch), int(_ints(tab, "archive_seq")[0]) + 1
        self.positions = {k: int(v) for k, v in json.loads(tab.column("source_positions").to_pylist()[0]).items()}
        log.info("archive %s: resuming after batch %d (%d rows, table version %d), source positions %s",
                 self.uri, self.batch, self.next_seq, dt.version(), self.positions)

    def _rows(self, events: list[StoredEvent], positions: Mapping[str, int]):
        import arro3.core as ac

        n, string = len(events), ac.DataType.string()
        ts = np.fromiter((e.timestamp_ms for e in events), np.int64, n)
        day = ts.astype("datetime64[ms]").astype("datetime64[D]").astype(str).tolist()
        last = np.zeros(n, np.bool_)
        last[-1] = True
        pos = json.dumps(dict(sorted(positions.items())))
        return ac.Table.from_pydict({
            "event_id": ac.Array([e.event_id for e in events], string),
            "user_id": ac.Array([e.user_id for e in events], string),
            "item_id": ac.Array([e.item_id for e in events], string),
            "action": ac.Array([e.action for e in events], string),
            "weight": ac.Array(np.fromiter((e.weight for e in events), np.float64, n)),
            "timestamp_ms": ac.Array(ts),
            "date": ac.Array(day, string),
            "archive_seq": ac.Array(np.arange(self.next_seq, self.next_seq + n, dtype=np.int64)),
            "archive_batch": ac.Array(np.full(n, self.batch + 1, np.int64)),
            "source_offset": ac.Array(np.fromiter((e.offset for e in events), np.int64, n)),
            "source_positions": ac.Array([pos] * n, string),
            "batch_last": ac.Array(last.tolist(), ac.DataType.bool()),
        })

    def _commit(self, events: list[StoredEvent], positions: dict[str, int]) -> None:
        from deltalake import CommitProperties, DeltaTable, Transaction, write_deltalake

        batch = self.batch + 1
        meta = {METADATA_KEY: json.dumps(positions, sort_keys=True), "livetower.archive.batch": str(batch),
                "livetower.archive.seq": f"{self.next_seq}-{self.next_seq + len(events) - 1}"}
        props = CommitProperties(custom_metadata=meta,
                                 app_transactions=[Transaction(self.cfg.app_id, batch, int(time.time() * 1000))])
        rows = self._rows(events, positions)
        if self._dt is None:  # create the (empty) table first, so that every batch commits against a snapshot
            DeltaTable.create(self.uri, rows.schema, mode="ignore", name="livetower events",
                              partition_by=["date"] if self.cfg.partition_by_date else None)
            dt = _open(self.uri)
            if dt is None or dt.transaction_version(self.cfg.app_id) is not None:
                self._load_state()
                raise ArchiveRace(f"another archiver wrote to {self.uri} first; resuming from its positions")
            self._dt = dt
        # Written against the snapshot the state was read from: a concurrent commit of the same app id
        # makes Delta refuse this one (CommitFailedError: concurrent transaction); nothing is duplicated.
        write_deltalake(self._dt, rows, mode="append", commit_properties=props)
        self._dt.update_incremental()
        self.batch, self.next_seq, self.positions = batch, self.next_seq + len(events), positions

    def archive_once(self) -> ArchivePass:
        """Archive what the source has now, up to max_batches_per_pass commits. On any error the state is
        reloaded from the table before the exception propagates, so the next pass resumes correctly."""
        t0, batches, events_total = time.perf_counter(), 0, 0
        read_from = dict(self.positions)
        try:
            while batches < self.cfg.max_batches_per_pass:
                batch: EventBatch = self.source.read_batch(read_from, self.cfg.batch_events)
                if not batch.events:
                    if batch.next_offsets == read_from:
                        break
                    read_from = dict(batch.next_offsets)  # dead letters only: their positions ride the next batch
                    continue
                self._commit(batch.events, dict(batch.next_offsets))
                read_from = dict(self.positions)
                batches += 1
                events_total += len(batch.events)
                log.info("archived batch %d: %d events (archive rows %d), source positions %s",
                         self.batch, len(batch.events), self.next_seq, self.positions)
        except Exception:
            try:
                self._load_state()
            except Exception:  # noqa: BLE001 - the original error is the one to report
                log.exception("archive %s: reloading the state after a failed pass failed too", self.uri)
            raise
        return ArchivePass(batches, events_total, dict(self.positions),
                           self._dt.version() if self._dt is not None else -1, time.perf_counter() - t0)

    def lag(self) -> dict[str, int]:
        """Source events not archived yet, per position key."""
        return self.source.lag(self.positions)

    def run(self, stop: threading.Event) -> None:
        """Archive until `stop` is set: a pass, then a poll_interval_s wait when drained. A failed pass (a
        concurrent archiver won the commit, storage hiccup) is logged and retried after retry_backoff_s;
        an ArchiveError (wrong table) ends the loop."""
        while not stop.is_set():
            try:
                p = self.archive_once()
            except ArchiveError:
                raise
            except Exception:
                log.exception("archive pass failed; state reloaded from the table, retrying in %.1f s",
                              self.cfg.retry_backoff_s)
                stop.wait(self.cfg.retry_backoff_s)
                continue
            if p.batches:
                log.info("archive pass: %d events in %d batch(es), %.2f s, lag %s", p.events, p.batches,
                         p.seconds, self.lag())
            if p.batches < self.cfg.max_batches_per_pass:
                stop.wait(self.cfg.poll_interval_s)


class DeltaEventSource:
    """The EventSource protocol over a table written by DeltaArchiver (see the module docstring)."""

    def __init__(self, table: str | Path, *, handoff: bool = True) -> None:
        self.uri = _uri(table)
        dt = _open(self.uri)
        if dt is None:
            raise ArchiveError(f"no Delta table at {self.uri}: create it with `livetower archive --data-dir DIR "
                               f"--table {self.uri}` (or pass the path of an existing archive)")
        self._dt = dt
        self.handoff = handoff
        self.key = f"delta:{dt.metadata().id}"
        self._end: tuple[int, int] | None = None  # (table version, max archive_seq + 1)

    def _refresh(self) -> None:
        self._dt.update_incremental()

    def end_offset(self) -> int:
        """max archive_seq + 1 (0 for an empty table), cached per table version."""
        self._refresh()
        v = self._dt.version()
        if self._end is None or self._end[0] != v:
            tab = _query(self._dt, "SELECT MAX(archive_seq) AS m FROM t")
            top = tab.column("m").to_pylist()[0] if tab.num_rows else None
            self._end = (v, 0 if top is None else int(top) + 1)
        return self._end[1]

    def read_batch(self, offsets: Mapping[str, int], limit: int) -> EventBatch:
        self._refresh()
        start = int(offsets.get(self.key, 0))
        tab = _query(self._dt, f"SELECT {', '.join(EVENT_COLUMNS)}, archive_seq, source_positions, batch_last "
                               f"FROM t WHERE archive_seq >= {start} ORDER BY archive_seq LIMIT {int(limit)}")
        if tab.num_rows == 0:
            return EventBatch([], dict(offsets))
        seq = _ints(tab, "archive_seq")
        cols = {c: tab.column(c).to_pylist() for c in ("event_id", "user_id", "item_id", "action", "weight")}
        ts = _ints(tab, "timestamp_ms")
        events = [StoredEvent(int(seq[i]), cols["event_id"][i], cols["user_id"][i], cols["item_id"][i],
                              cols["action"][i], float(cols["weight"][i]), int(ts[i])) for i in range(len(seq))]
        if seq[0] != start or (len(seq) > 1 and np.any(np.diff(seq) != 1)):
            log.warning("archive %s: rows missing between archive_seq %d and %d (deleted from the table?)",
                        self.uri, start, int(seq[-1]))
        nxt = {**offsets, self.key: int(seq[-1]) + 1}
        if self.handoff:
            last = np.flatnonzero(np.asarray(tab.column("batch_last").to_pylist(), dtype=bool))
            if len(last):
                archived = json.loads(tab.column("source_positions").to_pylist()[int(last[-1])])
                for k, v in archived.items():
                    nxt[k] = max(int(nxt.get(k, v)), int(v))  # never moves a live position backwards
        return EventBatch(events, nxt)

    def lag(self, offsets: Mapping[str, int]) -> dict[str, int]:
        return {self.key: max(0, self.end_offset() - int(offsets.get(self.key, 0)))}

    def commit(self, offsets: Mapping[str, int]) -> None:
        """Nothing to do: the trainer's checkpoint holds the positions."""

    def close(self) -> None:
        """Nothing to release: reads open no long-lived handle."""
