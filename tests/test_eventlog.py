import sqlite3

import pytest

from contracts.eventlog import SqliteEventLog, StoredEvent
from proto import livetower_v1_pb2 as pb


def ev(i, *, user="u1", item=None, weight=1.0, ts=None, action="click"):
    return pb.Event(event_id=f"e{i}", user_id=user, item_id=item or f"i{i}", action=action,
                    weight=weight, timestamp_ms=ts if ts is not None else 1_000 + i)


def test_offsets_start_at_one_and_are_dense(tmp_path):
    log = SqliteEventLog(tmp_path / "log.db")
    assert log.end_offset() == 1
    assert log.append([ev(0), ev(1), ev(2)]) == 3
    assert log.append([ev(3)]) == 1
    assert [e.offset for e in log.read(1, 100)] == [1, 2, 3, 4]
    assert log.end_offset() == 5
    assert log.count() == 4
    log.close()


def test_repeated_event_id_is_ignored_and_not_counted(tmp_path):
    log = SqliteEventLog(tmp_path / "log.db")
    assert log.append([ev(0), ev(1)]) == 2
    # retry of the same batch: nothing new
    assert log.append([ev(0), ev(1)]) == 0
    # mixed batch, plus a duplicate inside the batch itself
    assert log.append([ev(1), ev(2), ev(2), ev(3)]) == 2
    rows = log.read(1, 100)
    assert [r.event_id for r in rows] == ["e0", "e1", "e2", "e3"]
    offsets = [r.offset for r in rows]
    assert offsets[:2] == [1, 2] and offsets == sorted(set(offsets))
    assert log.end_offset() == offsets[-1] + 1
    log.close()


def test_offsets_stay_dense_after_ignored_duplicates(tmp_path):
    log = SqliteEventLog(tmp_path / "log.db")
    log.append([ev(0), ev(1)])
    log.append([ev(1), ev(2)])  # e1 is a retry
    assert [r.offset for r in log.read(1, 100)] == [1, 2, 3]  # actual: [1, 2, 4]
    assert log.end_offset() - 1 == log.count()
    log.close()


def test_duplicate_keeps_first_version_of_event(tmp_path):
    log = SqliteEventLog(tmp_path / "log.db")
    log.append([ev(0, item="first")])
    log.append([pb.Event(event_id="e0", user_id="other", item_id="second", action="view",
                         weight=2.0, timestamp_ms=5)])
    (row,) = log.read(1, 10)
    assert row.item_id == "first" and row.user_id == "u1"
    log.close()


def test_append_empty_batch(tmp_path):
    log = SqliteEventLog(tmp_path / "log.db")
    assert log.append([]) == 0
    assert log.end_offset() == 1
    log.close()


def test_read_fields_and_range(tmp_path):
    log = SqliteEventLog(tmp_path / "log.db")
    log.append([ev(i, user=f"u{i % 2}", weight=0.5 * i, ts=10_000 + i) for i in range(10)])
    rows = log.read(4, 3)
    assert rows == [
        StoredEvent(4, "e3", "u1", "i3", "click", 1.5, 10_003),
        StoredEvent(5, "e4", "u0", "i4", "click", 2.0, 10_004),
        StoredEvent(6, "e5", "u1", "i5", "click", 2.5, 10_005),
    ]
    assert isinstance(rows[0].timestamp_ms, int)
    assert [r.offset for r in log.read(8, 100)] == [8, 9, 10]
    assert log.read(11, 100) == []
    assert [r.offset for r in log.read(0, 2)] == [1, 2]
    assert log.read(1, 0) == []
    log.close()


def test_large_timestamp_roundtrips_exactly(tmp_path):
    log = SqliteEventLog(tmp_path / "log.db")
    ts = 1_767_225_600_123
    log.append([ev(0, ts=ts)])
    assert log.read(1, 1)[0].timestamp_ms == ts
    log.close()


def test_latest_returns_newest_oldest_first(tmp_path):
    log = SqliteEventLog(tmp_path / "log.db")
    assert log.latest(5) == []
    log.append([ev(i) for i in range(7)])
    assert [r.offset for r in log.latest(3)] == [5, 6, 7]
    assert [r.event_id for r in log.latest(3)] == ["e4", "e5", "e6"]
    assert [r.offset for r in log.latest(100)] == list(range(1, 8))
    log.close()


def test_dead_letter_stored_with_reason_and_payload(tmp_path):
    log = SqliteEventLog(tmp_path / "log.db")
    p1 = ev(1, weight=float("nan")).SerializeToString()
    p2 = b"\x00\xffraw bytes"
    log.dead_letter(p1, "weight is nan")
    log.dead_letter(p2, "unparseable")
    got = log.dead_letters()
    assert got == [("unparseable", p2), ("weight is nan", p1)]  # newest first
    assert isinstance(got[0][1], bytes)
    assert log.dead_letters(limit=1) == [("unparseable", p2)]
    # dead letters never become events
    assert log.end_offset() == 1 and log.count() == 0
    log.close()


def test_second_instance_on_same_file_sees_rows(tmp_path):
    path = tmp_path / "sub" / "log.db"  # parent is created
    writer = SqliteEventLog(path)
    reader = SqliteEventLog(path)
    assert reader.end_offset() == 1
    writer.append([ev(0), ev(1)])
    assert reader.end_offset() == 3
    assert [r.event_id for r in reader.read(1, 10)] == ["e0", "e1"]
    writer.append([ev(2)])
    assert [r.event_id for r in reader.read(3, 10)] == ["e2"]
    # appends from the "other process" are deduplicated against ours
    assert reader.append([ev(2), ev(3)]) == 1
    assert [r.event_id for r in writer.read(1, 10)] == ["e0", "e1", "e2", "e3"]
    assert writer.end_offset() == reader.end_offset()
    mode = sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode.lower() == "wal"
    writer.close()
    reader.close()


def test_reopen_after_close_keeps_everything(tmp_path):
    path = tmp_path / "log.db"
    log = SqliteEventLog(path)
    log.append([ev(i) for i in range(5)])
    log.dead_letter(b"x", "bad")
    before = log.read(1, 100)
    log.close()
    log2 = SqliteEventLog(path)
    assert log2.read(1, 100) == before
    assert log2.end_offset() == 6
    assert log2.dead_letters() == [("bad", b"x")]
    assert log2.append([ev(5), ev(6)]) == 2
    assert [r.offset for r in log2.read(6, 10)] == [6, 7]
    log2.close()
