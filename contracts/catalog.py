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

Loaders turn files into records: CSV / Parquet (columns `id`, then `cat:NAME`, `num:NAME`, `text:NAME`;
several categorical values in one cell are `|`-separated; Parquet may also hold them as a list column), JSONL
(one `CatalogRecord.to_dict()` object per line), and MovieLens-100k's `u.item` / `u.user` (ids "m<id>" /
"u<id>", as trainer/data/movielens.py names them in events). Parquet needs pyarrow, imported only when a
Parquet file is read.
"""

from __future__ import annotations

import csv
import json
import math
import re
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Mapping, NamedTuple, Sequence

KINDS = ("item", "user")
CATALOG_FILE = "catalog.sqlite"
FORMATS = ("csv", "jsonl", "parquet", "ml100k-items", "ml100k-users")
FEATURE_PREFIXES = {"cat": "categorical", "num": "numeric", "text": "text"}  # CSV/Parquet column prefixes
MULTI_VALUE_SEP = "|"  # separates several categorical values in one CSV cell
# ml-100k u.item's 19 genre flags, in column order (= the data set's u.genre file)
ML100K_GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
                 "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
                 "War", "Western")
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


def _record(kind: str, rid: str, body: str) -> CatalogRecord:
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
        return None if row is None or row[0] is None else _record(kind, rid, row[0])

    def iterate(self, kind: str = "item", *, page: int = 1000) -> Iterator[CatalogRecord]:
        """Every live record of `kind`, in id order, read in pages (each page one consistent read)."""
        last = ""
        while True:
            rows = self._conn.execute("SELECT id, body FROM records WHERE kind = ? AND id > ? AND body IS NOT NULL "
                                      "ORDER BY id LIMIT ?", (kind, last, page)).fetchall()
            for rid, body in rows:
                yield _record(kind, rid, body)
            if len(rows) < page:
                return
            last = rows[-1][0]

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
        return [Change(v, k, rid, None if body is None else _record(k, rid, body)) for v, k, rid, body in rows]


# ---- loaders: file -> records (errors name the file and line) ----

def _at(where: str, e: Exception) -> ValueError:
    return ValueError(f"{where}: {e}")


def _from_columns(row: Mapping[str, object], kind: str) -> CatalogRecord:
    """A CSV/Parquet row with columns id, cat:NAME, num:NAME, text:NAME; empty cells (or None) are absent."""
    feats: dict[str, dict] = {"categorical": {}, "numeric": {}, "text": {}}
    rid = row.get("id")
    for col, v in row.items():
        if col == "id" or v is None or v == "":
            continue
        prefix, _, name = col.partition(":")
        if prefix not in FEATURE_PREFIXES or not name:
            raise ValueError(f"column {col!r}: name it id, cat:NAME, num:NAME or text:NAME")
        if prefix == "cat":
            v = [s for s in v.split(MULTI_VALUE_SEP) if s] if isinstance(v, str) else list(v)
            if not v:
                continue
        elif prefix == "num" and isinstance(v, str):
            try:
                v = float(v)
            except ValueError:
                raise _bad(f"numeric[{name!r}]", f"{v!r} is not a number") from None
        feats[FEATURE_PREFIXES[prefix]][name] = v
    if rid is None or rid == "":
        raise _bad("id", "missing (the file needs an id column)")
    return CatalogRecord(id=str(rid), kind=kind, **feats)


def read_csv(path: Path, kind: str = "item") -> Iterator[CatalogRecord]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or "id" not in reader.fieldnames:
            raise ValueError(f"{path}: the header needs an id column, got {reader.fieldnames}")
        for row in reader:
            try:
                yield _from_columns(row, kind)
            except ValueError as e:
                raise _at(f"{path}:{reader.line_num}", e) from None


def read_jsonl(path: Path, kind: str = "item") -> Iterator[CatalogRecord]:
    """One CatalogRecord.to_dict() object per line; a line without "kind" gets `kind`. Blank lines skipped."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                yield CatalogRecord.from_dict({"kind": kind, **d} if isinstance(d, dict) else d)
            except (ValueError, TypeError) as e:
                raise _at(f"{path}:{n}", e) from None


