"""The catalogue: items (and users) with side features, stored durably beside the event log.

A `CatalogRecord` is one entity (kind "item" or "user") with three kinds of side feature: categorical (one or
many string values: genres, occupation), numeric (finite floats: release year, age) and text (free text: a
title). Records are validated on construction against `CatalogLimits`; bad input raises ValueError naming the
field and the limit.

`CatalogStore` keeps them in `<data_dir>/catalog.sqlite` (WAL, synchronous=FULL). Every call is one
transaction, so a crash (even kill -9 mid-call) leaves the store as it was before the call or after it. A
store-wide version counter is bumped once per changed record (an upsert that changes nothing bumps nothing; a
delete leaves a tombstone), so a reader that has applied everything up to version N asks `changes_since(N)`
for the latest state of every record changed after N.

Files of records are read by contracts/catalog_files.py.
"""

from __future__ import annotations

import json
import math
import re
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Mapping, NamedTuple, Sequence

KINDS = ("item", "user")
CATALOG_FILE = "catalog.sqlite"
_NAME_RE = re.compile(r"[A-Za-z0-9_.\-]+")


@dataclass(kw_only=True, frozen=True, slots=True)
class CatalogLimits:
    """What one record may hold. Every record is checked against LIMITS (the defaults) when constructed."""

    max_id_chars: int = 256         # a record id: 1..this many characters, no control characters
    max_features: int = 64          # features per record, the three kinds together
    max_name_chars: int = 64        # a feature name: 1..this many characters of [A-Za-z0-9_.-]
    max_values: int = 64            # values of one categorical feature
    max_value_chars: int = 256      # characters of one categorical value (non-empty, no control characters)
    max_text_chars: int = 8192      # characters of one text feature
    max_abs_numeric: float = 1e15   # a numeric feature is finite and at most this in absolute value


LIMITS = CatalogLimits()


def _bad(field_name: str, why: str) -> ValueError:
    return ValueError(f"CatalogRecord.{field_name}: {why}")


def _check_chars(field_name: str, s: object, limit: int, what: str) -> str:
    if not isinstance(s, str):
        raise _bad(field_name, f"must be a string, got {type(s).__name__}")
    if not 1 <= len(s) <= limit:
        raise _bad(field_name, f"{what} of {len(s)} characters: the limit is 1..{limit}")
    if any(ord(c) < 32 or ord(c) == 127 for c in s):
        raise _bad(field_name, f"{what} {s[:40]!r} holds a control character")
    return s


