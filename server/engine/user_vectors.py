"""Users' feature vectors (an engine's user encoder over the catalogue's user records), shared by the engines
fed by one catalogue whose user encoders are the same.

Encoding every user record is an engine load's biggest cost with user features (measured: 100k users 3.5 s of
CPU, ~0.5 KB each). Short-round engines keep their full round's user encoder (trainer/short_rounds.py freezes it
in the fork), so engines that differ only by a refit of the tower carry the same encoder weights: the build
records their hash (`weights_sha256` in user_encoder.json), and engines with the same hash share one table here,
encoded once. The pool belongs to the catalogue's CatalogSync (server/engine/catalog_sync.py): tables hold one
catalogue's versions. grpc-free.

A fresh table is seeded from the users' vectors the build shipped with the engine, when it did (`seed`, contracts/
engine_format/user_vectors.py): only the users whose records changed since the build are encoded here.

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

from contracts.catalog import CatalogRecord, record_from_body
from contracts.engine_format.item_encoder import ItemEncoder, fuse_user_vectors
from contracts.engine_format.user_vectors import ShippedUserVectors, body_digest

ENCODE_BATCH = 4096
SEED_CHECKS = 8             # shipped vectors re-encoded here and compared before a table takes them
SEED_TOLERANCE = 1e-3       # max abs difference allowed there (the same exported program on both sides)


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

    def seed(self, shipped: ShippedUserVectors, version: int, rows: Sequence[tuple[str, str]]) -> tuple[int, int]:
        """Fill a fresh table from the build's vectors. version, rows: the catalogue store's version and its live
        user records' (id, stored body), read as one snapshot. A user whose body has the digest the build stored
        takes the shipped vector; any other is encoded. Returns (taken from the build, encoded); ValueError (the
        table unchanged) if the table is not fresh, the vectors are another encoder's, or a re-encoded sample
        differs from them."""
        if self.vecs or self.version:
            raise ValueError(f"the table already holds the catalogue up to version {self.version}")
        if shipped.encoder_key != self.encoder.weights_key:
            raise ValueError("the shipped vectors were computed by another user encoder")
        at = {rid: i for i, rid in enumerate(shipped.ids)}
        digests = shipped.digests_N.tolist()
        taken: list[tuple[str, int, str]] = []
        stale: list[CatalogRecord] = []
        for rid, body in rows:
            i = at.get(rid)
            if i is not None and digests[i] == body_digest(body):
                taken.append((rid, i, body))
            else:
                stale.append(record_from_body("user", rid, body))
        sample = taken[::max(len(taken) // SEED_CHECKS, 1)][:SEED_CHECKS]
        if sample:
            got_ND = self.encoder([record_from_body("user", rid, body) for rid, _, body in sample])
            diff = float(np.abs(got_ND - shipped.vecs_ND[[i for _, i, _ in sample]]).max())
            if not diff <= SEED_TOLERANCE:
                raise ValueError(f"re-encoded users differ from the shipped vectors by {diff:.3g} "
                                 f"(tolerance {SEED_TOLERANCE:g})")
        vecs = {rid: shipped.vecs_ND[i] for rid, i, _ in taken}
        for s in range(0, len(stale), ENCODE_BATCH):
            for r, v in zip(stale[s:s + ENCODE_BATCH], self.encoder(stale[s:s + ENCODE_BATCH])):
                vecs[r.id] = v
        self.vecs, self.version = vecs, version
        return len(taken), len(stale)

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

