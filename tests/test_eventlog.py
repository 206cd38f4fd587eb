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


def test_append_new_tells_which_events_were_new(tmp_path):
    log = SqliteEventLog(tmp_path / "log.db")
    assert log.append_new([ev(0), ev(1)]) == [True, True]
    assert log.append_new([ev(1), ev(2), ev(2)]) == [False, True, False]  # earlier request's id, repeat within
    assert log.count() == 3
    log.close()


def test_dead_letter_many_is_one_transaction(tmp_path):
    log = SqliteEventLog(tmp_path / "log.db")
    writes = []
    log._conn.set_trace_callback(writes.append)
    log.dead_letter_many([(b"p%d" % i, f"reason {i}") for i in range(500)])
    assert log.dead_letter_count() == 500
    assert [w for w in writes if w in ("BEGIN IMMEDIATE", "COMMIT")] == ["BEGIN IMMEDIATE", "COMMIT"]
    log.dead_letter_many([])
    assert log.dead_letter_count() == 500
    log.close()


def _filled(tmp_path, n):
    log = SqliteEventLog(tmp_path / "log.db")
    log.append([ev(i) for i in range(n)])
    return log


def test_retention_deletes_only_what_every_consumer_committed(tmp_path):
    from contracts.eventlog import RetentionConfig

    keep_10 = RetentionConfig(events_max_age_s=0, events_keep_newest=10)
    log = _filled(tmp_path, 100)
    assert log.retain(keep_10).events_deleted == 0  # no consumer has committed: nothing is safe to delete
    log.commit({"sqlite": 41})                      # the trainer consumed offsets 1..40
    r = log.retain(keep_10)
    assert (r.events_deleted, r.safe_offset) == (40, 41) and log.read(1, 1)[0].offset == 41
    other = SqliteEventLog(tmp_path / "log.db", consumer="replayer")
    other.commit({"sqlite": 1})                     # a second consumer still at the start holds the rest
    log.commit({"sqlite": 101})
    assert log.retain(keep_10).events_deleted == 0
    other.commit({"sqlite": 101})
    assert log.retain(keep_10).events_deleted == 50  # now 91..100 remain: the newest 10
    assert [e.offset for e in log.read(1, 100)] == list(range(91, 101))
    other.close()
    log.close()


def test_retention_keeps_the_newest_event_so_offsets_never_restart(tmp_path):
    from contracts.eventlog import RetentionConfig

    log = _filled(tmp_path, 5)
    log.commit({"sqlite": 6})
    far_future = 10**13
    r = log.retain(RetentionConfig(events_max_age_s=1, events_keep_newest=0), now_ms=far_future)
    assert r.events_deleted == 4 and [e.offset for e in log.read(1, 10)] == [5]
    log.append([ev(99)])
    assert log.read(6, 10)[0].offset == 6  # not 1: a consumer at offset 6 sees it
    log.close()


def test_retention_by_age_is_bounded_per_pass_and_handles_dead_letters(tmp_path):
    from contracts.eventlog import RetentionConfig

    log = _filled(tmp_path, 50)
    log.commit({"sqlite": 51})
    now = int(__import__("time").time() * 1000)
    young = RetentionConfig(events_max_age_s=3600, events_keep_newest=0, dead_letters_max_age_s=0,
                            dead_letters_keep_newest=3, max_rows_per_pass=20)
    assert log.retain(young, now_ms=now).events_deleted == 0  # all received just now
    old = RetentionConfig(events_max_age_s=3600, events_keep_newest=0, max_rows_per_pass=20,
                          dead_letters_max_age_s=0, dead_letters_keep_newest=3)
    later = now + 2 * 3600_000
    assert log.retain(old, now_ms=later).events_deleted == 20  # at most max_rows_per_pass per call
    assert log.retain(old, now_ms=later).events_deleted == 20
    assert log.retain(old, now_ms=later).events_deleted == 9   # the newest stays
    log.dead_letter_many([(b"x", "bad")] * 10)
    assert log.retain(old, now_ms=later).dead_letters_deleted == 7 and log.dead_letter_count() == 3
    with pytest.raises(ValueError, match="max_rows_per_pass"):
        RetentionConfig(max_rows_per_pass=0)
    log.close()
