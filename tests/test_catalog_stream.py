"""The catalogue on the event stream (contracts/catalog_stream.py), against a real Kafka-protocol broker (tansu): every
follower's store goes through the same changes in the same order, resumes from its stored offset, and refuses what
would make it diverge; servers with --catalog-stream (what --fleet uses) share UpsertItems / DeleteItems."""

from __future__ import annotations

import asyncio
import json
import re
import time
from types import SimpleNamespace

import pytest

from benchmarks.tansu import LocalBroker
from contracts.catalog import CatalogOp, CatalogRecord, CatalogStore
from contracts.catalog_stream import (CatalogFollowThread, CatalogProducer, catalog_topic, decode_op, encode_op,
                                      store_follower)
from contracts.kafka_events import KafkaTarget
from contracts.registry import Registry
from contracts.rollout import CanaryPolicy, RolloutState
from livetower.cli import _follow_catalog_stream
from livetower.cli_catalog import catalog_main
from proto import livetower_v1_pb2 as pb
from tests.conftest import ADMIN_TOKEN, client_for, running_server, server_config, wait_for
from tests.test_live_items import publish_feature_engine, record

_topics = iter(range(1_000_000))


@pytest.fixture(scope="module")
def broker():
    with LocalBroker() as b:
        yield b


@pytest.fixture
def target(broker) -> KafkaTarget:
    return KafkaTarget(bootstrap=broker.bootstrap, topic=f"events-{next(_topics)}", partitions=1)


def raw_produce(target: KafkaTarget, value: bytes) -> None:
    from aiokafka import AIOKafkaProducer

    async def go():
        p = AIOKafkaProducer(bootstrap_servers=target.bootstrap, enable_idempotence=False)
        await p.start()
        try:
            await p.send_and_wait(catalog_topic(target), value=value, key=b"item/x", partition=0)
        finally:
            await p.stop()
    asyncio.run(go())


def follow(target: KafkaTarget, store: CatalogStore) -> int:
    """One follower's catch-up -> changes applied (as a restarted reader does)."""
    async def go():
        f = store_follower(target, store)
        await f.start()
        try:
            return await f.catch_up(), f.malformed
        finally:
            await f.stop()
    return asyncio.run(go())


def test_the_codec_round_trips_and_names_what_is_wrong():
    r = record(3)
    for op in (CatalogOp("item", r.id, r), CatalogOp("user", "u7", None)):
        key, value = encode_op(op)
        assert decode_op(value) == op and key == f"{op.kind}/{op.id}".encode()
    for bad, why in ((None, "tombstone"), (b"{nope", "not JSON"), (b'{"op": "merge"}', '"op": "upsert" or "delete"'),
                     (b'{"op": "delete", "id": ""}', "CatalogRecord.id"),
                     (json.dumps({"op": "upsert", "record": {"id": "a", "numeric": {"x": "1"}}}).encode(),
                      "numeric['x']: must be a number")):
        with pytest.raises(ValueError, match=re.escape(why)):
            decode_op(bad)


