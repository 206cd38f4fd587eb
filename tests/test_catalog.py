"""The catalogue (contracts/catalog.py): records and their validation, the SQLite store (round trips, versions,
changes since N, crash safety under kill -9), the loaders (CSV, JSONL, Parquet when pyarrow is installed,
MovieLens-100k's u.item / u.user) and `livetower catalog`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from contracts.catalog import CATALOG_FILE, LIMITS, CatalogRecord, CatalogStore
from contracts.catalog_files import ML100K_GENRES, guess_format, read_records

ROOT = Path(__file__).resolve().parents[1]
ML100K = ROOT.parent / "shared" / "data" / "ml-100k"
needs_ml100k = pytest.mark.skipif(not (ML100K / "u.item").is_file(), reason="ml-100k not in ../shared/data")


def rec(rid: str, **kw) -> CatalogRecord:
    return CatalogRecord(id=rid, **kw)


def test_record_normalises_and_round_trips():
    r = rec("m1", categorical={"genre": ["Comedy", "Drama", "Comedy"], "studio": "Pixar"},
            numeric={"year": 1995}, text={"title": "Toy Story"})
    assert r.categorical == {"genre": ("Comedy", "Drama"), "studio": ("Pixar",)}
    assert r.numeric == {"year": 1995.0} and isinstance(r.numeric["year"], float)
    assert CatalogRecord.from_dict(json.loads(json.dumps(r.to_dict()))) == r


@pytest.mark.parametrize("kw, field, limit", [
    (dict(id=""), "CatalogRecord.id", "1..256"),
    (dict(id="x" * 257), "CatalogRecord.id", "1..256"),
    (dict(id="a\nb"), "CatalogRecord.id", "control character"),
    (dict(id="a", kind="shop"), "CatalogRecord.kind", "('item', 'user')"),
    (dict(id="a", numeric={"year": float("nan")}), "numeric['year']", "finite"),
    (dict(id="a", numeric={"year": 1e16}), "numeric['year']", "1e+15"),
    (dict(id="a", numeric={"year": "1995"}), "numeric['year']", "must be a number"),
    (dict(id="a", numeric={"flag": True}), "numeric['flag']", "must be a number"),
    (dict(id="a", categorical={"genre": []}), "categorical['genre']", "1..64"),
    (dict(id="a", categorical={"genre": [str(i) for i in range(65)]}), "categorical['genre']", "1..64"),
    (dict(id="a", categorical={"genre": [""]}), "categorical['genre']", "1..256"),
    (dict(id="a", categorical={"genre": [3]}), "categorical['genre']", "must be a string"),
    (dict(id="a", text={"title": "x" * 8193}), "text['title']", "8192"),
    (dict(id="a", text={"bad name": "x"}), "categorical/numeric/text", "[A-Za-z0-9_.-]"),
    (dict(id="a", text={"t": "x"}, numeric={"t": 1.0}), "categorical/numeric/text", "more than one"),
    (dict(id="a", numeric={f"f{i}": 1.0 for i in range(65)}), "categorical/numeric/text", "limit is 64"),
])
def test_bad_records_name_the_field_and_the_limit(kw, field, limit):
    with pytest.raises(ValueError) as e:
        CatalogRecord(**kw)
    assert field in str(e.value) and limit in str(e.value), str(e.value)


def test_from_dict_rejects_unknown_and_missing_fields():
    with pytest.raises(ValueError, match="unknown field"):
        CatalogRecord.from_dict({"id": "a", "colour": "red"})
    with pytest.raises(ValueError, match="CatalogRecord.id: missing"):
        CatalogRecord.from_dict({"text": {}})
    assert LIMITS.max_values == 64


def test_store_round_trip_versions_and_changes(tmp_path):
    with CatalogStore.in_dir(tmp_path) as s:
        assert (tmp_path / CATALOG_FILE).is_file() and s.version() == 0
        a, b = rec("a", text={"title": "A"}), rec("b", numeric={"x": 1.0})
        assert s.upsert([a, b]) == (2, 0, 0, 2)
        assert s.upsert([a, b]) == (0, 0, 2, 2)  # unchanged: no version bump
        b2 = rec("b", numeric={"x": 2.0})
        assert s.upsert([b2]) == (0, 1, 0, 3)
        u = rec("a", kind="user", numeric={"age": 30})
        assert s.upsert([u]).version == 4
        assert s.get("a") == a and s.get("b") == b2 and s.get("a", kind="user") == u and s.get("zz") is None
        assert [r.id for r in s.iterate()] == ["a", "b"] and s.count() == 2 and s.count("user") == 1
        assert s.delete(["a", "missing"]) == (1, 6)  # "missing" gets a tombstone (an engine may hold it)
        assert s.delete(["a", "missing"]) == (0, 6)  # already deleted
        assert s.get("a") is None and [r.id for r in s.iterate()] == ["b"]
        ch = s.changes_since(2)
        assert [(c.version, c.kind, c.id) for c in ch] == [(3, "item", "b"), (4, "user", "a"), (5, "item", "a"),
                                                            (6, "item", "missing")]
        assert ch[0].record == b2 and ch[2].record is None  # latest state; None = deleted
        assert [c.version for c in s.changes_since(0, limit=2)] == [3, 4]  # b (v3: its latest), user a (v4)
        assert [(c.version, c.id) for c in s.changes_since(0, kind="user")] == [(4, "a")]
        assert [c.version for c in s.changes_since(3, kind="item")] == [5, 6]
        full = rec("f", categorical={"genre": ["x", "y"]}, numeric={"n": 3}, text={"t": "words"})
        s.upsert([full])
        back = s.get("f")  # read back without validating again: the same record, values normalised as written
        assert back == full and back.categorical["genre"] == ("x", "y") and isinstance(back.numeric["n"], float)
        s.delete(["f"])
        assert s.upsert([a]) == (1, 0, 0, 9)  # re-insert after delete
    with CatalogStore.in_dir(tmp_path) as s:  # durable across reopen
        assert s.version() == 9 and s.get("a") == a


def test_store_paging_and_bad_input(tmp_path):
    with CatalogStore.in_dir(tmp_path) as s:
        s.upsert(rec(f"i{k:04d}") for k in range(25))
        assert [r.id for r in s.iterate(page=7)] == [f"i{k:04d}" for k in range(25)]
        with pytest.raises(ValueError, match="CatalogRecord"):
            s.upsert([{"id": "x"}])
        with pytest.raises(ValueError, match="kind"):
            s.delete(["x"], kind="shop")
        assert s.version() == 25


_WRITER = """
import sys
from contracts.catalog import CatalogRecord, CatalogStore
s = CatalogStore(sys.argv[1])
for b in range(10_000):
    s.upsert([CatalogRecord(id=f"r{k}", numeric={"batch": b}) for k in range(200)])
    print(b, flush=True)
