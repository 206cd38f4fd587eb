"""The catalogue on the event stream: one Kafka topic, `<events topic>.catalog`, that every replica and the trainer
follow into their own `catalog.sqlite` (fleet mode, `serve --catalog-stream`, `train --catalog-stream`).

Why the stream and not the registry: every replica and the trainer follow the broker already, a change is
durable once the broker acknowledged it (acks=all), and a topic of **one partition** gives every reader the same
order. Each reader applies the same changes in the same order to its local store (contracts/catalog.py), so
every replica holds the same records at the same catalogue versions, and a reader that restarts continues from
the offset stored with its last applied change (one SQLite transaction holds both).

Records: key "<kind>/<id>", value JSON `{"op": "upsert", "record": CatalogRecord.to_dict()}` or `{"op":
"delete", "kind": ..., "id": ...}`. A delete is a record, not a Kafka tombstone (null value), so the topic can be
compacted (created with cleanup.policy=compact where the broker takes it: one record per id, kept forever) while
a deletion of an item some engine holds from its build still reaches a replica that joins later. A malformed
record is skipped with a warning and counted; it never stops the follower.

Writers (`CatalogProducer`) send and wait for the broker's acknowledgement; a server then waits until its own
follower has applied the offsets it wrote (read your writes: the next Recommend on that replica sees them).
grpc-free; aiokafka is imported only when a client starts.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections import OrderedDict
from typing import Callable, Sequence

from contracts.catalog import CatalogOp, CatalogRecord, CatalogStore
from contracts.kafka_events import KafkaTarget, start_admin

log = logging.getLogger("livetower.catalog")
CATALOG_SUFFIX = ".catalog"


def catalog_topic(target: KafkaTarget) -> str:
    return target.topic + CATALOG_SUFFIX


def encode_op(op: CatalogOp) -> tuple[bytes, bytes]:
    """(key, value) of the Kafka record for one change."""
    if op.record is None:
        value = {"op": "delete", "kind": op.kind, "id": op.id}
    else:
        value = {"op": "upsert", "record": op.record.to_dict()}
    return f"{op.kind}/{op.id}".encode(), json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


def decode_op(value: bytes | None) -> CatalogOp:
    """The change in a record's value; ValueError says what is wrong with it."""
    if value is None:
        raise ValueError("record has no value (a Kafka tombstone); deletes are {\"op\": \"delete\", ...} records")
    try:
        d = json.loads(value)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"value is not JSON ({e})") from None
    if not isinstance(d, dict) or d.get("op") not in ("upsert", "delete"):
        raise ValueError('value must be an object with "op": "upsert" or "delete"')
    if d["op"] == "upsert":
        r = CatalogRecord.from_dict(d.get("record"))
        return CatalogOp(r.kind, r.id, r)
    r = CatalogRecord.from_dict({"id": d.get("id"), "kind": d.get("kind", "item")})  # the id and kind rules
    return CatalogOp(r.kind, r.id, None)


async def ensure_catalog_topic(target: KafkaTarget, *, timeout_s: float = 30.0) -> str:
    """Create the catalogue topic (one partition, compacted where the broker allows) if it does not exist."""
    from aiokafka.admin import NewTopic
    from aiokafka.errors import TopicAlreadyExistsError

    name = catalog_topic(target)
    admin = await start_admin(target, timeout_s)
    try:
        if name in set(await admin.list_topics()):
            return name
        for configs in ({"cleanup.policy": "compact"}, {}):
            try:
                await admin.create_topics([NewTopic(name, 1, 1, topic_configs=configs)])
                if not configs:
                    log.warning("created %s without cleanup.policy=compact (the broker refused it): set it on the "
                                "topic, or its retention must keep every record", name)
                return name
            except TopicAlreadyExistsError:
                return name  # another process created it meanwhile
            except Exception as e:  # noqa: BLE001 - a broker that refuses the config: try without
                if not configs:
                    raise
                log.info("creating %s with cleanup.policy=compact failed (%r); creating it without", name, e)
        return name
    finally:
        await admin.close()


