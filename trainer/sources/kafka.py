"""The trainer's Kafka EventSource: a consumer-group member whose positions come from the checkpoint.

The trainer is synchronous; aiokafka is not. The source runs its own event loop on a background
thread and each call waits for a coroutine there.

Positions: the checkpoint's dict is the truth. When the group assigns partitions (at start, after
a rebalance, after a crash), each is sought to the checkpoint's position for it (or to its
beginning when the checkpoint has none). Offsets committed to Kafka after each checkpoint only
serve lag monitoring (`kafka-consumer-groups`), never resume. Result: at-least-once.

Malformed records are produced to the dead-letter topic with the reason before the batch that
skips them is returned, counted, and never stop the stream. A bounded set of recently read
event_ids drops re-sent duplicates (a client retrying LogEvents) within that window.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import OrderedDict
from typing import Mapping

from contracts.eventlog import EventBatch, StoredEvent
from contracts.kafka_events import KafkaTarget, decode_event, ensure_topics, now_ms

log = logging.getLogger("livetower.kafka")


class KafkaEventSource:
    def __init__(self, target: KafkaTarget, *, group_id: str = "livetower-trainer",
                 session_timeout_ms: int = 6_000, poll_timeout_ms: int = 500, dedup_window: int = 200_000,
                 call_timeout_s: float = 60.0) -> None:
        self.target = target
        self.group_id = group_id
        self.poll_timeout_ms = poll_timeout_ms
        self.call_timeout_s = call_timeout_s
        self.dead_lettered_total = 0
        self.duplicates_dropped_total = 0
        self._dedup_window = dedup_window
        self._recent_ids: OrderedDict[str, None] = OrderedDict()
        self._expected: dict = {}   # TopicPartition -> the offset the consumer will fetch next (as we sought)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="kafka-source", daemon=True)
        self._thread.start()
        self._consumer = self._producer = None
        try:
            self._call(self._start(session_timeout_ms))
        except BaseException:
            self.close()
            raise

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(self.call_timeout_s)

    async def _start(self, session_timeout_ms: int) -> None:
        from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener

        source = self

        class _OnRebalance(ConsumerRebalanceListener):
            async def on_partitions_revoked(self, revoked):
                for tp in revoked:
                    source._expected.pop(tp, None)

            async def on_partitions_assigned(self, assigned):
                for tp in assigned:  # sought lazily, to the positions of the next read_batch call
                    source._expected.pop(tp, None)
                log.info("assigned partitions %s", sorted(tp.partition for tp in assigned))

        await ensure_topics(self.target)
        self._consumer = AIOKafkaConsumer(
            **self.target.client_kwargs(), group_id=self.group_id, enable_auto_commit=False,
            auto_offset_reset="earliest", session_timeout_ms=session_timeout_ms,
            heartbeat_interval_ms=max(100, session_timeout_ms // 5))
        self._consumer.subscribe([self.target.topic], listener=_OnRebalance())
        await self._consumer.start()
        self._producer = AIOKafkaProducer(**self.target.client_kwargs(), acks="all",
                                          enable_idempotence=False)
        await self._producer.start()

    def _partitions(self):
        from aiokafka import TopicPartition

        parts = self._consumer.partitions_for_topic(self.target.topic) or range(self.target.partitions)
        return [TopicPartition(self.target.topic, p) for p in sorted(parts)]

    async def _seek_to_checkpoint(self, offsets: Mapping[str, int]) -> None:
        assignment = self._consumer.assignment()
        if not assignment:  # not joined yet: one short poll makes the consumer join the group
            await self._consumer.getmany(timeout_ms=self.poll_timeout_ms, max_records=1)
            assignment = self._consumer.assignment()
            self._expected.clear()  # whatever that poll fetched is re-read from the checkpoint
        for tp in assignment:
            want = offsets.get(self.target.position_key(tp.partition))
            if want is None:
                if tp not in self._expected:
                    await self._consumer.seek_to_beginning(tp)
                    self._expected[tp] = None
            elif self._expected.get(tp) != want:
                self._consumer.seek(tp, want)
                self._expected[tp] = want

    async def _read(self, offsets: Mapping[str, int], limit: int) -> EventBatch:
        await self._seek_to_checkpoint(offsets)
        records = await self._consumer.getmany(timeout_ms=self.poll_timeout_ms, max_records=limit)
        next_offsets = dict(offsets)
        events: list[StoredEvent] = []
        dead = 0
        now = now_ms()
        for tp, recs in records.items():
            key = self.target.position_key(tp.partition)
            for r in recs:
                next_offsets[key] = r.offset + 1
                self._expected[tp] = r.offset + 1
                ev, reason = decode_event(r.value, now)
                if ev is None:
                    dead += 1
                    await self._producer.send_and_wait(
                        self.target.dead_letter_topic, value=r.value or b"", key=r.key,
                        headers=[("reason", reason.encode()), ("source", f"{key}@{r.offset}".encode())])
                    continue
                if ev.event_id in self._recent_ids:
                    self.duplicates_dropped_total += 1
                    continue
                self._remember(ev.event_id)
                events.append(StoredEvent(r.offset, ev.event_id, ev.user_id, ev.item_id, ev.action,
                                          float(ev.weight), int(ev.timestamp_ms)))
        if dead:
            self.dead_lettered_total += dead
            log.warning("%d malformed record(s) sent to %s", dead, self.target.dead_letter_topic)
        return EventBatch(events, next_offsets, dead)

    def _remember(self, event_id: str) -> None:
        self._recent_ids[event_id] = None
        if len(self._recent_ids) > self._dedup_window:
            self._recent_ids.popitem(last=False)

    def read_batch(self, offsets: Mapping[str, int], limit: int) -> EventBatch:
        return self._call(self._read(offsets, limit))

    async def _lag(self, offsets: Mapping[str, int]) -> dict[str, int]:
        await self._seek_to_checkpoint(offsets)  # joins the group and starts fetching from our positions
        tps = self._partitions()
        ends = await self._consumer.end_offsets(tps)
        starts = await self._consumer.beginning_offsets(tps)
        # The fetch high watermark as well as ListOffsets: tansu answers ListOffsets with the last batch's
        # base offset + 1, so with batched producers only fetch responses tell the true end.
        assigned = self._consumer.assignment()
        deadline = asyncio.get_running_loop().time() + self.poll_timeout_ms / 1000
        while any(self._consumer.highwater(tp) is None for tp in assigned) and \
                asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        lag = {}
        for tp in tps:
            key = self.target.position_key(tp.partition)
            end = max(ends[tp], (self._consumer.highwater(tp) or 0) if tp in assigned else 0)
            lag[key] = max(0, end - offsets.get(key, starts[tp]))
        return lag

    def lag(self, offsets: Mapping[str, int]) -> dict[str, int]:
        return self._call(self._lag(offsets))

    async def _commit(self, offsets: Mapping[str, int]) -> None:
        assigned = {tp for tp in self._consumer.assignment()}
        todo = {tp: offsets[self.target.position_key(tp.partition)] for tp in assigned
                if self.target.position_key(tp.partition) in offsets}
        if todo:
            await self._consumer.commit(todo)

    def commit(self, offsets: Mapping[str, int]) -> None:
        """Record the checkpointed positions in the group (monitoring only; failures are logged)."""
        try:
            self._call(self._commit(offsets))
        except Exception as e:  # noqa: BLE001 - a rebalance mid-commit must not stop training
            log.warning("offset commit for monitoring failed (%r); the checkpoint still holds the truth", e)

    async def _stop(self) -> None:
        for client in (self._consumer, self._producer):
            if client is not None:
                await client.stop()

    def close(self) -> None:
        if self._loop.is_running():
            try:
                self._call(self._stop())
            finally:
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join(5)
