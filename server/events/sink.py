"""Where LogEvents puts accepted and rejected events: the embedded SQLite log or a Kafka topic.

Both sinks are async and raise on failure, in which case nothing was acknowledged and the client
retries. `Backpressure` (Kafka: too many events await acknowledgement) maps to RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import asyncio
from typing import Protocol, Sequence

from contracts.eventlog import SqliteEventLog
from contracts.kafka_events import Backpressure, KafkaEventProducer
from proto import livetower_v1_pb2 as pb

__all__ = ["Backpressure", "EventSink", "KafkaEventProducer", "SqliteSink"]


class EventSink(Protocol):
    async def start(self) -> None: ...
    async def append(self, events: Sequence[pb.Event]) -> int: ...
    async def dead_letter(self, payload: bytes, reason: str) -> None: ...
    async def stop(self) -> None: ...


class SqliteSink:
    """The embedded log; writes run on a worker thread (they fsync)."""

    def __init__(self, log: SqliteEventLog) -> None:
        self.log = log

    async def start(self) -> None:
        pass

    async def append(self, events: Sequence[pb.Event]) -> int:
        return await asyncio.to_thread(self.log.append, events)

    async def dead_letter(self, payload: bytes, reason: str) -> None:
        await asyncio.to_thread(self.log.dead_letter, payload, reason)

    async def stop(self) -> None:
        self.log.close()