@dataclass(kw_only=True, frozen=True, slots=True)
class CatalogRecord:
    """One item (or user) and its side features. The mappings are copied and normalised on construction
    (categorical values become tuples, duplicates dropped in first-seen order; numerics become floats)."""

    id: str                                      # the id events use ("m1", "item-42"); 1..max_id_chars
    kind: str = "item"                           # one of KINDS
    categorical: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # name -> one or more values
    numeric: Mapping[str, float] = field(default_factory=dict)               # name -> finite float
    text: Mapping[str, str] = field(default_factory=dict)                    # name -> free text

    def __post_init__(self) -> None:
        lim = LIMITS
        _check_chars("id", self.id, lim.max_id_chars, "id")
        if self.kind not in KINDS:
            raise _bad("kind", f"must be one of {KINDS}, got {self.kind!r}")
        for name, m in (("categorical", self.categorical), ("numeric", self.numeric), ("text", self.text)):
            if not isinstance(m, Mapping):
                raise _bad(name, f"must be a mapping of feature name -> value, got {type(m).__name__}")
        names = [*self.categorical, *self.numeric, *self.text]
        if len(names) > lim.max_features:
            raise _bad("categorical/numeric/text", f"{len(names)} features: the limit is {lim.max_features}")
        for n in names:
            if not isinstance(n, str) or not 1 <= len(n) <= lim.max_name_chars or not _NAME_RE.fullmatch(n):
                raise _bad("categorical/numeric/text", f"feature name {n!r}: 1..{lim.max_name_chars} characters "
                                                       "of [A-Za-z0-9_.-]")
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise _bad("categorical/numeric/text", f"feature name(s) {dup} used by more than one feature kind")
        cat = {}
        for n, vals in self.categorical.items():
            vals = (vals,) if isinstance(vals, str) else vals
            if not isinstance(vals, (list, tuple)):
                raise _bad(f"categorical[{n!r}]", f"must be a string or a list of strings, got {type(vals).__name__}")
            vals = tuple(dict.fromkeys(_check_chars(f"categorical[{n!r}]", v, lim.max_value_chars, "value")
                                       for v in vals))
            if not 1 <= len(vals) <= lim.max_values:
                raise _bad(f"categorical[{n!r}]", f"{len(vals)} values: the limit is 1..{lim.max_values}")
            cat[n] = vals
        num = {}
        for n, v in self.numeric.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise _bad(f"numeric[{n!r}]", f"must be a number, got {type(v).__name__}")
            if not math.isfinite(v) or abs(v) > lim.max_abs_numeric:
                raise _bad(f"numeric[{n!r}]", f"{v!r}: must be finite with |value| <= {lim.max_abs_numeric:g}")
            num[n] = float(v)
        txt = {}
        for n, v in self.text.items():
            if not isinstance(v, str):
                raise _bad(f"text[{n!r}]", f"must be a string, got {type(v).__name__}")
            if len(v) > lim.max_text_chars:
                raise _bad(f"text[{n!r}]", f"{len(v)} characters: the limit is {lim.max_text_chars}")
            txt[n] = v
        object.__setattr__(self, "categorical", cat)
        object.__setattr__(self, "numeric", num)
        object.__setattr__(self, "text", txt)

    def to_dict(self) -> dict:
        return {"id": self.id, "kind": self.kind, "categorical": {n: list(v) for n, v in self.categorical.items()},
                "numeric": dict(self.numeric), "text": dict(self.text)}

    @classmethod
    def from_dict(cls, d: Mapping) -> CatalogRecord:
        if not isinstance(d, Mapping):
            raise ValueError(f"CatalogRecord: expected an object, got {type(d).__name__}")
        unknown = set(d) - {"id", "kind", "categorical", "numeric", "text"}
        if unknown:
            raise ValueError(f"CatalogRecord: unknown field(s) {sorted(unknown)}")
        if "id" not in d:
            raise _bad("id", "missing")
        return cls(**d)

    def body(self) -> str:
        """Canonical JSON of the features (what the store keeps and compares)."""
        return json.dumps({"categorical": self.categorical, "numeric": self.numeric, "text": self.text},
                          sort_keys=True, separators=(",", ":"), ensure_ascii=False)


class UpsertResult(NamedTuple):
    inserted: int   # records that were absent (or deleted) before
    updated: int    # records whose features changed
    unchanged: int  # records stored with exactly these features already (no version bump)
    version: int    # the store's version after the call


class Change(NamedTuple):
    version: int                   # the version this change got
    kind: str
    id: str
    record: CatalogRecord | None   # the record's state now; None: deleted


