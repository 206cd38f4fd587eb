"""Users' feature vectors (an engine's user encoder over the catalogue's user records), shared by the engines
fed by one catalogue whose user encoders are the same.

Encoding every user record is an engine load's biggest cost with user features (measured: 100k users 3.5 s of
CPU, ~0.5 KB each). Short-round engines keep their full round's user encoder (trainer/short_rounds.py freezes it
in the fork), so engines that differ only by a refit of the tower carry the same encoder weights: the build
records their hash (`weights_sha256` in user_encoder.json), and engines with the same hash share one table here,
encoded once. The pool belongs to the catalogue's CatalogSync (server/engine/catalog_sync.py): tables hold one
catalogue's versions. grpc-free.

Each table remembers the catalogue version it has applied, so an engine that joins a table already caught up
replays nothing, and one catch-up serves every engine sharing it. Readers (request threads) need no lock: a
vector is replaced by one dict store and a reader sees the old vector or the new; writers are the catalogue's
(CatalogSync holds its lock around them).
"""

from __future__ import annotations

import threading
import weakref
from typing import Sequence

import numpy as np

from contracts.catalog import CatalogRecord
from contracts.engine_format.item_encoder import ItemEncoder, fuse_user_vectors

ENCODE_BATCH = 4096


class UserVectors:
    def __init__(self, encoder: ItemEncoder) -> None:
        self.encoder = encoder
        self.vecs: dict[str, np.ndarray] = {}  # user id -> (D,) float32
        self.version = 0  # the catalogue version applied

    def apply(self, changes: Sequence[tuple[int, str, CatalogRecord | None]]) -> int:
        """User record changes (catalogue version, user id, record or None: deleted) in version order; those at or
        below the version already applied are skipped. Returns how many records were encoded."""
        changes = [c for c in changes if c[0] > self.version]
        if not changes:
            return 0
        latest = {uid: r for _, uid, r in changes}
        for uid in [u for u, r in latest.items() if r is None]:
            self.vecs.pop(uid, None)
        live = [r for r in latest.values() if r is not None]
        for s in range(0, len(live), ENCODE_BATCH):
            for r, v in zip(live[s:s + ENCODE_BATCH], self.encoder(live[s:s + ENCODE_BATCH])):
                self.vecs[r.id] = v
        self.version = changes[-1][0]
        return len(live)

    def advance(self, version: int) -> None:
        """Changes up to `version` held no user record: nothing to apply, but nothing to replay either."""
        self.version = max(self.version, version)

    def fuse(self, u_BD: np.ndarray, user_ids: Sequence[str]) -> np.ndarray:
        """The tower's vectors fused with the users' feature vectors (users without a record: unchanged)."""
        if not self.vecs:
            return u_BD
        f_B = [self.vecs.get(u) for u in user_ids]
        if all(f is None for f in f_B):
            return u_BD
        zero = np.zeros(u_BD.shape[1], np.float32)
        fused_BD = fuse_user_vectors(u_BD, np.stack([zero if f is None else f for f in f_B]))
        return np.where(np.array([f is not None for f in f_B])[:, None], fused_BD, u_BD)


class UserVectorPool:
    """weights hash -> the live table of engines with that user encoder (weak: freed with its last engine)."""

    def __init__(self) -> None:
        self._tables: weakref.WeakValueDictionary[str, UserVectors] = weakref.WeakValueDictionary()
        self._lock = threading.Lock()

    def table_for(self, encoder: ItemEncoder) -> UserVectors:
        key = encoder.weights_key
        if key is None:  # an engine built before the hash was recorded: a table of its own
            return UserVectors(encoder)
        with self._lock:
            table = self._tables.get(key)
            if table is None:
                table = self._tables[key] = UserVectors(encoder)
            return table

