"""The Kafka backend of the event stream (aiokafka): topic layout, record codec, the server's producer.

Selected with `--events kafka://HOST:PORT/TOPIC[?partitions=N]`. Records: key = user_id (so one
user's events stay in one partition, in order), value = a serialized `livetower.v1.Event`.
Malformed records go to `<TOPIC>.dead-letter` with the reason in a `reason` header. Positions are
keyed "kafka:<topic>:<partition>" (see contracts/eventlog.py).

The trainer's side (a consumer-group EventSource) is in trainer/sources/kafka.py; the server's
history feed is in server/events/kafka_feed.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

from google.protobuf.message import DecodeError

from contracts.events import event_problem
from contracts.kafka_security import KafkaSecurity
from proto import livetower_v1_pb2 as pb

log = logging.getLogger("livetower.kafka")
DEAD_LETTER_SUFFIX = ".dead-letter"


@dataclass(kw_only=True, frozen=True, slots=True)
class KafkaTarget:
    bootstrap: str        # "host:port" of a broker
    topic: str            # the event topic
    partitions: int = 4   # partitions when this process has to create the topic
    security: KafkaSecurity = field(default_factory=KafkaSecurity)  # SSL / SASL (contracts/kafka_security.py)

    def __post_init__(self) -> None:
        if not self.topic or any(c not in _TOPIC_CHARS for c in self.topic) or len(self.topic) > 200:
            raise ValueError(f"topic {self.topic!r} is not a valid Kafka topic name "
                             "(1..200 characters of letters, digits, '.', '_', '-')")
        if not 1 <= self.partitions <= 1024:
            raise ValueError(f"partitions must be in 1..1024, got {self.partitions}")

    @property
    def dead_letter_topic(self) -> str:
        return self.topic + DEAD_LETTER_SUFFIX

    def position_key(self, partition: int) -> str:
        return f"kafka:{self.topic}:{partition}"

    def client_kwargs(self) -> dict[str, object]:
        """bootstrap_servers and the security options: the common arguments of every aiokafka client."""
        return {"bootstrap_servers": self.bootstrap, **self.security.aiokafka_kwargs()}


_TOPIC_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


def parse_events_url(url: str) -> KafkaTarget:
    """kafka://HOST:PORT/TOPIC[?partitions=N] -> KafkaTarget (ValueError says what is wrong)."""
    u = urllib.parse.urlsplit(url)
    if u.scheme != "kafka":
        raise ValueError(f"--events {url!r}: expected kafka://HOST:PORT/TOPIC (the embedded SQLite log is the "
                         "default when --events is not given)")
    if not u.hostname or not u.port:
        raise ValueError(f"--events {url!r}: the broker must be HOST:PORT, e.g. kafka://127.0.0.1:9092/events")
    topic = u.path.lstrip("/")
    query = urllib.parse.parse_qs(u.query)
    known = {"partitions"} | KafkaSecurity.url_keys()
    unknown = set(query) - known
    if unknown:
        raise ValueError(f"--events {url!r}: unknown option(s) {sorted(unknown)}; known: {sorted(known)}")
    partitions = int(query["partitions"][0]) if "partitions" in query else 4
    return KafkaTarget(bootstrap=f"{u.hostname}:{u.port}", topic=topic, partitions=partitions,
                       security=KafkaSecurity.from_query(query))


def encode_event(ev: pb.Event) -> tuple[bytes, bytes]:
    """(key, value) of the Kafka record for an event."""
    return ev.user_id.encode(), ev.SerializeToString()


def decode_event(value: bytes | None, now_ms: int) -> tuple[pb.Event | None, str | None]:
    """(event, None) for a valid record, (None, reason) for a malformed or invalid one."""
    if value is None:
        return None, "record has no value (tombstone); expected a serialized livetower.v1.Event"
    ev = pb.Event()
    try:
        ev.ParseFromString(value)
    except DecodeError as e:
        return None, f"value is not a serialized livetower.v1.Event ({e})"
    if problem := event_problem(ev, now_ms):
        return None, problem
    return ev, None


async def start_admin(target: KafkaTarget, timeout_s: float):
    """A started AIOKafkaAdminClient (close it); ConnectionError with advice when the broker cannot be reached."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(**target.client_kwargs(), request_timeout_ms=int(timeout_s * 1000))
    try:
        await asyncio.wait_for(admin.start(), timeout_s)
    except Exception as e:  # noqa: BLE001 - turn any connection failure into advice
        await admin.close()
        raise ConnectionError(f"cannot reach the Kafka broker at {target.bootstrap} ({e!r}); start it or fix "
                              "--events") from e
    return admin


async def ensure_topics(target: KafkaTarget, *, timeout_s: float = 30.0) -> None:
    """Create the event topic and its dead-letter topic if they do not exist (idempotent, race-safe)."""
    from aiokafka.admin import NewTopic
    from aiokafka.errors import TopicAlreadyExistsError

    admin = await start_admin(target, timeout_s)
    try:
        existing = set(await admin.list_topics())
        wanted = [NewTopic(name, target.partitions if name == target.topic else 1, 1)
                  for name in (target.topic, target.dead_letter_topic) if name not in existing]
        if wanted:
            try:
                await admin.create_topics(wanted)
                log.info("created topic(s) %s", ", ".join(t.name for t in wanted))
            except TopicAlreadyExistsError:
                pass  # another process created it meanwhile
    finally:
        await admin.close()


class Backpressure(Exception):
    """Too many events are waiting for the broker's acknowledgement; the caller should retry later."""


