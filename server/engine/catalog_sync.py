"""The catalogue as served: every change written to the catalogue store (UpsertItems / DeleteItems, `livetower
catalog load`, the catalogue stream) reaches every engine in this process, and an engine loaded later replays all
of them before it serves. grpc-free.

Each engine remembers the catalogue version it has applied (Engine.catalog_version) and catches up from there,
so an engine loaded while changes arrive misses none. The store's connection is used under one lock (writes from
the admin call's thread and the stream follower's, reads from the watcher's).

Writers: `LocalCatalogWriter` writes the store itself (one host); `StreamCatalogWriter` writes the Kafka
catalogue topic and waits until this process's follower has applied what it wrote (a fleet: every replica
follows the topic into its own store, contracts/catalog_stream.py).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Callable, Iterable, Protocol, Sequence, TypeVar

from aiokafka.errors import KafkaError

from contracts.catalog import CatalogOp, CatalogRecord, CatalogStore, UpsertResult
from contracts.catalog_stream import CatalogFollower, CatalogProducer, stream_start
from contracts.engine_format.user_vectors import read_user_vectors
from contracts.kafka_events import KafkaTarget
from server.engine.engine import Engine
from server.engine.user_vectors import UserVectorPool

PAGE = 10_000
T = TypeVar("T")
log = logging.getLogger("livetower.server")


class CatalogSync:
    def __init__(self, store: CatalogStore) -> None:
        self.store = store
        self._lock = threading.Lock()
        self.user_tables = UserVectorPool()  # users' feature vectors, shared by same-encoder engines

    def upsert(self, records: Sequence[CatalogRecord], engines: Iterable[Engine]) -> UpsertResult:
        """Write durably (one transaction), then apply to `engines` (the ones serving)."""
        return self._write(lambda: self.store.upsert(records), engines)

    def delete(self, ids: Sequence[str], engines: Iterable[Engine], kind: str = "item") -> tuple[int, int]:
        return self._write(lambda: self.store.delete(ids, kind), engines)

    def apply_stream(self, ops: Sequence[CatalogOp], next_offset: int,
                     engines: Iterable[Engine]) -> tuple[list[str], int]:
        """Changes read from the catalogue stream, stored with the offset to read next, then applied to `engines`."""
        return self._write(lambda: self.store.apply_ops(ops, stream_offset=next_offset), engines)

    def _write(self, write: Callable[[], T], engines: Iterable[Engine]) -> T:
        with self._lock:
            out = write()
            for engine in engines:
                self._catch_up(engine)
            return out

    def close(self) -> None:
        with self._lock:
            self.store.close()

    def catch_up(self, engines: Iterable[Engine]) -> None:
        with self._lock:
            for engine in engines:
                self._catch_up(engine)

    def _catch_up(self, engine: Engine) -> None:
        if engine.user_encoder is not None and engine.users is None:
            engine.users = self.user_tables.table_for(engine.user_encoder)
            if engine.shipped_users is not None and not engine.users.vecs and not engine.users.version:
                self._seed_users(engine)
        # Users' records are read only for a user table behind the catalogue: an engine without a user encoder, or
        # one whose shared table another engine caught up, parses none of them (a 100k-user catalogue: 3 s saved)
        now = self.store.version()
        kind = None if engine.users is not None and engine.users.version < now else "item"
        while True:
            changes = self.store.changes_since(engine.catalog_version, limit=PAGE, kind=kind)
            if not changes:
                engine.catalog_version = max(engine.catalog_version, now)
                if kind is None:
                    engine.users.advance(now)
                return
            engine.apply_catalog([(c.id, c.record) for c in changes if c.kind == "item"])
            if kind is None:
                engine.apply_user_catalog([(c.version, c.id, c.record) for c in changes if c.kind == "user"],
                                          changes[-1].version)
            engine.catalog_version = changes[-1].version


    def _seed_users(self, engine: Engine) -> None:
        """A fresh user table from the vectors the build shipped; on any fault, the table is left empty and the
        catch-up below encodes every user record, as for an engine that shipped none."""
        t0 = time.perf_counter()
        try:
            shipped = read_user_vectors(engine.shipped_users, int(engine.manifest.dim))
            version, rows = self.store.live_bodies("user")
            taken, encoded = engine.users.seed(shipped, version, rows)
        except (OSError, ValueError) as e:
            log.warning("engine %d: its shipped users' vectors are not used (%s); every user record is encoded",
                        engine.version, e)
            return
        log.info("engine %d: users' feature vectors: %d from the build, %d encoded here (%.2f s)", engine.version,
                 taken, encoded, time.perf_counter() - t0)


class CatalogWriter(Protocol):
    """Where UpsertItems / DeleteItems (and the users' calls) write; both return once the serving engines of this
    process apply it."""

    async def start(self) -> None: ...
    async def upsert(self, records: Sequence[CatalogRecord]) -> UpsertResult: ...
    async def delete(self, ids: Sequence[str], kind: str = "item") -> tuple[int, int]: ...  # (deleted, version after)
    async def stop(self) -> None: ...


class LocalCatalogWriter:
    """One host: the store file is the catalogue (written on a worker thread: it fsyncs)."""

    def __init__(self, sync: CatalogSync, engines: Callable[[], list[Engine]]) -> None:
        self.sync, self.engines = sync, engines

    async def start(self) -> None:
        pass

    async def upsert(self, records: Sequence[CatalogRecord]) -> UpsertResult:
        return await asyncio.to_thread(self.sync.upsert, records, self.engines())

    async def delete(self, ids: Sequence[str], kind: str = "item") -> tuple[int, int]:
        return await asyncio.to_thread(self.sync.delete, ids, self.engines(), kind)

    async def stop(self) -> None:
        pass


class StreamCatalogWriter:
    """The Kafka catalogue topic is the catalogue; this process's store follows it. A change is acknowledged by
    the broker, then applied here (by the follower, like everyone else's) before the call returns. The counts
    (inserted, updated, ...) are what applying each change did to this replica's store, in stream order: every
    replica's store went through the same changes in the same order, so every replica counts the same."""

    def __init__(self, target: KafkaTarget, sync: CatalogSync, engines: Callable[[], list[Engine]], *,
                 apply_timeout_s: float = 10.0) -> None:
        self.sync, self.engines, self.apply_timeout_s = sync, engines, apply_timeout_s
        self.producer = CatalogProducer(target)
        self.version = sync.store.version()  # the store's version after the latest applied batch
        self.follower = CatalogFollower(target, self._apply, stream_start(target, sync.store))
        self._task: asyncio.Task | None = None
        self._stop = asyncio.Event()

    def _apply(self, ops: list[CatalogOp], next_offset: int) -> list[str]:
        outcomes, self.version = self.sync.apply_stream(ops, next_offset, self.engines())
        return outcomes

    async def start(self) -> None:
        """Catch up with the topic (before this process serves), then follow it until `stop`."""
        await self.producer.start()
        await self.follower.start()
        await self.follower.catch_up(progress=log.info)
        log.info("catalogue follows Kafka topic %s (offset %d, version %d)", self.follower.topic,
                 self.follower.next_offset, self.version)
        self._task = asyncio.create_task(self.follower.run(self._stop))

    async def _write(self, ops: list[CatalogOp]) -> list[str]:
        try:
            offsets = await self.producer.publish(ops)
        except (TimeoutError, KafkaError) as e:
            raise ConnectionError(f"the broker did not acknowledge the {len(ops)} change(s) ({e!r}); retry (a change "
                                  "written twice applies once)") from e
        try:
            return await self.follower.wait_applied(offsets, self.apply_timeout_s)
        except TimeoutError:
            raise TimeoutError(f"the broker acknowledged the {len(ops)} change(s) (durable, offsets up to "
                               f"{max(offsets)}) but this replica had not applied them after "
                               f"{self.apply_timeout_s:.0f} s (at offset {self.follower.next_offset}); they apply "
                               "when it catches up, and a retry is harmless") from None

    async def upsert(self, records: Sequence[CatalogRecord]) -> UpsertResult:
        outcomes = await self._write([CatalogOp(r.kind, r.id, r) for r in records])
        return UpsertResult(outcomes.count("inserted"), outcomes.count("updated"), outcomes.count("unchanged"),
                            self.version)

    async def delete(self, ids: Sequence[str], kind: str = "item") -> tuple[int, int]:
        outcomes = await self._write([CatalogOp(kind, i, None) for i in ids])
        return outcomes.count("deleted"), self.version

    async def stop(self) -> None:
        """After the listeners drained: no catalogue call waits for the follower any more."""
        self._stop.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        await self.follower.stop()
        await self.producer.stop()
