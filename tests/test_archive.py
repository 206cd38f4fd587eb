"""The Delta Lake event archive: exactly-once archiving with resume, and the archive as a training source."""

from __future__ import annotations

import json

import deltalake
import pytest

from trainer.sources.archive import ArchiveConfig, ArchiveError, ArchiveRace, DeltaArchiver, DeltaEventSource
from contracts.eventlog import SOURCE_KEY, EventBatch, SqliteEventLog
from contracts.registry import Registry
from tests.conftest import SMALL_DATA, stream_events
from trainer.config import TrainConfig
from trainer.data.synthetic import generate
from trainer.loop import Trainer


def _log(tmp_path, events) -> SqliteEventLog:
    log = SqliteEventLog(tmp_path / "events.sqlite")
    log.append(events)
    return log


def _archived_ids(table) -> list[str]:
    src = DeltaEventSource(table, handoff=False)
    return [e.event_id for e in src.read_batch({}, 1_000_000).events]


def test_round_trip_in_source_order_with_positions_in_rows_and_commit(tmp_path):
    events = list(generate(SMALL_DATA))[:1200]
    log = _log(tmp_path, events)
    table = tmp_path / "archive"
    archiver = DeltaArchiver(log, table, ArchiveConfig(batch_events=500))
    p = archiver.archive_once()
    assert (p.batches, p.events, p.positions) == (3, 1200, {SOURCE_KEY: 1201})
    src = DeltaEventSource(table)
    batch = src.read_batch({}, 10_000)
    got = [(e.event_id, e.user_id, e.item_id, e.action, e.weight, e.timestamp_ms) for e in batch.events]
    assert got == [(e.event_id, e.user_id, e.item_id, e.action, e.weight, e.timestamp_ms) for e in events]
    assert [e.offset for e in batch.events] == list(range(1200))  # archive_seq: append order
    assert batch.next_offsets == {src.key: 1200, SOURCE_KEY: 1201}  # handoff: the live log's position
    assert src.key.startswith("delta:") and src.lag(batch.next_offsets) == {src.key: 0}
    history = deltalake.DeltaTable(str(table)).history()
    assert json.loads(history[0]["livetower.archive.positions"]) == {SOURCE_KEY: 1201}
    assert deltalake.DeltaTable(str(table)).transaction_version("livetower-archiver") == 3
    # Paging with a limit that splits a batch: the live position moves only when a batch is finished.
    b1 = src.read_batch({}, 700)
    assert b1.next_offsets == {src.key: 700, SOURCE_KEY: 501}
    b2 = src.read_batch(b1.next_offsets, 300)
    assert b2.next_offsets == {src.key: 1000, SOURCE_KEY: 1001}