def test_followers_converge_resume_and_refuse_to_diverge(target, tmp_path):
    changes = [CatalogOp("item", "a", CatalogRecord(id="a", text={"t": "1"})),
               CatalogOp("item", "b", CatalogRecord(id="b", numeric={"y": 2.0})),
               CatalogOp("item", "a", CatalogRecord(id="a", text={"t": "2"})),     # updated
               CatalogOp("item", "b", CatalogRecord(id="b", numeric={"y": 2.0})),  # unchanged: no version
               CatalogOp("item", "a", None),                                        # deleted
               CatalogOp("item", "ghost", None),                                    # never had: a tombstone
               CatalogOp("user", "u1", CatalogRecord(id="u1", kind="user", numeric={"age": 30.0}))]

    async def write(ops):
        p = CatalogProducer(target)
        await p.start()
        try:
            return await p.publish(ops)
        finally:
            await p.stop()

    assert asyncio.run(write(changes[:4])) == [0, 1, 2, 3]
    raw_produce(target, b"not a change")  # offset 4: skipped, counted, never stops a follower
    assert asyncio.run(write(changes[4:])) == [5, 6, 7]
    one, two = CatalogStore(tmp_path / "one.sqlite"), CatalogStore(tmp_path / "two.sqlite")
    assert follow(target, one) == (7, 1)
    assert follow(target, two) == (7, 1)
    assert one.changes_since(0) == two.changes_since(0)  # same records at the same versions
    assert [(c.version, c.id, c.record is None) for c in one.changes_since(0)] == \
        [(2, "b", False), (4, "a", True), (5, "ghost", True), (6, "u1", False)]
    assert one.stream_offset() == 8 and one.count("item") == 1

    assert follow(target, one) == (0, 0)  # a restart resumes after what it applied
    asyncio.run(write([CatalogOp("item", "c", CatalogRecord(id="c"))]))
    assert follow(target, one) == (1, 0) and one.get("c") == CatalogRecord(id="c")

    with pytest.raises(ValueError, match="follows the catalogue stream"):
        one.upsert([CatalogRecord(id="local")])  # a local write would make this replica diverge
    with pytest.raises(ValueError, match="follows the catalogue stream"):
        one.delete(["b"])
    local = CatalogStore(tmp_path / "local.sqlite")
    local.upsert([CatalogRecord(id="x")])
    with pytest.raises(ValueError, match="were not read from the stream"):
        store_follower(target, local)
    recreated = KafkaTarget(bootstrap=target.bootstrap, topic=target.topic + "-new", partitions=1)
    with pytest.raises(RuntimeError, match="the topic was recreated"):
        follow(recreated, one)  # offset 9 applied, the new topic is empty


def test_the_cli_and_a_trainer_thread_follow_the_same_topic(target, tmp_path):
    url = f"kafka://{target.bootstrap}/{target.topic}"
    jsonl = tmp_path / "items.jsonl"
    jsonl.write_text("".join(json.dumps(record(i).to_dict()) + "\n" for i in range(5)))
    thread = _follow_catalog_stream(SimpleNamespace(events=url, data_dir=tmp_path / "trainer"))  # train's wiring
    store = CatalogStore(tmp_path / "trainer" / "catalog.sqlite")  # what the trainer reads: another connection
    try:
        assert catalog_main(["load", str(jsonl), "--events", url]) == 0
        assert catalog_main(["delete", "item-0", "--events", url]) == 0
        wait_for(lambda: store.stream_offset() == 6, 10, "the trainer's store to follow the CLI's writes")
        assert store.count("item") == 4 and store.get("item-0") is None and store.get("item-4") == record(4)
    finally:
        thread.stop()
    assert not thread._thread.is_alive()
    again = CatalogFollowThread(target, CatalogStore(tmp_path / "trainer" / "catalog.sqlite"))
    again.start()  # a restarted trainer: caught up from its stored offset, nothing applied twice
    assert again.follower.next_offset == 6 and again.follower.applied == 0
    again.stop()
    assert catalog_main(["load", str(jsonl), "--events", "kafka://127.0.0.1:1/x"]) == 2  # no broker: an error
    with pytest.raises(SystemExit, match="--catalog-stream follows <events topic>.catalog: pass --events"):
        _follow_catalog_stream(SimpleNamespace(events=None, data_dir=tmp_path))


