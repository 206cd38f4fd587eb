"""Where the attribution joiner reads events from: the SQLite event log, or the Kafka topic (`--events kafka://`).

A source reads from positions the joiner owns (committed in the attribution store, in the same transaction as the
counts: contracts/attribution.py), so both give exactly-once counting; `commit` only tells the source how far the
joiner is (the SQLite log's retention keeps what it has not joined; Kafka ignores it: retention there is by time).
Each event comes with its position key, its offset and the time it was received (the SQLite log's received_ms; a
Kafka record's timestamp, which the server's producer sets when it sends), on which the joiner's grace for
impressions the server has not flushed yet is measured.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Mapping, NamedTuple, Protocol

from contracts.eventlog import SOURCE_KEY, SqliteEventLog, StoredEvent
from contracts.kafka_events import KafkaTarget, decode_event, ensure_topics, now_ms


class ReceivedEvent(NamedTuple):
    key: str                    # position key: SOURCE_KEY, or "kafka:<topic>:<partition>"
    offset: int                 # within the key; the next position after it is offset + 1
    event: StoredEvent | None   # None: a malformed record (skipped, but the position moves past it)
    received_ms: int


class JoinSource(Protocol):
    def read(self, positions: Mapping[str, int], limit: int) -> list[ReceivedEvent]: ...  # each key in offset order
    def commit(self, positions: Mapping[str, int]) -> None: ...
    def close(self) -> None: ...


class LogJoinSource:
    """The SQLite event log (one position key)."""

    def __init__(self, data_dir: Path, event_log: SqliteEventLog | None = None) -> None:
        self._own = event_log is None
        # consumer="attribution": its committed offset keeps retention from deleting events not yet joined
        self.log = event_log or SqliteEventLog(Path(data_dir) / "events.sqlite", consumer="attribution")

    def read(self, positions: Mapping[str, int], limit: int) -> list[ReceivedEvent]:
        return [ReceivedEvent(SOURCE_KEY, ev.offset, ev, received_ms)
                for ev, received_ms in self.log.read_received(positions.get(SOURCE_KEY, 1), limit)]

    def commit(self, positions: Mapping[str, int]) -> None:
        if self.log.consumer == "attribution":  # never another consumer's row (a log handed in may be the trainer's)
            self.log.commit(positions)

    def close(self) -> None:
        if self._own:
            self.log.close()


class KafkaJoinSource:
    """Every partition of the event topic, assigned by hand (no consumer group: one joiner per attribution
    store, and its positions live there); sought to the joiner's positions before each read."""

    def __init__(self, target: KafkaTarget, *, poll_timeout_ms: int = 200, call_timeout_s: float = 60.0) -> None:
        self.target, self.poll_timeout_ms, self.call_timeout_s = target, poll_timeout_ms, call_timeout_s
        self._expected: dict = {}  # TopicPartition -> the offset the consumer fetches next (as sought or read)
        self._consumer = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="attribution-kafka", daemon=True)
        self._thread.start()
        try:
            self._call(self._start())
        except BaseException:
            self.close()
            raise

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(self.call_timeout_s)

    async def _start(self) -> None:
        from aiokafka import AIOKafkaConsumer, TopicPartition

        await ensure_topics(self.target)
        self._consumer = AIOKafkaConsumer(**self.target.client_kwargs(), group_id=None, enable_auto_commit=False,
                                          auto_offset_reset="earliest")
        await self._consumer.start()
        parts = self._consumer.partitions_for_topic(self.target.topic) or range(self.target.partitions)
        self._partitions = [TopicPartition(self.target.topic, p) for p in sorted(parts)]
        self._consumer.assign(self._partitions)

    async def _read(self, positions: Mapping[str, int], limit: int) -> list[ReceivedEvent]:
        for tp in self._partitions:
            want = positions.get(self.target.position_key(tp.partition))
            if want is None:  # nothing committed on it yet: from the start (again, if a blocked read went past it)
                if self._expected.get(tp, -1) is not None:
                    await self._consumer.seek_to_beginning(tp)
                    self._expected[tp] = None
            elif self._expected.get(tp) != want:
                self._consumer.seek(tp, want)
                self._expected[tp] = want
        batches = await self._consumer.getmany(timeout_ms=self.poll_timeout_ms, max_records=limit)
        out, now = [], now_ms()
        for tp, records in batches.items():
            key = self.target.position_key(tp.partition)
            for r in records:
                self._expected[tp] = r.offset + 1
                ev, _ = decode_event(r.value, now)  # malformed: the trainer's source dead-letters it; skipped here
                stored = None if ev is None else StoredEvent(
                    r.offset, ev.event_id, ev.user_id, ev.item_id, ev.action, float(ev.weight), int(ev.timestamp_ms),
                    ev.impression_id)
                out.append(ReceivedEvent(key, r.offset, stored, int(r.timestamp)))
        return out

    def read(self, positions: Mapping[str, int], limit: int) -> list[ReceivedEvent]:
        return self._call(self._read(positions, limit))

    def commit(self, positions: Mapping[str, int]) -> None:
        pass  # positions live in the attribution store; Kafka's retention is by time, not by consumers

    def close(self) -> None:
        if self._consumer is not None:
            try:
                self._call(self._consumer.stop())
            except Exception:  # noqa: BLE001 - closing
                pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
