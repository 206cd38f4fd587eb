"""Items a serving engine learned after its build: upserted ones (vectors from the engine's item feature encoder)
and build-time ones deleted (or replaced by an upsert). grpc-free.

Copy-on-write: every change builds a new LiveSet and swaps one reference, so the request path reads
`LiveItems.current` once per batch without a lock; changes are serialised by their own lock. Retrieval scores
the live vectors exactly beside the build-time items (exact or index) and merges the two top-k lists; deleted
build-time items are excluded from the build-time search like a user's seen items. Bounded: at most `max_items`
live items (the next engine build takes them over and the set starts again from that engine's catalogue).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch


@dataclass(frozen=True, slots=True)
class LiveSet:
    ids: tuple[str, ...]            # live item ids, row order of vecs_MD
    row_of: dict[str, int]          # id -> row of vecs_MD
    vecs_MD: torch.Tensor           # (M, D) float32, L2-normalised
    deleted: frozenset[int]         # build-time item indices (vocabulary row - 1) not served any more


class LiveItems:
    def __init__(self, dim: int, base_index: Callable[[str], int | None], max_items: int = 100_000) -> None:
        """base_index(id): the build-time item index (row - 1) of id, None when the build has no such item."""
        if max_items < 1:
            raise ValueError(f"max_items must be >= 1, got {max_items}")
        self.dim, self.max_items = dim, max_items
        self._base_index = base_index
        self._lock = threading.Lock()
        self.current = LiveSet((), {}, torch.zeros(0, dim), frozenset())

    def upsert(self, ids: Sequence[str], vecs_MD: np.ndarray) -> None:
        """Add or replace items; a build-time item of the same id stops being served from its build-time row
        (Engine.apply_catalog upserts only ids the build does not have)."""
        if len(ids) != len(vecs_MD) or (len(ids) and vecs_MD.shape[1] != self.dim):
            raise ValueError(f"ids ({len(ids)}) and vectors {tuple(vecs_MD.shape)} must match, dim {self.dim}")
        if len(set(ids)) != len(ids):
            raise ValueError("ids must be distinct within one upsert")
        with self._lock:
            cur = self.current
            keep = [i for i, x in enumerate(cur.ids) if x not in set(ids)]
            new_ids = tuple(cur.ids[i] for i in keep) + tuple(ids)
            if len(new_ids) > self.max_items:
                raise ValueError(f"live items would be {len(new_ids)}: the limit is {self.max_items} (the next "
                                 f"engine build takes them over)")
            vecs = torch.cat([cur.vecs_MD[keep], torch.from_numpy(np.ascontiguousarray(vecs_MD, np.float32))])
            replaced = {b for b in map(self._base_index, ids) if b is not None}
            self.current = LiveSet(new_ids, {x: r for r, x in enumerate(new_ids)}, vecs, cur.deleted | replaced)

    def delete(self, ids: Sequence[str]) -> int:
        """Stop serving these items (live or build-time); returns how many were served."""
        with self._lock:
            cur, gone = self.current, set(ids)
            keep = [i for i, x in enumerate(cur.ids) if x not in gone]
            base = {b for b in map(self._base_index, gone) if b is not None} - cur.deleted
            removed = len(cur.ids) - len(keep) + len(base)
            new_ids = tuple(cur.ids[i] for i in keep)
            self.current = LiveSet(new_ids, {x: r for r, x in enumerate(new_ids)}, cur.vecs_MD[keep],
                                   cur.deleted | base)
            return removed


    def restore(self, base_indices: Sequence[int]) -> None:
        """Serve these build-time items again (upserted after a delete: their build-time vectors)."""
        with self._lock:
            cur = self.current
            if set(base_indices) & cur.deleted:
                self.current = LiveSet(cur.ids, cur.row_of, cur.vecs_MD, cur.deleted - set(base_indices))


def merge_topk(base_scores: list[float], base_ids: list[str], live: LiveSet, u_D: torch.Tensor, k: int,
               exclude: set[str]) -> tuple[list[float], list[str]]:
    """The best k of a build-time top-k list and the live items (exact), by score; `exclude`: ids not to return."""
    if not live.ids:
        return base_scores[:k], base_ids[:k]
    s_M = live.vecs_MD @ u_D  # (M,)
    top = torch.topk(s_M, min(k + len(exclude), len(live.ids)))
    cand = [(s, live.ids[j]) for s, j in zip(top.values.tolist(), top.indices.tolist())
            if live.ids[j] not in exclude][:k]
    cand += zip(base_scores, base_ids)
    cand.sort(key=lambda p: -p[0])
    return [s for s, _ in cand[:k]], [x for _, x in cand[:k]]