_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (kind TEXT NOT NULL, id TEXT NOT NULL, body TEXT, version INTEGER NOT NULL,
                                    PRIMARY KEY (kind, id)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS records_version ON records (version);
CREATE INDEX IF NOT EXISTS records_kind_version ON records (kind, version);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta VALUES ('version', 0);
"""


def record_from_body(kind: str, rid: str, body: str) -> CatalogRecord:
    """A record read back from the store: its body is the canonical JSON of a record validated when it was written,
    so it is rebuilt without validating again (that was ~3/4 of an engine's catalogue replay: 100k records 2.3 s)."""
    d = json.loads(body)
    r = object.__new__(CatalogRecord)
    for name, value in (("id", rid), ("kind", kind), ("categorical", {n: tuple(v) for n, v in d["categorical"].items()}),
                        ("numeric", d["numeric"]), ("text", d["text"])):
        object.__setattr__(r, name, value)
    return r


class CatalogOp(NamedTuple):
    """One change of the catalogue stream: a record's new state, or (record None) the deletion of kind/id."""
    kind: str
    id: str
    record: CatalogRecord | None


def _upsert_one(cur: sqlite3.Cursor, r: CatalogRecord, version: int) -> tuple[str, int]:
    new = r.body()
    row = cur.execute("SELECT body FROM records WHERE kind = ? AND id = ?", (r.kind, r.id)).fetchone()
    if row is not None and row[0] == new:
        return "unchanged", version
    cur.execute("INSERT OR REPLACE INTO records VALUES (?, ?, ?, ?)", (r.kind, r.id, new, version + 1))
    return ("inserted" if row is None or row[0] is None else "updated"), version + 1


def _delete_one(cur: sqlite3.Cursor, kind: str, rid: str, version: int) -> tuple[str, int]:
    row = cur.execute("SELECT body FROM records WHERE kind = ? AND id = ?", (kind, rid)).fetchone()
    if row is not None and row[0] is None:
        return "absent", version  # deleted already
    cur.execute("INSERT OR REPLACE INTO records VALUES (?, ?, NULL, ?)", (kind, rid, version + 1))
    return ("deleted" if row is not None else "absent"), version + 1


class CatalogStore:
    """The catalogue in one SQLite file (WAL: one writer, readers in other processes see committed calls).
    body NULL in `records` is a tombstone: the record was deleted at that version."""

    def __init__(self, path: Path, *, busy_timeout_ms: int = 10_000) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(self.path, timeout=busy_timeout_ms / 1000, isolation_level=None,
                                     check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")  # a call that returned survives a power cut too
        self._conn.executescript(_SCHEMA)

    @classmethod
    def in_dir(cls, data_dir: Path) -> CatalogStore:
        return cls(Path(data_dir) / CATALOG_FILE)

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> CatalogStore:
        return self

    def __exit__(self, *_) -> None:
        self.close()

    def _write(self, body):
        cur = self._conn.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            version = cur.execute("SELECT value FROM meta WHERE key = 'version'").fetchone()[0]
            out, version = body(cur, version)
            cur.execute("UPDATE meta SET value = ? WHERE key = 'version'", (version,))
            cur.execute("COMMIT")
            return out, version
        except BaseException:
            cur.execute("ROLLBACK")
            raise

    def upsert(self, records: Iterable[CatalogRecord]) -> UpsertResult:
        """Insert or replace records (one transaction); each record whose features changed gets a new version."""
        records = list(records)
        for r in records:
            if not isinstance(r, CatalogRecord):
                raise ValueError(f"upsert takes CatalogRecord objects, got {type(r).__name__}")

        def body(cur: sqlite3.Cursor, version: int):
            self._refuse_if_following(cur)
            outcomes = []
            for r in records:
                outcome, version = _upsert_one(cur, r, version)
                outcomes.append(outcome)
            return outcomes, version

        outcomes, version = self._write(body)
        return UpsertResult(outcomes.count("inserted"), outcomes.count("updated"), outcomes.count("unchanged"),
                            version)

    def delete(self, ids: Iterable[str], kind: str = "item") -> tuple[int, int]:
        """Delete records by id (one transaction) -> (records deleted, version after). An id the catalogue never
        had gets a tombstone too (not counted): a serving engine may hold it from its build and must drop it."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        ids = list(ids)

        def body(cur: sqlite3.Cursor, version: int):
            self._refuse_if_following(cur)
            n = 0
            for rid in ids:
                outcome, version = _delete_one(cur, kind, rid, version)
                n += outcome == "deleted"
            return n, version

        return self._write(body)

    def apply_ops(self, ops: Sequence[CatalogOp], *, stream_offset: int) -> tuple[list[str], int]:
        """Apply changes read from the catalogue stream (contracts/catalog_stream.py) and note the stream offset to
        read next, in one transaction -> (each op's outcome: inserted / updated / unchanged / deleted / absent,
        the version after). From the first call on the store follows the stream: local upsert/delete refuse."""
        def body(cur: sqlite3.Cursor, version: int):
            outcomes = []
            for op in ops:
                if op.record is None:
                    outcome, version = _delete_one(cur, op.kind, op.id, version)
                else:
                    outcome, version = _upsert_one(cur, op.record, version)
                outcomes.append(outcome)
            cur.execute("INSERT OR REPLACE INTO meta VALUES ('stream_offset', ?)", (stream_offset,))
            return outcomes, version

        return self._write(body)

    def stream_offset(self) -> int | None:
        """The catalogue stream's offset to read next; None: this store was never fed from the stream."""
        row = self._conn.execute("SELECT value FROM meta WHERE key = 'stream_offset'").fetchone()
        return None if row is None else row[0]

    def _refuse_if_following(self, cur: sqlite3.Cursor) -> None:
        if cur.execute("SELECT 1 FROM meta WHERE key = 'stream_offset'").fetchone() is not None:
            raise ValueError(f"{self.path} follows the catalogue stream (a Kafka topic): change the catalogue there "
                             "(UpsertItems / DeleteItems on a server, or livetower catalog load FILE --events "
                             "kafka://HOST:PORT/TOPIC), not in this file")

    def get(self, rid: str, kind: str = "item") -> CatalogRecord | None:
        row = self._conn.execute("SELECT body FROM records WHERE kind = ? AND id = ?", (kind, rid)).fetchone()
        return None if row is None or row[0] is None else record_from_body(kind, rid, row[0])

    def iterate(self, kind: str = "item", *, page: int = 1000) -> Iterator[CatalogRecord]:
        """Every live record of `kind`, in id order, read in pages (each page one consistent read)."""
        last = ""
        while True:
            rows = self._conn.execute("SELECT id, body FROM records WHERE kind = ? AND id > ? AND body IS NOT NULL "
                                      "ORDER BY id LIMIT ?", (kind, last, page)).fetchall()
            for rid, body in rows:
                yield record_from_body(kind, rid, body)
            if len(rows) < page:
                return
            last = rows[-1][0]

    def live_bodies(self, kind: str) -> tuple[int, list[tuple[str, str]]]:
        """(the store's version, (id, stored body) of every live record of `kind`) in one consistent read: no
        record is parsed (record_from_body does that for the ones a caller needs)."""
        cur = self._conn.cursor()
        cur.execute("BEGIN")  # a read transaction: the version and the rows are one snapshot
        try:
            version = cur.execute("SELECT value FROM meta WHERE key = 'version'").fetchone()[0]
            rows = cur.execute("SELECT id, body FROM records WHERE kind = ? AND body IS NOT NULL", (kind,)).fetchall()
        finally:
            cur.execute("COMMIT")
        return version, rows

    def count(self, kind: str = "item") -> int:
        return self._conn.execute("SELECT COUNT(*) FROM records WHERE kind = ? AND body IS NOT NULL",
                                  (kind,)).fetchone()[0]

    def version(self) -> int:
        return self._conn.execute("SELECT value FROM meta WHERE key = 'version'").fetchone()[0]

    def changes_since(self, version: int, *, limit: int = 10_000, kind: str | None = None) -> list[Change]:
        """The latest state of the records changed after `version`, oldest change first, at most `limit`
        (continue from the last one's version). A record changed twice since then appears once. kind: only
        records of that kind (None: all)."""
        if kind is None:
            rows = self._conn.execute("SELECT version, kind, id, body FROM records WHERE version > ? ORDER BY version "
                                      "LIMIT ?", (version, limit)).fetchall()
        else:
            rows = self._conn.execute("SELECT version, kind, id, body FROM records WHERE kind = ? AND version > ? "
                                      "ORDER BY version LIMIT ?", (kind, version, limit)).fetchall()
        return [Change(v, k, rid, None if body is None else record_from_body(k, rid, body)) for v, k, rid, body in rows]