class CatalogProducer:
    """Writes catalogue changes to the stream; `publish` returns once the broker acknowledged all of them."""

    def __init__(self, target: KafkaTarget, *, ack_timeout_s: float = 10.0) -> None:
        self.target = target
        self.topic = catalog_topic(target)
        self.ack_timeout_s = ack_timeout_s
        self._producer = None

    async def start(self) -> None:
        from aiokafka import AIOKafkaProducer

        await ensure_catalog_topic(self.target)
        self._producer = AIOKafkaProducer(**self.target.client_kwargs(), acks="all", linger_ms=1,
                                          enable_idempotence=False, max_request_size=4 << 20,
                                          request_timeout_ms=int(self.ack_timeout_s * 1000))
        await self._producer.start()

    async def publish(self, ops: Sequence[CatalogOp]) -> list[int]:
        """Send the changes in order -> their offsets. A retry after a failure may write some twice: harmless,
        a change applied again leaves the record as it was (unchanged)."""
        if self._producer is None:
            raise RuntimeError("CatalogProducer.start() was not awaited")
        futures = []
        for op in ops:
            key, value = encode_op(op)
            futures.append(await self._producer.send(self.topic, key=key, value=value, partition=0))
        metas = await asyncio.wait_for(asyncio.gather(*futures), self.ack_timeout_s)
        return [m.offset for m in metas]

    async def stop(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None


class CatalogFollower:
    """Reads the catalogue stream from `start_offset` and hands each batch of changes to `apply(ops, next_offset)`
    (sync, run on a worker thread; it must store `next_offset` with the changes, as CatalogStore.apply_ops does)
    -> each op's outcome. Writers in this process wait for their offsets with `wait_applied`."""

    def __init__(self, target: KafkaTarget, apply: Callable[[list[CatalogOp], int], list[str]], start_offset: int,
                 *, poll_timeout_ms: int = 100, fetch_max_wait_ms: int = 20, keep_outcomes: int = 100_000) -> None:
        self.target = target
        self.topic = catalog_topic(target)
        self.apply = apply
        self.next_offset = start_offset          # the first offset not yet applied
        self.poll_timeout_ms = poll_timeout_ms
        self.fetch_max_wait_ms = fetch_max_wait_ms  # a short fetch wait: see server/events/kafka_feed.py
        self.keep_outcomes = keep_outcomes
        self.applied = 0                         # changes applied by this follower
        self.malformed = 0                       # records skipped
        self._outcomes: OrderedDict[int, str] = OrderedDict()  # offset -> outcome, the latest keep_outcomes
        self._advanced: asyncio.Condition | None = None
        self._consumer = None
        self._tp = None

    async def start(self) -> None:
        """Connect and position at next_offset; refuses a stream that no longer holds what this store applied."""
        from aiokafka import AIOKafkaConsumer, TopicPartition

        await ensure_catalog_topic(self.target)
        self._advanced = asyncio.Condition()
        self._consumer = AIOKafkaConsumer(**self.target.client_kwargs(), group_id=None, enable_auto_commit=False,
                                          fetch_max_wait_ms=self.fetch_max_wait_ms)
        await self._consumer.start()
        self._tp = TopicPartition(self.topic, 0)
        self._consumer.assign([self._tp])
        first = (await self._consumer.beginning_offsets([self._tp]))[self._tp]
        end = await self._end()
        if self.next_offset > end and not await self._holds(self.next_offset - 1):
            await self.stop()
            raise RuntimeError(f"catalogue topic {self.topic} ends at offset {end} but this store applied up to "
                               f"{self.next_offset}: the topic was recreated. Move the local catalog.sqlite away so "
                               "it is rebuilt from the topic, and load the catalogue into the topic again if it lost it")
        if self.next_offset < first:
            log.warning("catalogue topic %s starts at offset %d, after %d: records were deleted by retention (the "
                        "topic needs cleanup.policy=compact); continuing from %d", self.topic, first,
                        self.next_offset, first)
            self.next_offset = first
        self._consumer.seek(self._tp, self.next_offset)

    async def _holds(self, offset: int) -> bool:
        """Whether the topic has a record at `offset`. Asked when the end offset looks short of what was applied:
        tansu (the test broker) reports the start of the last batch + 1 as the end, so only a read can tell."""
        self._consumer.seek(self._tp, offset)
        records = (await self._consumer.getmany(self._tp, timeout_ms=1000, max_records=1)).get(self._tp, [])
        return any(r.offset == offset for r in records)

    async def _end(self) -> int:
        return (await self._consumer.end_offsets([self._tp]))[self._tp]

    async def catch_up(self, *, progress: Callable[[str], None] | None = None) -> int:
        """Apply everything written before this call -> changes applied by it."""
        end, before, t0, shown = await self._end(), self.applied, time.monotonic(), time.monotonic()
        while self.next_offset < end:
            await self._step()
            if progress is not None and time.monotonic() - shown > 5:
                shown = time.monotonic()
                progress(f"catalogue: offset {self.next_offset} of {end}")
        if self.applied > before:
            log.info("catalogue caught up with %s: %d changes to offset %d in %.1f s", self.topic,
                     self.applied - before, end, time.monotonic() - t0)
        return self.applied - before

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self._step()
            except Exception as e:  # noqa: BLE001 - keep following; the broker may come back
                log.warning("catalogue stream read failed (%r); retrying in 1 s", e)
                await asyncio.sleep(1)

    async def _step(self) -> None:
        batches = await self._consumer.getmany(self._tp, timeout_ms=self.poll_timeout_ms, max_records=5000)
        records = batches.get(self._tp, [])
        if not records:
            return
        offsets, ops = [], []
        for r in records:
            try:
                ops.append(decode_op(r.value))
                offsets.append(r.offset)
            except ValueError as e:
                self.malformed += 1
                self._remember(r.offset, "malformed")
                log.warning("catalogue topic %s offset %d skipped: %s", self.topic, r.offset, e)
        nxt = records[-1].offset + 1
        outcomes = await asyncio.to_thread(self.apply, ops, nxt)
        for offset, outcome in zip(offsets, outcomes):
            self._remember(offset, outcome)
        self.applied += len(ops)
        async with self._advanced:
            self.next_offset = nxt
            self._advanced.notify_all()

    def _remember(self, offset: int, outcome: str) -> None:
        self._outcomes[offset] = outcome
        while len(self._outcomes) > self.keep_outcomes:
            self._outcomes.popitem(last=False)

    async def wait_applied(self, offsets: Sequence[int], timeout_s: float) -> list[str]:
        """Wait until every offset is applied -> their outcomes ("unknown" for one no longer remembered).
        TimeoutError when the follower has not got there within timeout_s."""
        last = max(offsets, default=-1)
        async with self._advanced:
            await asyncio.wait_for(self._advanced.wait_for(lambda: self.next_offset > last), timeout_s)
        return [self._outcomes.get(o, "unknown") for o in offsets]

    async def stop(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None


def stream_start(target: KafkaTarget, store: CatalogStore) -> int:
    """The offset `store` follows the stream from; ValueError when it holds changes not read from the stream."""
    start = store.stream_offset()
    if start is None and store.version() > 0:
        raise ValueError(f"{store.path} holds catalogue changes that were not read from the stream: it cannot "
                         f"follow {catalog_topic(target)}. Load that catalogue into the stream (livetower catalog "
                         "load FILE --events kafka://...) and move the file away")
    return start or 0


def store_follower(target: KafkaTarget, store: CatalogStore, **kw) -> CatalogFollower:
    """A follower that applies to `store` (which must be empty or fed from this stream already)."""
    start = stream_start(target, store)

    def apply(ops: list[CatalogOp], next_offset: int) -> list[str]:
        return store.apply_ops(ops, stream_offset=next_offset)[0]

    return CatalogFollower(target, apply, start, **kw)


class CatalogFollowThread:
    """A follower on its own thread and event loop, for a synchronous process (the trainer). `start` returns once
    the store has caught up with the stream as it was then; the thread then follows until `stop`."""

    def __init__(self, target: KafkaTarget, store: CatalogStore) -> None:
        self.follower = store_follower(target, store)
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="catalog-follower", daemon=True)

    def start(self, timeout_s: float = 600.0) -> None:
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise TimeoutError(f"the catalogue stream did not catch up within {timeout_s:.0f} s")
        if self._error is not None:
            raise self._error

    def _main(self) -> None:
        async def main() -> None:
            self._stop = asyncio.Event()
            try:
                await self.follower.start()
                await self.follower.catch_up(progress=log.info)
            except BaseException as e:  # noqa: BLE001 - handed to start()'s caller
                self._error = e
                self._ready.set()
                return
            self._ready.set()
            try:
                await self.follower.run(self._stop)
            finally:
                await self.follower.stop()

        self._loop.run_until_complete(main())

    def stop(self) -> None:
        if self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


async def publish_records(target: KafkaTarget, ops: Sequence[CatalogOp], *, chunk: int = 5000,
                          progress: Callable[[int], None] | None = None) -> int:
    """Write changes to the stream chunk by chunk (each acknowledged before the next); progress(sent so far)."""
    producer = CatalogProducer(target)
    await producer.start()
    sent = 0
    try:
        for s in range(0, len(ops), chunk):
            sent += len(await producer.publish(ops[s:s + chunk]))
            if progress is not None:
                progress(sent)
    finally:
        await producer.stop()
    return sent