class KafkaEventProducer:
    """The server's event sink: LogEvents produces here. An event counts as accepted only once the
    broker acknowledged it (acks=all); records are batched by the client (linger_ms). At most
    `max_inflight_events` may await acknowledgement at once: beyond that `append` raises Backpressure
    at once, which the server answers with RESOURCE_EXHAUSTED, rather than queueing without bound."""

    def __init__(self, target: KafkaTarget, *, max_inflight_events: int = 50_000, linger_ms: int = 2,
                 ack_timeout_s: float = 10.0) -> None:
        if max_inflight_events < 1:
            raise ValueError(f"max_inflight_events must be >= 1, got {max_inflight_events}")
        self.target = target
        self.max_inflight_events = max_inflight_events
        self.linger_ms = linger_ms
        self.ack_timeout_s = ack_timeout_s
        self._producer = None
        self._inflight = 0

    async def start(self) -> None:
        from aiokafka import AIOKafkaProducer

        await ensure_topics(self.target)
        # No idempotence: the test broker (tansu) lacks it; duplicates from retries carry the same
        # event_id and are harmless (at-least-once).
        self._producer = AIOKafkaProducer(**self.target.client_kwargs(), acks="all",
                                          linger_ms=self.linger_ms, enable_idempotence=False,
                                          request_timeout_ms=int(self.ack_timeout_s * 1000))
        await self._producer.start()

    async def append(self, events: Sequence[pb.Event]) -> int:
        if self._producer is None:
            raise RuntimeError("KafkaEventProducer.start() was not awaited")
        n = len(events)
        if self._inflight and self._inflight + n > self.max_inflight_events:  # one big batch alone may pass
            raise Backpressure(f"{self._inflight} events await the broker's acknowledgement (limit "
                               f"{self.max_inflight_events}); retry with back-off")
        self._inflight += n
        try:
            futures = []
            for ev in events:
                key, value = encode_event(ev)
                futures.append(await self._producer.send(self.target.topic, value=value, key=key))
            await asyncio.wait_for(asyncio.gather(*futures), self.ack_timeout_s)
        finally:
            self._inflight -= n
        return n

    async def append_new(self, events: Sequence[pb.Event]) -> list[bool]:
        """Every event counts as new: the topic cannot tell a repeated event_id; the trainer's reader drops
        repeats (dedupe at the consumer)."""
        await self.append(events)
        return [True] * len(events)

    async def dead_letter(self, payload: bytes, reason: str) -> None:
        await self.dead_letter_many([(payload, reason)])

    async def dead_letter_many(self, letters: Sequence[tuple[bytes, str]]) -> None:
        """(payload, reason) records to the dead-letter topic as one batch: sent together, acknowledged together."""
        if not letters:
            return
        if self._producer is None:
            raise RuntimeError("KafkaEventProducer.start() was not awaited")
        futures = [await self._producer.send(self.target.dead_letter_topic, value=payload,
                                             headers=[("reason", reason.encode())]) for payload, reason in letters]
        await asyncio.wait_for(asyncio.gather(*futures), self.ack_timeout_s)

    async def stop(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None


async def produce_all(target: KafkaTarget, events: Iterable[pb.Event], *, chunk: int = 10_000,
                      progress: Callable[[int], None] | None = None) -> int:
    """Produce a (possibly large) stream, acknowledged chunk by chunk; progress(events so far) after each."""
    producer = KafkaEventProducer(target, max_inflight_events=chunk)
    await producer.start()
    sent, batch = 0, []
    try:
        for ev in events:
            batch.append(ev)
            if len(batch) == chunk:
                sent += await producer.append(batch)
                batch.clear()
                if progress:
                    progress(sent)
        if batch:
            sent += await producer.append(batch)
    finally:
        await producer.stop()
    return sent


async def topic_size(target: KafkaTarget) -> int:
    """Records currently in the event topic (end minus beginning offsets, summed over partitions)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    await ensure_topics(target)
    c = AIOKafkaConsumer(**target.client_kwargs(), group_id=None, enable_auto_commit=False)
    await c.start()
    try:
        await c.topics()
        tps = [TopicPartition(target.topic, p) for p in sorted(c.partitions_for_topic(target.topic) or ())]
        ends, starts = await c.end_offsets(tps), await c.beginning_offsets(tps)
        return sum(ends[tp] - starts[tp] for tp in tps)
    finally:
        await c.stop()


def now_ms() -> int:
    return int(time.time() * 1000)
