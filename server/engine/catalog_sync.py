"""The catalogue as served: every change written to the catalogue store (UpsertItems / DeleteItems, `livetower
catalog load`) reaches every engine in this process, and an engine loaded later replays all of them before it
serves. grpc-free.

Each engine remembers the catalogue version it has applied (Engine.catalog_version) and catches up from there,
so an engine loaded while changes arrive misses none. The store's connection is used under one lock (writes from
the admin call's thread, reads from the watcher's).
"""

from __future__ import annotations

import threading
from typing import Callable, Iterable, Sequence, TypeVar

from contracts.catalog import CatalogRecord, CatalogStore, UpsertResult
from server.engine.engine import Engine

PAGE = 10_000
T = TypeVar("T")


class CatalogSync:
    def __init__(self, store: CatalogStore) -> None:
        self.store = store
        self._lock = threading.Lock()

    def upsert(self, records: Sequence[CatalogRecord], engines: Iterable[Engine]) -> UpsertResult:
        """Write durably (one transaction), then apply to `engines` (the ones serving)."""
        return self._write(lambda: self.store.upsert(records), engines)

    def delete(self, ids: Sequence[str], engines: Iterable[Engine]) -> tuple[int, int]:
        return self._write(lambda: self.store.delete(ids), engines)

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
        while True:
            changes = self.store.changes_since(engine.catalog_version, limit=PAGE)
            if not changes:
                return
            engine.apply_catalog([(c.id, c.record) for c in changes if c.kind == "item"])
            engine.catalog_version = changes[-1].version