"""


def test_upsert_is_atomic_under_kill_9(tmp_path):
    """A writer upserting 200-record batches is SIGKILLed mid-stream: the store reopens clean, holding one
    whole batch (every record at the same batch number), at least the last one it reported committed."""
    path = tmp_path / CATALOG_FILE
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(5):  # let it commit a few batches, then kill it wherever it is
            last = int(proc.stdout.readline())
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    with CatalogStore(path) as s:
        batches = {r.numeric["batch"] for r in s.iterate()}
        assert s.count() == 200 and len(batches) == 1 and batches.pop() >= last
        assert s._conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_csv_jsonl_loaders(tmp_path):
    csv_path = tmp_path / "items.csv"
    csv_path.write_text("id,cat:genre,num:year,text:title\n"
                        "m1,Comedy|Drama,1995,Toy Story\n"
                        "m2,,,\n")
    got = list(read_records(csv_path))
    assert got == [rec("m1", categorical={"genre": ["Comedy", "Drama"]}, numeric={"year": 1995},
                       text={"title": "Toy Story"}), rec("m2")]
    jl = tmp_path / "items.jsonl"
    jl.write_text("\n".join(json.dumps(r.to_dict()) for r in got) + "\n\n")
    assert list(read_records(jl)) == got
    assert [r.kind for r in read_records(jl, kind="user")] == ["item", "item"]  # the file's kind wins


@pytest.mark.parametrize("body, msg", [
    ("id,genre\nm1,x\n", "items.csv:2: column 'genre': name it"),
    ("id,num:year\nm1,abc\n", "items.csv:2: CatalogRecord.numeric['year']: 'abc' is not a number"),
    ("id,num:year\nm1,nan\n", "items.csv:2: CatalogRecord.numeric['year']"),
    ("name,num:year\nm1,1\n", "needs an id column"),
])
def test_csv_errors_name_line_and_field(tmp_path, body, msg):
    p = tmp_path / "items.csv"
    p.write_text(body)
    with pytest.raises(ValueError, match=None) as e:
        list(read_records(p))
    assert msg in str(e.value), str(e.value)


def test_jsonl_error_names_line(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"id": "a"}\n{"id": "b", "numeric": {"x": "y"}}\n')
    with pytest.raises(ValueError, match=r"x.jsonl:2: CatalogRecord.numeric\['x'\]"):
        list(read_records(p))
    with pytest.raises(ValueError, match="cannot tell the format"):
        guess_format(tmp_path / "x.txt")


def test_parquet_loader(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    t = pa.table({"id": ["m1", "m2"], "cat:genre": [["Comedy", "Drama"], None], "cat:studio": ["Pixar", ""],
                  "num:year": [1995.0, None], "text:title": ["Toy Story", None]})
    pq.write_table(t, tmp_path / "items.parquet")
    assert list(read_records(tmp_path / "items.parquet")) == [
        rec("m1", categorical={"genre": ["Comedy", "Drama"], "studio": ["Pixar"]}, numeric={"year": 1995},
            text={"title": "Toy Story"}), rec("m2")]


@needs_ml100k
def test_ml100k_items_and_users():
    items = list(read_records(ML100K / "u.item"))
    assert len(items) == 1682 and {r.kind for r in items} == {"item"}
    assert items[0] == rec("m1", categorical={"genre": ["Animation", "Children's", "Comedy"]},
                           numeric={"release_year": 1995}, text={"title": "Toy Story (1995)"})
    assert items[266].id == "m267" and items[266].numeric == {}  # "unknown": no release date
    assert sum("release_year" in r.numeric for r in items) == 1681
    genre_file = [ln.split("|")[0] for ln in (ML100K / "u.genre").read_text().splitlines() if ln.strip()]
    assert tuple(genre_file) == ML100K_GENRES
    users = list(read_records(ML100K / "u.user"))
    assert len(users) == 943 and users[0] == rec("u1", kind="user", numeric={"age": 24},
                                                 categorical={"gender": "M", "occupation": "technician",
                                                              "zip3": "857"})


@needs_ml100k
def test_cli_load_and_show(tmp_path, capsys):
    from livetower.cli_catalog import catalog_main

    assert catalog_main(["load", str(ML100K / "u.item"), "--data-dir", str(tmp_path)]) == 0
    assert "1682 inserted" in capsys.readouterr().out
    assert catalog_main(["load", str(ML100K / "u.user"), "--data-dir", str(tmp_path)]) == 0
    assert catalog_main(["load", str(ML100K / "u.item"), "--format", "ml100k-items",
                           "--data-dir", str(tmp_path)]) == 0
    assert "0 inserted, 0 updated, 1682 unchanged" in capsys.readouterr().out
    assert catalog_main(["show", "--data-dir", str(tmp_path), "--id", "m1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["text"] == {"title": "Toy Story (1995)"}
    assert catalog_main(["show", "--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "1682 items, 943 users, version 2625" in out
    bad = tmp_path / "bad.csv"
    bad.write_text("id,num:year\nm1,x\n")
    assert catalog_main(["load", str(bad), "--data-dir", str(tmp_path)]) == 2
    assert "bad.csv:2" in capsys.readouterr().err
