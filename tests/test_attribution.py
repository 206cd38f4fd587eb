"""Attribution (contracts/attribution.py): impression ids on Recommend, impression_id on events, the event log's
migration, the join rules, and exactly-once joining across a kill -9 of the joiner (a real subprocess)."""

from __future__ import annotations

import json
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from contracts.attribution import (ATTRIBUTION_FILE, Impression, JoinConfig, Joiner, Outcome, connect,
                                   insert_impressions, read_outcomes)
from contracts.impressions import ImpressionConfig, ImpressionWriter, new_impression_id
from contracts.eventlog import SqliteEventLog
from livetower import cli
from contracts.events import event_problem
from proto import livetower_v1_pb2 as pb
from tests.conftest import client_for, running_server, server_config, wait_for

ROOT = Path(__file__).resolve().parent.parent
NOW_MS = 1_700_000_000_000


def event(i: int, user: str, item: str, ts: int, impression_id: str = "") -> pb.Event:
    return pb.Event(event_id=f"e{i}", user_id=user, item_id=item, action="click", weight=1.0, timestamp_ms=ts,
                    impression_id=impression_id)


# ---------------------------------------------------------------- the event contract and the log

@pytest.mark.parametrize("impression_id, problem", [
    ("", None), ("0f" * 16, None), ("A-z_9", None), ("x" * 64, None),
    ("x" * 65, "impression_id has 65 characters; the limit is 64"),
    ("a b", "impression_id has characters outside [A-Za-z0-9_-]"),
    ("a/b", "impression_id has characters outside [A-Za-z0-9_-]"),
    ("é", "impression_id has characters outside [A-Za-z0-9_-]"),
])
def test_impression_id_validation(impression_id, problem):
    got = event_problem(event(1, "u", "i", NOW_MS, impression_id), NOW_MS)
    assert got == problem if problem is None else got.startswith(problem), got


_OLD_SCHEMA = """
CREATE TABLE events (offset INTEGER PRIMARY KEY, event_id TEXT NOT NULL UNIQUE, user_id TEXT NOT NULL,
  item_id TEXT NOT NULL, action TEXT NOT NULL, weight REAL NOT NULL, timestamp_ms INTEGER NOT NULL,
  received_ms INTEGER NOT NULL);
INSERT INTO events VALUES (1, 'old-1', 'u1', 'i1', 'click', 1.0, 1000, 2000);
"""


def test_eventlog_migrates_an_old_database_in_place(tmp_path):
    path = tmp_path / "events.sqlite"
    conn = sqlite3.connect(path)
    conn.executescript(_OLD_SCHEMA)
    conn.close()
    log = SqliteEventLog(path)
    log.append([event(2, "u1", "i2", 3000, "imp-1")])
    assert [(e.event_id, e.impression_id) for e in log.read(1, 10)] == [("old-1", ""), ("e2", "imp-1")]
    log.close()
    log = SqliteEventLog(path)  # a second open finds the column and changes nothing
    assert [(e.offset, e.impression_id) for e in log.latest(10)] == [(1, ""), (2, "imp-1")]
    assert [(e.offset, r) for e, r in log.read_received(1, 1)] == [(1, 2000)]
    log.close()


# ---------------------------------------------------------------- the server records impressions

def test_server_returns_impression_ids_and_stores_them(trained_dir):
    with running_server(server_config(trained_dir)) as (server, port):
        client = client_for(server, port)
        wait_for(lambda: server.manager.current is not None, 30, "engine 1 to load")
        responses = [client.recommend(f"user-{u}", k=5) for u in range(8) for _ in range(2)]
        ids = [r.impression_id for r in responses]
        assert all(len(i) == 32 for i in ids) and len(set(ids)) == len(ids)
        first = responses[0]
        bad = client.log_events([event(1, "user-0", first.item_ids[0], int(time.time() * 1000), "not/valid"),
                                 event(2, "user-0", first.item_ids[0], int(time.time() * 1000), first.impression_id)])
        assert bad.accepted == 1 and [r.reason.split(" ")[0] for r in bad.rejected] == ["impression_id"]
        store = connect(trained_dir / ATTRIBUTION_FILE)
        wait_for(lambda: store.execute("SELECT COUNT(*) FROM impressions").fetchone()[0] == len(ids), 10,
                 "impressions flushed")
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
        assert (f'livetower_outcome_impressions{{arm="stable",engine_version="{first.engine_version}"}} '
                f'{float(len(ids))}') in metrics  # read from the store at scrape time
        client.close()
    rows = {r[0]: r[1:] for r in store.execute(
        "SELECT impression_id, user_id, arm, engine_version, item_ids FROM impressions")}
    assert rows[first.impression_id] == ("user-0", "stable", first.engine_version,
                                          "[" + ",".join(f'"{i}"' for i in first.item_ids) + "]")
    assert read_outcomes(store) == {("stable", first.engine_version): Outcome(len(ids), 0, 0, 0, 0, 0)}
    stored = SqliteEventLog(trained_dir / "events.sqlite")
    assert stored.latest(1)[0].impression_id == first.impression_id
    stored.close()
    joiner = Joiner(trained_dir, JoinConfig(grace_s=0))
    joiner.run(threading.Event(), once=True)
    assert read_outcomes(store)[("stable", first.engine_version)] == Outcome(len(ids), 1, 1, 1, 0, 0)
    joiner.close()
    store.close()


