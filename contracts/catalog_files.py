"""Files of catalogue records (contracts/catalog.py's CatalogRecord); errors name the file and line.

CSV / Parquet: columns `id`, then `cat:NAME`, `num:NAME`, `text:NAME`; several categorical values in one cell are
`|`-separated (Parquet may also hold them as a list column). JSONL: one `CatalogRecord.to_dict()` object per line.
MovieLens-100k's `u.item` / `u.user`: ids "m<id>" / "u<id>", as trainer/data/movielens.py names them in events.
Parquet needs pyarrow, imported only when a Parquet file is read.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Iterator, Mapping

from contracts.catalog import KINDS, CatalogRecord, _bad

FORMATS = ("csv", "jsonl", "parquet", "ml100k-items", "ml100k-users")
FEATURE_PREFIXES = {"cat": "categorical", "num": "numeric", "text": "text"}  # CSV/Parquet column prefixes
MULTI_VALUE_SEP = "|"  # separates several categorical values in one CSV cell
# ml-100k u.item's 19 genre flags, in column order (= the data set's u.genre file)
ML100K_GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
                 "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
                 "War", "Western")


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