def read_parquet(path: Path, kind: str = "item", *, batch_rows: int = 4096) -> Iterator[CatalogRecord]:
    """The CSV column convention; categorical columns may be strings ("|"-separated) or lists of strings."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"{path}: reading Parquet needs pyarrow, which is not installed "
                         "(pip install pyarrow, or convert the file to CSV or JSONL)") from None
    n = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_rows):
        for row in batch.to_pylist():
            n += 1
            try:
                yield _from_columns(row, kind)
            except ValueError as e:
                raise _at(f"{path}: row {n}", e) from None


def _ml100k_lines(path: Path) -> Iterator[tuple[int, list[str]]]:
    with open(path, encoding="latin-1") as f:  # the ml-100k files are Latin-1
        for n, line in enumerate(f, 1):
            if line.strip():
                yield n, line.rstrip("\n").split("|")


def read_ml100k_items(path: Path, kind: str = "item") -> Iterator[CatalogRecord]:
    """u.item (`id|title|release|video_release|imdb_url|19 genre flags`) -> id "m<id>", text title (with its
    year, as the file has it), numeric release_year (absent where the date is), categorical genre."""
    for n, cols in _ml100k_lines(path):
        if len(cols) != 5 + len(ML100K_GENRES):
            raise ValueError(f"{path}:{n}: expected {5 + len(ML100K_GENRES)} |-separated columns, got {len(cols)}")
        try:
            genres = [g for g, flag in zip(ML100K_GENRES, cols[5:]) if flag.strip() == "1"]
            date = cols[2].strip()
            yield CatalogRecord(id=f"m{int(cols[0])}", kind=kind, text={"title": cols[1]} if cols[1] else {},
                                numeric={"release_year": float(date[-4:])} if date else {},
                                categorical={"genre": genres} if genres else {})
        except ValueError as e:
            raise _at(f"{path}:{n}", e) from None


def read_ml100k_users(path: Path, kind: str = "user") -> Iterator[CatalogRecord]:
    """u.user (`id|age|gender|occupation|zip`) -> id "u<id>", numeric age, categorical gender, occupation and
    zip3 (the zip code's first three characters: a region)."""
    for n, cols in _ml100k_lines(path):
        if len(cols) != 5:
            raise ValueError(f"{path}:{n}: expected 5 |-separated columns, got {len(cols)}")
        try:
            uid, age, gender, occ, zipc = (c.strip() for c in cols)
            cat = {k: v for k, v in (("gender", gender), ("occupation", occ), ("zip3", zipc[:3])) if v}
            yield CatalogRecord(id=f"u{int(uid)}", kind=kind, numeric={"age": float(age)}, categorical=cat)
        except ValueError as e:
            raise _at(f"{path}:{n}", e) from None


_READERS = {"csv": read_csv, "jsonl": read_jsonl, "parquet": read_parquet, "ml100k-items": read_ml100k_items,
            "ml100k-users": read_ml100k_users}


def guess_format(path: Path) -> str:
    """The format a file's name suggests: .csv, .jsonl/.ndjson, .parquet, u.item, u.user."""
    name = Path(path).name.lower()
    for suffix, fmt in ((".csv", "csv"), (".jsonl", "jsonl"), (".ndjson", "jsonl"), (".parquet", "parquet"),
                        ("u.item", "ml100k-items"), ("u.user", "ml100k-users")):
        if name.endswith(suffix):
            return fmt
    raise ValueError(f"{path}: cannot tell the format from the name; pass one of {FORMATS}")


def read_records(path: Path, fmt: str | None = None, kind: str | None = None) -> Iterator[CatalogRecord]:
    """Records from a file in `fmt` (None: guess_format); kind None: "user" for ml100k-users, else "item"."""
    fmt = fmt or guess_format(path)
    if fmt not in _READERS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such file")
    kind = kind or ("user" if fmt == "ml100k-users" else "item")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return _READERS[fmt](Path(path), kind)