def test_restart_resumes_after_the_last_commit_without_duplicates(tmp_path, monkeypatch):
    events = list(generate(SMALL_DATA))
    log = _log(tmp_path, events[:1000])
    table = tmp_path / "archive"
    DeltaArchiver(log, table, ArchiveConfig(batch_events=400)).archive_once()
    log.append(events[1000:2000])
    # A crash inside the commit (after the source was read): nothing of that batch is in the table.
    import trainer.sources.archive as archive_mod

    crashing = DeltaArchiver(log, table, ArchiveConfig(batch_events=400))
    assert crashing.positions == {SOURCE_KEY: 1001} and crashing.next_seq == 1000
    real_rows = crashing._rows
    calls = {"n": 0}

    def crash_on_second(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk went away mid-commit")
        return real_rows(*a, **k)

    monkeypatch.setattr(crashing, "_rows", crash_on_second)
    with pytest.raises(OSError):
        crashing.archive_once()
    assert crashing.positions == {SOURCE_KEY: 1401}  # reloaded from the table: the first batch committed
    # A fresh process resumes and archives the rest exactly once; a second pass finds nothing to do.
    again = DeltaArchiver(log, table, ArchiveConfig(batch_events=400))
    assert again.archive_once().events == 600 and again.archive_once().events == 0
    ids = _archived_ids(table)
    assert ids == [e.event_id for e in events[:2000]] and len(set(ids)) == 2000
    assert archive_mod.DeltaEventSource(table).lag({}) == {DeltaEventSource(table).key: 2000}


def test_two_archivers_racing_for_the_same_batch_write_it_once(tmp_path):
    events = list(generate(SMALL_DATA))[:600]
    log = _log(tmp_path, events[:300])
    table = tmp_path / "archive"
    first, second = DeltaArchiver(log, table), DeltaArchiver(log, table)  # both find no table
    assert first.archive_once().events == 300
    with pytest.raises(ArchiveRace):
        second.archive_once()  # the table it would create exists, with batch 1 in it
    assert second.positions == {SOURCE_KEY: 301}
    log.append(events[300:])
    a, b = DeltaArchiver(log, table), DeltaArchiver(log, table)  # both loaded at the same state
    assert a.archive_once().events == 300
    with pytest.raises(Exception, match="(?i)concurrent|transaction"):
        b.archive_once()  # Delta refuses b's batch 2: a committed it first
    assert b.positions == {SOURCE_KEY: 601} and b.archive_once().events == 0
    assert _archived_ids(table) == [e.event_id for e in events]


def test_dead_letter_only_reads_are_carried_to_the_next_batch(tmp_path):
    class Source:  # a stream whose first read is all dead letters (e.g. a Kafka partition)
        def __init__(self, events):
            self.events = events

        def read_batch(self, offsets, limit):
            at = offsets.get("k:0", 0)
            if at < 5:
                return EventBatch([], {"k:0": 5}, dead_lettered=5)
            chunk = [e._replace(offset=at + i) for i, e in enumerate(self.events[at - 5:at - 5 + limit])]
            return EventBatch(chunk, {"k:0": at + len(chunk)} if chunk else dict(offsets))

        def lag(self, offsets):
            return {"k:0": 5 + len(self.events) - offsets.get("k:0", 0)}

        def commit(self, offsets):
            pass

        def close(self):
            pass

    stored = _log(tmp_path, list(generate(SMALL_DATA))[:50]).read(1, 50)
    archiver = DeltaArchiver(Source(stored), tmp_path / "archive")
    assert archiver.archive_once().positions == {"k:0": 55} and archiver.lag() == {"k:0": 0}


def test_backfill_source_feeds_a_trainer_round_and_hands_off_to_the_live_log(tmp_path):
    events = list(generate(SMALL_DATA))
    log = _log(tmp_path, events)
    table = tmp_path / "archive"
    DeltaArchiver(log, table, ArchiveConfig(batch_events=1500)).archive_once()
    src = DeltaEventSource(table)
    trainer = Trainer(TrainConfig.tiny_debug(), src, Registry(tmp_path / "registry"), tmp_path / "trainer")
    assert trainer.backlog() == len(events)
    r = trainer.run_round()
    assert r is not None and r.events == len(events) and r.published_version == 1
    assert trainer.state.offsets == {src.key: len(events), SOURCE_KEY: len(events) + 1}
    assert trainer.run_round() is None
    # The archive grows: the backfill source resumes after what it read, and the live log after the archive.
    new = stream_events(seed=9)
    log.append(new)
    DeltaArchiver(log, table).archive_once()
    assert Trainer(TrainConfig.tiny_debug(), DeltaEventSource(table), Registry(tmp_path / "registry"),
                   tmp_path / "trainer").run_round().events == len(new)
    live = Trainer(TrainConfig.tiny_debug(), log, Registry(tmp_path / "registry"), tmp_path / "trainer")
    assert live.backlog() == 0 and live.run_round() is None  # nothing trained twice


def test_missing_or_foreign_table_gives_a_clear_error(tmp_path):
    with pytest.raises(ArchiveError, match="no Delta table at .*livetower archive"):
        DeltaEventSource(tmp_path / "nowhere")
    import arro3.core as ac

    foreign = tmp_path / "foreign"
    deltalake.write_deltalake(str(foreign), ac.Table.from_pydict({"x": ac.Array([1, 2], ac.DataType.int64())}))
    with pytest.raises(ArchiveError, match="not a livetower event archive .*missing columns event_id"):
        DeltaEventSource(foreign)
    with pytest.raises(ArchiveError, match="not a livetower event archive"):
        DeltaArchiver(_log(tmp_path, []), foreign)
    with pytest.raises(ValueError, match="ArchiveConfig.batch_events"):
        ArchiveConfig(batch_events=0)


# `train` in pytest's own process: leave its priority and cgroup alone (trainer/priority.py).
IN_PROCESS = ["--trainer-nice", "0", "--trainer-cpu-weight", "0", "--no-trainer-idle-policy"]  # pytest's own process


def test_cli_archive_then_train_backfill(tmp_path, capsys):
    """The operator path: ingest -> `livetower archive --once` -> `livetower train --backfill` drains the archive."""
    from livetower.cli import main

    data = tmp_path / "data"
    assert main(["ingest", "synthetic", "--users", "60", "--data-dir", str(data)]) == 0
    n = SqliteEventLog(data / "events.sqlite").count()
    assert main(["archive", "--once", "--data-dir", str(data), "--table", str(tmp_path / "archive")]) == 0
    capsys.readouterr()
    assert main(["train", "--backfill", str(tmp_path / "archive"), "--data-dir", str(data), "--tiny",
                 "--backend", "torch", "--trainer-metrics-port", "-1", "--train-threads", "1",
                 *IN_PROCESS]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["events"] == n and summary["rounds"] >= 1 and summary["published_versions"]
    assert main(["train", "--backfill", str(tmp_path / "nowhere"), "--data-dir", str(data), "--tiny",
                 "--trainer-metrics-port", "-1", *IN_PROCESS]) == 2