def test_two_servers_share_upserts_and_deletes_through_the_stream(target, tmp_path):
    """What a fleet's replicas do: an upsert on one is served by the next Recommend there and, within the follow
    delay, by the other; a delete on the other reaches the first; a restarted replica serves the same catalogue."""
    reg = Registry(tmp_path / "registry")
    v = publish_feature_engine(reg)
    reg.write_rollout(RolloutState(stable=v, policy=CanaryPolicy(mode="manual")))
    url = f"kafka://{target.bootstrap}/{target.topic}"
    md = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
    history = ["item-1", "item-5"]
    item = pb.CatalogItem(id="new-film", categorical={"genre": pb.CatalogValues(values=["Horror"])},
                          numeric={"year": 2001.0}, text={"title": "a new film"})

    def config(name: str):
        return server_config(tmp_path / name, registry=str(tmp_path / "registry"), events_url=url,
                             catalog_stream=True)

    # One server after the other: torch.export.load is not thread-safe (a process-wide deserializer), and here
    # both servers share the test's process.
    with running_server(config("a")) as (sa, pa):
        wait_for(lambda: sa.manager.stable is not None, 30, "the feature engine")
        with running_server(config("b")) as (sb, pb_):
            wait_for(lambda: sb.manager.stable is not None, 30, "the feature engine")
            both_replicas(sa, pa, sb, pb_, v, md, history, item)
    with running_server(config("b")) as (sb, pb_):  # restarted: caught up from its own store and the topic
        b = client_for(sb, pb_)
        wait_for(lambda: sb.manager.stable is not None, 30, "the feature engine")
        ids = b.recommend("u1", 60, history=history).item_ids
        assert "new-film" not in ids and "item-2" not in ids and "item-3" in ids
        assert sb.manager.catalog.store.version() == 3
        b.close()


def both_replicas(sa, pa, sb, pb_, v, md, history, item) -> None:
    """An upsert on one, served by its next Recommend and by the other within the follow delay; a delete on
    the other reaches the first."""
    a, b = client_for(sa, pa), client_for(sb, pb_)
    assert "new-film" not in b.recommend("u1", 60, history=history).item_ids
    r = a.admin.UpsertItems(pb.UpsertItemsRequest(items=[item]), metadata=md)
    assert (r.inserted, r.catalog_version, list(r.serving_engines)) == (1, 1, [v])
    assert "new-film" in a.recommend("u1", 60, history=history).item_ids  # the next request on the writer
    t0 = time.monotonic()
    wait_for(lambda: "new-film" in b.recommend("u1", 60, history=history).item_ids, 5, "the other replica")
    assert time.monotonic() - t0 < 2.0
    again = a.admin.UpsertItems(pb.UpsertItemsRequest(items=[item]), metadata=md)
    assert (again.inserted, again.unchanged, again.catalog_version) == (0, 1, 1)
    r = b.admin.DeleteItems(pb.DeleteItemsRequest(item_ids=["new-film", "item-2"]), metadata=md)
    assert (r.deleted, r.catalog_version) == (1, 3)  # item-2 is a build-time item: a tombstone
    wait_for(lambda: not {"new-film", "item-2"} & set(a.recommend("u1", 60, history=history).item_ids), 5,
             "the delete on the first replica")
    a.close()
    b.close()


def test_a_broker_that_does_not_acknowledge_is_unavailable_not_a_timeout_of_applying(tmp_path):
    """Unit: the writer tells "not acknowledged" (ConnectionError -> UNAVAILABLE, retry) from "acknowledged but
    not applied here yet" (TimeoutError -> DEADLINE_EXCEEDED, durable)."""
    from server.engine.catalog_sync import CatalogSync, StreamCatalogWriter

    target = KafkaTarget(bootstrap="127.0.0.1:1", topic="events", partitions=1)
    writer = StreamCatalogWriter(target, CatalogSync(CatalogStore(tmp_path / "c.sqlite")), list, apply_timeout_s=0.05)

    async def no_ack(ops):
        raise TimeoutError()

    async def acked(ops):
        return [7]

    async def never(offsets, timeout_s):
        raise TimeoutError()

    writer.producer.publish = no_ack
    with pytest.raises(ConnectionError, match="did not acknowledge the 1 change"):
        asyncio.run(writer.upsert([CatalogRecord(id="a")]))
    writer.producer.publish, writer.follower.wait_applied = acked, never
    with pytest.raises(TimeoutError, match="acknowledged the 1 change.*durable, offsets up to 7"):
        asyncio.run(writer.delete(["a"]))