def test_impression_ids_are_uuid7_layout_time_first_and_random_after():
    """32 hex digits in RFC 9562's UUIDv7 layout: the store's unique index takes them in time order (inserts at its
    right edge), and the 74 random bits keep them unguessable and distinct within a millisecond."""
    import uuid

    ms = 1_765_000_000_123
    ids = [new_impression_id(ms + i // 1000) for i in range(3000)]  # 1,000 in each of three milliseconds
    assert all(len(i) == 32 and set(i) <= set("0123456789abcdef") for i in ids) and len(set(ids)) == len(ids)
    parsed = [uuid.UUID(hex=i) for i in ids]
    assert {u.version for u in parsed} == {7} and {u.variant for u in parsed} == {uuid.RFC_4122}
    assert [u.int >> 80 for u in parsed] == [ms + i // 1000 for i in range(3000)]
    assert sorted(ids[:1000])[-1] < sorted(ids[1000:2000])[0]  # a later millisecond sorts after
    assert len({i[12:] for i in ids}) == len(ids)  # the random part differs


def test_impressions_off_means_no_id(trained_dir):
    with running_server(server_config(trained_dir, impressions=None)) as (server, port):
        client = client_for(server, port)
        wait_for(lambda: server.manager.current is not None, 30, "engine 1 to load")
        assert client.recommend("user-1", k=3).impression_id == ""
        client.close()
    assert not (trained_dir / ATTRIBUTION_FILE).exists()


def test_writer_drops_and_counts_when_its_queue_is_full(tmp_path):
    dropped = []
    writer = ImpressionWriter(tmp_path / ATTRIBUTION_FILE, ImpressionConfig(max_queue=3),
                              on_drop=lambda: dropped.append(1))  # not started: nothing drains the queue
    accepted = [writer.submit(Impression(f"i{n}", "u", "stable", 1, ["a"], NOW_MS)) for n in range(5)]
    assert accepted == [True, True, True, False, False] and len(dropped) == 2
    writer.start()
    writer.close()  # flushes the three queued
    assert read_outcomes(tmp_path / ATTRIBUTION_FILE) == {("stable", 1): Outcome(3, 0, 0, 0, 0, 0)}
    assert not writer.submit(Impression("late", "u", "stable", 1, ["a"], NOW_MS)) and len(dropped) == 3


def test_writer_deletes_expired_impressions_and_keeps_their_counts(tmp_path):
    now_ms = int(time.time() * 1000)
    writer = ImpressionWriter(tmp_path / ATTRIBUTION_FILE, ImpressionConfig(retention_s=60, prune_interval_s=0.05,
                                                                            flush_interval_ms=10))
    writer.submit(Impression("old", "u", "stable", 1, ["a"], now_ms - 61_000))
    writer.submit(Impression("new", "u", "stable", 1, ["a"], now_ms - 1_000))
    writer.start()
    wait_for(lambda: writer.pruned == 1, 10, "the expired impression to be deleted")
    writer.close()
    conn = connect(tmp_path / ATTRIBUTION_FILE)
    assert [r[0] for r in conn.execute("SELECT impression_id FROM impressions")] == ["new"]
    conn.close()
    assert read_outcomes(tmp_path / ATTRIBUTION_FILE) == {("stable", 1): Outcome(2, 0, 0, 0, 0, 0)}


# ---------------------------------------------------------------- the join rules

def test_join_rules(tmp_path):
    window = 60_000
    store = connect(tmp_path / ATTRIBUTION_FILE)
    insert_impressions(store, [Impression("A", "u1", "stable", 1, ["i1", "i2"], NOW_MS),
                               Impression("B", "u1", "canary", 2, ["i3"], NOW_MS),
                               Impression("Q", "u3", "stable", 1, ["i1"], NOW_MS)])
    assert insert_impressions(store, [Impression("A", "u1", "stable", 1, ["i1"], NOW_MS)]) == 0  # counted once
    log = SqliteEventLog(tmp_path / "events.sqlite")
    log.append([event(1, "u1", "i1", NOW_MS + 1_000, "A"),            # joined, hit: A has a hit now
                event(2, "u1", "i2", NOW_MS + 2_000, "A"),            # joined, hit (A already counted)
                event(3, "u1", "i9", NOW_MS + 3_000, "A"),            # joined, no hit
                event(4, "u2", "i1", NOW_MS + 1_000, "A"),            # another user: mismatch
                event(5, "u1", "i1", NOW_MS + window + 1, "A"),       # after the window: late
                event(6, "u1", "i1", NOW_MS - 1, "A"),                # before the response: late
                event(7, "u1", "i1", NOW_MS + 1_000),                 # no impression: not attributed
                event(8, "u1", "i3", NOW_MS + 1_000, "B"),            # canary arm, hit
                event(9, "u3", "i9", NOW_MS + 1_000, "Q"),            # joined, no hit: Q has no hit impression
                event(10, "u1", "i1", NOW_MS + 1_000, "nope")])       # unknown: waited for, then counted
    joiner = Joiner(tmp_path, JoinConfig(window_s=window / 1000, grace_s=5.0))
    now = int(time.time() * 1000)
    step = joiner.step(now)
    assert step[:3] == (9, 10, True)  # stopped at the unknown id, within its grace
    assert joiner.step(now)[:3] == (0, 10, True)
    assert read_outcomes(store) == {("stable", 1): Outcome(2, 1, 2, 4, 2, 1), ("canary", 2): Outcome(1, 1, 1, 1, 0, 0)}
    assert joiner.step(now + 5_001)[:3] == (1, 11, False) and joiner.unknown_events() == 1
    log.append([event(11, "u1", "i4", NOW_MS + 1_000, "C")])  # its impression is not flushed yet
    assert joiner.step()[:3] == (0, 11, True)
    insert_impressions(store, [Impression("C", "u1", "stable", 1, ["i4"], NOW_MS)])
    assert joiner.step()[:3] == (1, 12, False)
    assert read_outcomes(store)[("stable", 1)] == Outcome(3, 2, 3, 5, 2, 1)
    assert joiner.step(now + 10**9)[:3] == (0, 12, False)  # nothing read twice
    assert log.committed() == {"attribution": 12}  # retention keeps what the joiner has not read
    joiner.close()
    log.close()
    store.close()


class PartitionedSource:
    """Two position keys (as Kafka partitions are), read from lists: what the joiner sees of a topic."""

    def __init__(self, records: dict[str, list]) -> None:
        self.records = records

    def read(self, positions, limit):
        from contracts.attribution_sources import ReceivedEvent

        out = []
        for key, evs in self.records.items():
            for off, (ev, received_ms) in enumerate(evs):
                if off >= positions.get(key, 0):
                    out.append(ReceivedEvent(key, off, ev, received_ms))
        return out[:limit]

    def commit(self, positions):
        pass

    def close(self):
        pass


def test_an_unflushed_impression_holds_back_only_its_own_partition(tmp_path):
    from contracts.eventlog import StoredEvent

    store = connect(tmp_path / ATTRIBUTION_FILE)
    insert_impressions(store, [Impression("A", "u1", "stable", 1, ["i1"], NOW_MS)])
    now = int(time.time() * 1000)

    def stored(i: int, imp: str) -> StoredEvent:
        return StoredEvent(i, f"e{i}", "u1", "i1", "click", 1.0, NOW_MS + 1_000, imp)

    source = PartitionedSource({"p0": [(stored(0, "LATE"), now), (stored(1, "A"), now)],
                                "p1": [(stored(2, "A"), now), (None, now), (stored(3, "A"), now)]})
    joiner = Joiner(tmp_path, JoinConfig(grace_s=5.0), source=source)
    step = joiner.step(now)
    assert step.waiting and step.events == 3 and step.positions == {"sqlite": 1, "p1": 3}  # p0 waits for "LATE"
    assert read_outcomes(store)[("stable", 1)].joined_events == 2  # the malformed record (None) is stepped over
    insert_impressions(store, [Impression("LATE", "u1", "stable", 1, ["i2"], NOW_MS)])
    step = joiner.step(now)
    assert not step.waiting and step.events == 2 and step.positions == {"sqlite": 1, "p0": 2, "p1": 3}
    assert read_outcomes(store)[("stable", 1)].joined_events == 4
    assert Joiner(tmp_path, source=source).positions() == {"sqlite": 1, "p0": 2, "p1": 3}  # committed
    joiner.close()
    store.close()


# ---------------------------------------------------------------- exactly once across kill -9

N_IMPRESSIONS, N_EVENTS, WINDOW_MS = 10_000, 50_000, 600_000


def _stream(seed: int = 7):
    """N_IMPRESSIONS impressions over 2 arms x 3 versions and N_EVENTS events naming them (or not): hits, misses,
    late ones, other users' and unknown ids."""
    rng = random.Random(seed)
    imps = [Impression(f"imp{n}", f"u{n % 997}", ("stable", "canary")[n % 2], 1 + n % 3,
                       [f"i{rng.randrange(500)}" for _ in range(10)], NOW_MS + n * 10) for n in range(N_IMPRESSIONS)]
    events = []
    for e in range(N_EVENTS):
        imp = imps[rng.randrange(N_IMPRESSIONS)]
        kind = rng.random()
        item = rng.choice(imp.item_ids) if rng.random() < 0.4 else f"i{rng.randrange(500)}"
        ts = imp.served_ms + (rng.randrange(WINDOW_MS) if kind > 0.1 else WINDOW_MS + 1 + rng.randrange(1000))
        user, iid = imp.user_id, imp.impression_id
        if 0.95 < kind <= 0.97:
            user = "someone-else"
        elif kind > 0.97:
            iid = rng.choice(["", f"gone{e}"])
        events.append(event(e, user, item, ts, iid))
    return imps, events


def _expected(imps, events) -> tuple[dict, int]:
    """The outcomes recomputed from scratch, plainly."""
    by_id = {i.impression_id: i for i in imps}
    out = {}
    for i in imps:
        out.setdefault((i.arm, i.engine_version), [0] * 6)[0] += 1
    hit, unknown = set(), 0
    for ev in events:
        if not ev.impression_id:
            continue
        imp = by_id.get(ev.impression_id)
        if imp is None:
            unknown += 1
            continue
        row = out[(imp.arm, imp.engine_version)]
        if ev.user_id != imp.user_id:
            row[5] += 1
        elif not 0 <= ev.timestamp_ms - imp.served_ms <= WINDOW_MS:
            row[4] += 1
        else:
            row[3] += 1
            if ev.item_id in imp.item_ids:
                row[2] += 1
                if imp.impression_id not in hit:
                    hit.add(imp.impression_id)
                    row[1] += 1
    return {k: Outcome(*v) for k, v in out.items()}, unknown


def test_joiner_kill9_mid_stream_loses_nothing_and_counts_nothing_twice(tmp_path, capsys):
    imps, events = _stream()
    store = connect(tmp_path / ATTRIBUTION_FILE)
    for n in range(0, N_IMPRESSIONS, 2_000):
        insert_impressions(store, imps[n:n + 2_000])
    log = SqliteEventLog(tmp_path / "events.sqlite")
    log.append_all(events)
    end = log.end_offset()
    log.close()
    cmd = [sys.executable, "-m", "livetower", "--log-level", "WARNING", "attribution", "join", "--data-dir",
           str(tmp_path), "--once", "--grace-s", "0", "--window-s", str(WINDOW_MS / 1000), "--batch-events", "200"]

    def position() -> int:
        return store.execute("SELECT COALESCE(MAX(next_offset), 1) FROM joiner_state").fetchone()[0]

    proc = subprocess.Popen(cmd, cwd=ROOT)
    try:
        # kill once it has committed some batches, well before the end
        wait_for(lambda: position() > end // 5 or proc.poll() is not None, 60, "the joiner's first commits",
                 interval_s=0.001)
        time.sleep(random.uniform(0, 0.05))  # then at a random point of a batch (it commits ~every 2-3 ms)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(10) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
    at_kill = position()
    assert 1 < at_kill < end, (at_kill, end)  # killed mid-stream, not after it finished
    # What it committed is exactly the prefix below its position: whole batches, nothing half-counted.
    prefix, unknown = _expected(imps, events[:at_kill - 1])
    assert read_outcomes(store) == prefix
    assert store.execute("SELECT unknown_events FROM joiner_state").fetchone()[0] == unknown
    assert store.execute("SELECT SUM(hit) FROM impressions").fetchone()[0] == sum(o.hit_impressions
                                                                                  for o in prefix.values())

    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, timeout=120)
    elapsed = time.perf_counter() - t0
    full, unknown = _expected(imps, events)
    assert position() == end
    assert read_outcomes(store) == full
    assert store.execute("SELECT unknown_events FROM joiner_state").fetchone()[0] == unknown
    assert sum(o.joined_events for o in full.values()) > N_EVENTS // 2  # the stream exercises every rule
    assert all(o.hit_impressions and o.late_events and o.user_mismatch_events for o in full.values()) and unknown
    args = cli.build_parser().parse_args(["attribution", "show", "--data-dir", str(tmp_path), "--json"])
    assert args.func(args) == 0  # not cli.main: its logging.basicConfig would outlive this test
    shown = json.loads(capsys.readouterr().out)
    assert shown["unknown_events"] == unknown and shown["joiner_next_offset"] == end
    assert {(r.pop("arm"), r.pop("engine_version")): Outcome(**r) for r in shown["outcomes"]} == full
    print(f"\nkill -9 at position {at_kill} of {end - 1} events; resumed and finished "
          f"{end - at_kill} events in {elapsed:.2f} s; unknown {unknown}; outcomes {full}")
    store.close()
