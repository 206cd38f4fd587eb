"""The Kafka event backend against a real Kafka-protocol broker (tansu, started on a free port)."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from contracts.client import Client
from contracts.kafka_events import (KafkaEventProducer, KafkaTarget, decode_event, ensure_topics, parse_events_url,
                                    produce_all, topic_size)
from trainer.sources.kafka import KafkaEventSource
from contracts.registry import Registry
from benchmarks.tansu import LocalBroker
from proto import livetower_v1_pb2 as pb
from tests.conftest import running_server, server_config, stream_events, wait_for
from trainer.config import TrainConfig
from trainer.loop import Trainer

NOW = int(time.time() * 1000)


def ev(i: int, user: str = "u1", item: str | None = None, **kw) -> pb.Event:
    return pb.Event(event_id=f"e{i}", user_id=user, item_id=f"i{i % 7}" if item is None else item, action="click", weight=1.0,
                    timestamp_ms=kw.pop("timestamp_ms", NOW), **kw)


@pytest.fixture(scope="module")
def broker():
    with LocalBroker() as b:
        yield b


_topics = iter(range(1_000_000))


@pytest.fixture
def target(broker) -> KafkaTarget:
    return KafkaTarget(bootstrap=broker.bootstrap, topic=f"events-{next(_topics)}", partitions=3)


def raw_produce(target: KafkaTarget, records: list[tuple[bytes, bytes | None]]) -> None:
    """Records straight onto the topic, as another service (or a broken one) would."""
    from aiokafka import AIOKafkaProducer

    async def go():
        p = AIOKafkaProducer(bootstrap_servers=target.bootstrap, enable_idempotence=False)
        await p.start()
        try:
            for key, value in records:
                await p.send_and_wait(target.topic, value=value, key=key)
        finally:
            await p.stop()
    asyncio.run(go())


def read_topic(bootstrap: str, topic: str, expect: int, timeout_s: float = 20.0) -> list:
    from aiokafka import AIOKafkaConsumer

    async def go():
        c = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest")
        await c.start()
        out = []
        try:
            deadline = time.monotonic() + timeout_s
            while len(out) < expect and time.monotonic() < deadline:
                for recs in (await c.getmany(timeout_ms=200)).values():
                    out.extend(recs)
        finally:
            await c.stop()
        return out
    return asyncio.run(go())


def test_events_url_parsing_and_errors():
    t = parse_events_url("kafka://127.0.0.1:9092/clicks?partitions=8")
    assert (t.bootstrap, t.topic, t.partitions, t.dead_letter_topic) == ("127.0.0.1:9092", "clicks", 8,
                                                                          "clicks.dead-letter")
    for bad, words in [("sqlite:///x", "expected kafka://"), ("kafka://host/clicks", "HOST:PORT"),
                       ("kafka://h:1/", "not a valid Kafka topic"), ("kafka://h:1/a b", "not a valid Kafka topic"),
                       ("kafka://h:1/t?x=1", "unknown option"), ("kafka://h:1/t?partitions=0", "partitions must be")]:
        with pytest.raises(ValueError, match=words):
            parse_events_url(bad)


def test_decode_reports_what_is_wrong():
    assert decode_event(ev(1).SerializeToString(), NOW)[0].event_id == "e1"
    assert "tombstone" in decode_event(None, NOW)[1]
    assert "not a serialized livetower.v1.Event" in decode_event(b"\xff\xff\xff", NOW)[1]
    assert decode_event(ev(2, item="").SerializeToString(), NOW)[1].startswith("item_id is empty")


def test_source_reads_everything_dead_letters_bad_records_and_resumes(target):
    asyncio.run(ensure_topics(target))
    good = [ev(i, user=f"u{i % 5}") for i in range(40)]
    raw_produce(target, [(e.user_id.encode(), e.SerializeToString()) for e in good[:20]]
                + [(b"u1", b"\x08garbage"), (b"u2", ev(99, item="").SerializeToString()), (b"u3", None)]
                + [(e.user_id.encode(), e.SerializeToString()) for e in good[20:]]
                + [(b"u0", good[0].SerializeToString())])  # a re-sent duplicate
    src = KafkaEventSource(target, session_timeout_ms=6000, poll_timeout_ms=300)
    try:
        offsets, seen, dead = {}, [], 0
        deadline = time.monotonic() + 30
        while sum(src.lag(offsets).values()) and time.monotonic() < deadline:
            batch = src.read_batch(offsets, 7)
            assert len(batch.events) <= 7
            offsets, seen, dead = batch.next_offsets, seen + batch.events, dead + batch.dead_lettered
        assert sorted(e.event_id for e in seen) == sorted(e.event_id for e in good)  # duplicate dropped
        assert dead == 3 and src.duplicates_dropped_total == 1
        assert sum(offsets.values()) == 44 and set(offsets) <= {f"kafka:{target.topic}:{p}" for p in range(3)}
        per_user = {}
        for e in seen:  # key = user_id: one user's events keep their order
            per_user.setdefault(e.user_id, []).append(int(e.event_id[1:]))
        assert all(v == sorted(v) for v in per_user.values())
        src.commit(offsets)
    finally:
        src.close()
    letters = read_topic(target.bootstrap, target.dead_letter_topic, 3)
    reasons = sorted(dict(r.headers)["reason"].decode().split(" ")[0] for r in letters)
    assert reasons == ["item_id", "record", "value"]

    # A restarted consumer resumes from the checkpoint's positions, not from the group's commits.
    half = {k: v - 2 for k, v in offsets.items()}
    src = KafkaEventSource(target, session_timeout_ms=6000, poll_timeout_ms=300)
    try:
        assert sum(src.lag(half).values()) == 2 * len(half)
        again, dead = [], 0
        while sum(src.lag(half).values()):
            b = src.read_batch(half, 100)
            half, again, dead = b.next_offsets, again + b.events, dead + b.dead_lettered
        assert len(again) + dead == 2 * len(offsets) and half == offsets
    finally:
        src.close()


def test_trainer_trains_every_kafka_event_and_resumes(target, tmp_path):
    events = stream_events(seed=11, n_users=30, events_per_user=6)
    asyncio.run(produce_all(target, events))
    cfg = TrainConfig.tiny_debug(max_round_events=100)
    ledger = tmp_path / "ledger.tsv"

    def trainer() -> Trainer:
        return Trainer(cfg, KafkaEventSource(target, session_timeout_ms=6000, poll_timeout_ms=300),
                       Registry(tmp_path / "registry"), tmp_path / "trainer", ledger_path=ledger)

    t = trainer()
    try:
        assert t.backlog() == len(events)
        assert t.run_round().events <= 100
    finally:
        t.event_log.close()
    t = trainer()  # a restart: resumes at the checkpoint's positions
    try:
        while t.backlog():
            t.run_round()
        assert t.state.trained_events == len(events)
        assert t.metrics.lag.labels(f"kafka:{target.topic}:0")._value.get() == 0
    finally:
        t.event_log.close()
    trained = [line.split("\t")[2] for line in ledger.read_text().splitlines()]
    assert sorted(trained) == sorted(e.event_id for e in events)


def test_server_produces_to_kafka_and_follows_other_producers(trained_dir, target):
    cfg = server_config(trained_dir, events_url=f"kafka://{target.bootstrap}/{target.topic}?partitions=3")
    with running_server(cfg) as (server, port):
        client = Client(f"127.0.0.1:{port}")
        resp = client.log_events([ev(1, user="alice", item="i1"), ev(2, user="alice", item="")])
        assert resp.accepted == 1 and resp.rejected[0].reason.startswith("item_id")
        assert server.history.get("alice") == ["i1"]
        # The accepted event is on the topic, the rejected one on the dead-letter topic.
        assert [pb.Event.FromString(r.value).event_id for r in read_topic(target.bootstrap, target.topic, 1)] == ["e1"]
        assert len(read_topic(target.bootstrap, target.dead_letter_topic, 1)) == 1
        # Another service produces for alice: the feed applies it; our own event is not applied twice.
        raw_produce(target, [(b"alice", ev(3, user="alice", item="i2").SerializeToString())])
        wait_for(lambda: server.history.get("alice") == ["i1", "i2"], 5, "the feed to apply alice's event")
        time.sleep(0.3)
        assert server.history.get("alice") == ["i1", "i2"]
        assert asyncio.run(topic_size(target)) == 2


def test_server_restart_warms_histories_from_the_topic(trained_dir, target):
    raw_produce(target, [(b"bob", ev(i, user="bob", item=f"i{i}").SerializeToString()) for i in range(5)])
    cfg = server_config(trained_dir, events_url=f"kafka://{target.bootstrap}/{target.topic}")
    with running_server(cfg) as (server, _):
        wait_for(lambda: server.history.get("bob") == [f"i{i}" for i in range(5)], 10, "bob's warmed history")


def test_backpressure_answers_resource_exhausted(trained_dir, target):
    cfg = server_config(trained_dir, events_url=f"kafka://{target.bootstrap}/{target.topic}", max_inflight_events=1)
    with running_server(cfg) as (server, port):
        producer: KafkaEventProducer = server.sink
        producer._inflight = 1  # as if one event still awaited the broker's acknowledgement
        with pytest.raises(grpc.RpcError) as e:
            Client(f"127.0.0.1:{port}").log_events([ev(7, user="carol")])
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "retry" in e.value.details()
        assert server.history.get("carol") == []
        producer._inflight = 0


def test_unreachable_broker_is_a_clear_error(tmp_path):
    from benchmarks.tansu import free_port

    with pytest.raises(ConnectionError, match="cannot reach the Kafka broker"):
        KafkaEventSource(KafkaTarget(bootstrap=f"127.0.0.1:{free_port()}", topic="t"), call_timeout_s=30)


def test_attribution_joiner_reads_the_topic_exactly_once(trained_dir, target):
    """With --events kafka://, the joiner follows the topic: events naming impressions are counted per arm and
    version, a malformed record is stepped over, and a restarted joiner resumes from its committed per-partition
    positions without counting anything twice."""
    from contracts.attribution import ATTRIBUTION_FILE, JoinConfig, Joiner, read_outcomes
    from contracts.attribution_sources import KafkaJoinSource

    cfg = server_config(trained_dir, events_url=f"kafka://{target.bootstrap}/{target.topic}?partitions=3")
    with running_server(cfg) as (server, port):
        client = Client(f"127.0.0.1:{port}")
        wait_for(lambda: server.manager.stable is not None, 30, "engine 1")
        shown = [client.recommend(f"user-{u}", k=5, history=["item-1", "item-2"]) for u in range(12)]
        now = int(time.time() * 1000)
        hits = [pb.Event(event_id=f"h{u}", user_id=f"user-{u}", item_id=r.item_ids[0], action="click", weight=1.0,
                         timestamp_ms=now, impression_id=r.impression_id) for u, r in enumerate(shown)]
        misses = [pb.Event(event_id=f"m{u}", user_id=f"user-{u}", item_id="item-299", action="click", weight=1.0,
                           timestamp_ms=now, impression_id=r.impression_id)
                  for u, r in enumerate(shown) if "item-299" not in r.item_ids]
        assert client.log_events(hits[:6] + misses).accepted == 6 + len(misses)
        raw_produce(target, [(b"user-0", b"\xff not an event")])
        version = shown[0].engine_version

        def joined_all(joiner: Joiner, want: int) -> bool:
            joiner.step()
            return read_outcomes(trained_dir / ATTRIBUTION_FILE).get(("stable", version), (0,) * 6)[3] == want

        source = KafkaJoinSource(target)
        joiner = Joiner(trained_dir, JoinConfig(grace_s=5.0), source=source)
        wait_for(lambda: joined_all(joiner, 6 + len(misses)), 20, "the first events joined", interval_s=0.2)
        first = joiner.positions()
        joiner.close()
        source.close()
        assert sum(v for k, v in first.items() if k.startswith("kafka:")) == 6 + len(misses) + 1  # + the bad record
        assert client.log_events(hits[6:]).accepted == 6
        client.close()
    source = KafkaJoinSource(target)
    joiner = Joiner(trained_dir, JoinConfig(grace_s=5.0), source=source)  # restarted: resumes, counts nothing twice
    wait_for(lambda: joined_all(joiner, 12 + len(misses)), 20, "the rest joined", interval_s=0.2)
    for _ in range(3):
        joiner.step()
    out = read_outcomes(trained_dir / ATTRIBUTION_FILE)[("stable", version)]
    assert (out.impressions, out.hit_impressions, out.hit_events, out.joined_events) == (12, 12, 12, 12 + len(misses))
    joiner.close()
    source.close()
