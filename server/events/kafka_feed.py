"""Keeps per-user recent histories current from the Kafka event topic, whoever produced the events.

Every server process reads every partition (manual assignment, no consumer group: each process
needs all users), starting `warm_events` back from the end, so a restarted server knows recent
histories at once. Events this process itself produced were applied when LogEvents accepted them;
their ids are remembered (bounded) so the feed does not apply them twice.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from typing import Callable

from contracts.kafka_events import KafkaTarget, decode_event, now_ms

log = logging.getLogger("livetower.server")


class OwnEventIds:
    """A bounded set of event ids this process accepted (oldest forgotten first)."""

    def __init__(self, capacity: int = 100_000) -> None:
        self.capacity = capacity
        self._ids: OrderedDict[str, None] = OrderedDict()

    def add(self, event_id: str) -> None:
        self._ids[event_id] = None
        if len(self._ids) > self.capacity:
            self._ids.popitem(last=False)

    def pop(self, event_id: str) -> bool:
        """True (and forget it) when the id is ours."""
        return self._ids.pop(event_id, False) is None


class KafkaHistoryFeed:
    def __init__(self, target: KafkaTarget, apply: Callable[[str, str], None], own_ids: OwnEventIds, *,
                 warm_events: int, on_record: Callable[[float, bool], None] | None = None,
                 poll_timeout_ms: int = 100, fetch_max_wait_ms: int = 20) -> None:
        """apply(user_id, item_id) updates a history; on_record(event age s, valid) feeds metrics."""
        self.target = target
        self.apply = apply
        self.own_ids = own_ids
        self.warm_events = warm_events
        self.on_record = on_record
        self.poll_timeout_ms = poll_timeout_ms
        self.fetch_max_wait_ms = fetch_max_wait_ms
        self.applied = 0
        self.invalid = 0
        self.ready = asyncio.Event()  # set once the warm-up read reached the end offsets seen at start
        self._consumer = None

    async def start(self) -> None:
        from aiokafka import AIOKafkaConsumer, TopicPartition

        # A short fetch wait: the broker may hold a fetch that long before answering even when records
        # arrive meanwhile (tansu does: 500 ms, the default, gave a 230 ms median event->history delay).
        # 20 ms costs an idle server ~4% of a core in fetch round trips (measured; 5 ms cost 10%).
        self._consumer = AIOKafkaConsumer(**self.target.client_kwargs(), group_id=None,
                                          enable_auto_commit=False, auto_offset_reset="latest",
                                          fetch_max_wait_ms=self.fetch_max_wait_ms)
        await self._consumer.start()
        await self._consumer.topics()  # fetches cluster metadata, so the topic's partitions are known
        parts = self._consumer.partitions_for_topic(self.target.topic)
        tps = [TopicPartition(self.target.topic, p) for p in sorted(parts or ())]
        if not tps:
            raise RuntimeError(f"topic {self.target.topic!r} has no partitions on {self.target.bootstrap}")
        self._consumer.assign(tps)
        ends = await self._consumer.end_offsets(tps)
        starts = await self._consumer.beginning_offsets(tps)
        per = self.warm_events // len(tps)
        for tp in tps:
            self._consumer.seek(tp, max(starts[tp], ends[tp] - per))
        self._warm_until = ends

    async def run(self, stop: asyncio.Event) -> None:
        c = self._consumer
        t0 = time.monotonic()
        while not stop.is_set():
            try:
                records = await c.getmany(timeout_ms=self.poll_timeout_ms, max_records=5000)
            except Exception as e:  # noqa: BLE001 - keep serving; the broker may come back
                log.warning("history feed read failed (%r); retrying in 1 s", e)
                await asyncio.sleep(1)
                continue
            now = now_ms()
            for recs in records.values():
                for r in recs:
                    ev, _ = decode_event(r.value, now)
                    if ev is None:
                        self.invalid += 1
                    elif not self.own_ids.pop(ev.event_id):
                        self.apply(ev.user_id, ev.item_id)
                        self.applied += 1
                    if self.on_record is not None:
                        self.on_record(max(0.0, (now - r.timestamp) / 1000), ev is not None)
            if not self.ready.is_set() and all([await c.position(tp) >= end for tp, end in self._warm_until.items()]):
                self.ready.set()
                log.info("history feed caught up with %s in %.1f s (%d events applied)", self.target.topic,
                         time.monotonic() - t0, self.applied)

    async def stop(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None
