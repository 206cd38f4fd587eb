"""Where LogEvents puts accepted and rejected events: the embedded SQLite log or a Kafka topic.

Both sinks are async and raise on failure, in which case nothing was acknowledged and the client
retries. `Backpressure` (Kafka: too many events await acknowledgement) maps to RESOURCE_EXHAUSTED.
A request's dead letters are written together (one SQLite transaction, one fsync; one Kafka batch),
at most `IngestConfig.max_dead_letters_per_request` of them.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Protocol, Sequence

from contracts.eventlog import SqliteEventLog
from contracts.kafka_events import Backpressure, KafkaEventProducer
from proto import livetower_v1_pb2 as pb

__all__ = ["Backpressure", "EventSink", "IngestConfig", "KafkaEventProducer", "SqliteSink"]


@dataclass(kw_only=True, frozen=True, slots=True)
class IngestConfig:
    """What one LogEvents request may cost the event store."""

    max_dead_letters_per_request: int = 100  # rejected events stored per request; the rest are still reported as
                                             # rejected (and counted in dead_letters_dropped) but not stored

    def __post_init__(self) -> None:
        if self.max_dead_letters_per_request < 0:
            raise ValueError("IngestConfig.max_dead_letters_per_request must be >= 0, got "
                             f"{self.max_dead_letters_per_request}")


class EventSink(Protocol):
    async def start(self) -> None: ...
    async def append(self, events: Sequence[pb.Event]) -> int: ...
    async def append_new(self, events: Sequence[pb.Event]) -> list[bool]: ...  # per event: newly stored
    async def dead_letter_many(self, letters: Sequence[tuple[bytes, str]]) -> None: ...  # (payload, reason)
    async def stop(self) -> None: ...


class SqliteSink:
    """The embedded log; writes run on a worker thread (they fsync)."""

    def __init__(self, log: SqliteEventLog) -> None:
        self.log = log

    async def start(self) -> None:
        pass

    async def append(self, events: Sequence[pb.Event]) -> int:
        return await asyncio.to_thread(self.log.append, events)

    async def append_new(self, events: Sequence[pb.Event]) -> list[bool]:
        return await asyncio.to_thread(self.log.append_new, events)

    async def dead_letter_many(self, letters: Sequence[tuple[bytes, str]]) -> None:
        if letters:
            await asyncio.to_thread(self.log.dead_letter_many, letters)

    async def stop(self) -> None:
        self.log.close()
