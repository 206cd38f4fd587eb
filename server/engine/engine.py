"""A loaded serving engine: user-tower runner + item matrix + id vocabulary + popularity.

Backend-agnostic and grpc-free. Immutable after construction, so requests that started on it
finish on it while a newer engine takes over; it is freed when the last reference goes.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any
from pathlib import Path
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from kernels.retrieval import topk_cosine_reference
from contracts.registry import (ITEM_ENCODER_FILE, ITEM_ENCODER_META, ITEM_IDS_FILE, ITEMS_FILE, POPULARITY_FILE,
                                USER_ENCODER_FILE, USER_ENCODER_META, USER_TOWER_FILE, USER_VECTORS_FILE,
                                WEIGHTS_FILE)
from proto import livetower_v1_pb2 as pb
from contracts.engine_format.backends import UserTowerRunner, load_runner
from contracts.catalog import CatalogRecord
from contracts.engine_format.item_encoder import ItemEncoder
from contracts.engine_format.item_index import ItemIndex, check_recall, load_item_index
from server.engine.live_items import LiveItems, merge_topk
from server.engine.stages import StageClock
from server.engine.user_vectors import UserVectors
from contracts.engine_format.verify import ParityError, golden_set, parity_max_abs_diff
from server.engine.vocabulary import VOCABULARIES, Vocabulary

NEG_INF = float("-inf")

PAD_ROW = 0


class EngineRejected(Exception):
    """An engine that must not take traffic (parity failure, unloadable files)."""


@dataclass(frozen=True, slots=True)
class RecommendQuery:
    history: Sequence[str]  # item ids, newest last
    k: int
    exclude_seen: bool
    user_id: str = ""  # whose request: an engine with user features fuses that user's feature vector, if any


@dataclass(frozen=True, slots=True)
class Ranked:
    item_ids: list[str]
    scores: list[float]
    source: str  # "model" | "popularity"


@dataclass(slots=True)
class PreparedBatch:
    """A batch between Engine.prepare and Engine.finish: what the tower and the search need, and the answers so far."""
    queries: Sequence[RecommendQuery]
    stamps: list[float]  # perf_counter() at the start and after rows (then after tower and search): the StageClock's
    live: Any  # the LiveItems snapshot it was prepared with (deleted and upserted items)
    out: list[Ranked | None] = field(default_factory=list)  # per query; popularity answers filled by prepare
    rows: list[np.ndarray] = field(default_factory=list)  # (T,) left-padded rows per query the model answers
    model_q: list[int] = field(default_factory=list)  # those queries' positions in `queries`
    seen_B: list[list[int]] = field(default_factory=list)  # item indices each of them must not get back
    k_max: int = 0  # the largest k asked
    k_search: int = 0  # how many a search returns so that k_max remain after the exclusions


def drop_excluded(dist_BK: np.ndarray, idx_BK: np.ndarray, k: int,
                  seen_B: list) -> tuple[list[list[float]], list[list[int]]]:
    """The first k of each row of a search's answer, its excluded items (seen_B) and misses (-1) dropped."""
    scores_out, idx_out = [], []
    for b, (dist_K, ids_K) in enumerate(zip(dist_BK.tolist(), idx_BK.tolist())):
        if not seen_B[b] and -1 not in ids_K:  # the common case: nothing to drop
            scores_out.append(dist_K[:k])
            idx_out.append(ids_K[:k])
            continue
        seen = set(seen_B[b])
        keep = [(d, i) for d, i in zip(dist_K, ids_K) if i >= 0 and i not in seen][:k]
        scores_out.append([d for d, _ in keep])
        idx_out.append([i for _, i in keep])
    return scores_out, idx_out


class _ItemIds(Sequence):
    """The engine's item ids (row - 1 -> id): the first n of a shared, append-only vocabulary."""

    def __init__(self, ids: list[str], n: int) -> None:
        self._ids, self._n = ids, n

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._ids[j] for j in range(self._n)[i]]
        if not -self._n <= i < self._n:
            raise IndexError(f"item index {i} out of range for {self._n} items")
        return self._ids[i % self._n]


class _Rows(Mapping):
    """id -> vocab row (1-based; 0 = pad) for the engine's items only: rows beyond n are unknown to it."""

    def __init__(self, row_of: dict[str, int], ids: list[str], n: int) -> None:
        self._row_of, self._ids, self._n = row_of, ids, n

    def get(self, item, default=None):
        r = self._row_of.get(item)
        return r if r is not None and r <= self._n else default

    def __getitem__(self, item) -> int:
        r = self.get(item)
        if r is None:
            raise KeyError(item)
        return r

    def __contains__(self, item) -> bool:
        return self.get(item) is not None

    def __len__(self) -> int:
        return self._n

    def __iter__(self):
        return iter(self._ids[:self._n])


class Engine:
    def __init__(self, manifest: pb.EngineManifest, runner: UserTowerRunner, vocab: Vocabulary, n_items: int,
                 items_ND: np.ndarray, popularity_ids: list[str], popularity_scores: list[float],
                 ann: ItemIndex | None = None) -> None:
        """vocab: the shared vocabulary whose first n_items ids are this engine's items (row i+1 = items_ND[i])."""
        if items_ND.shape != (n_items, manifest.dim):
            raise EngineRejected(f"items matrix is {items_ND.shape}, expected ({n_items}, {manifest.dim})")
        self.manifest = manifest
        self.version = int(manifest.version)
        self.max_history = int(manifest.max_history)
        self.runner = runner
        self.vocab, self.n_items = vocab, n_items
        self.item_ids = _ItemIds(vocab.ids, n_items)
        self.row_of = _Rows(vocab.row_of, vocab.ids, n_items)
        self.items_ND = torch.from_numpy(items_ND)
        self.popularity_ids = popularity_ids
        self.popularity_scores = popularity_scores
        self.ann = ann  # the index chosen at build for large catalogues (None: exact search)
        self.engine_dir: Path | None = None  # set by load(): where the index's held-out check queries are
        self.graph_dir: Path | None = None  # set by load(): a refit's graph version directory (its compiled tower)
        self.compute_process = None  # a ComputeProcess running its tower and search (EngineManagerConfig.compute_process)
        self.listed: frozenset[str] | None = None  # set by load(): the manifest's file names (the only ones read)
        self.clock: StageClock | None = None  # set once the engine serves: time per stage of recommend_batch
        self.encoder: ItemEncoder | None = None  # set by load() for a feature model's engine: features -> vectors
        self.user_encoder: ItemEncoder | None = None  # set by load() for a model with user features
        self.users: UserVectors | None = None  # its users' feature vectors, set by the catalogue's CatalogSync
                                               # (a table shared with same-encoder engines)
        self.shipped_users: Path | None = None  # set by load(): users' vectors the build computed (or None)
        self.live = LiveItems(int(manifest.dim), self._base_index)  # items upserted / deleted since the build
        self.catalog_version = 0  # the catalogue version whose changes live holds (server/engine/catalog_sync.py)

    @classmethod
    def load(cls, engine_dir: Path, manifest: pb.EngineManifest, *, num_threads: int = 1,
             use_ann: bool = True, graph_dir: Path | None = None, users_dir: Path | None = None) -> "Engine":
        """graph_dir: a refit engine (manifest.graph_version set) runs that version's compiled user
        tower with this engine's own weights (no recompile). users_dir: the verified dir of the engine whose
        users' vectors this one points to (manifest.user_vectors_version), when it ships none of its own."""
        engine_dir = Path(engine_dir)
        if manifest.backend not in USER_TOWER_FILE:
            raise EngineRejected(f"engine {manifest.version}: unknown backend {manifest.backend!r}")
        if manifest.graph_version and graph_dir is None:
            raise EngineRejected(f"engine {manifest.version} is a refit of engine {manifest.graph_version}: "
                                 "its graph directory is needed")
        # Only files the manifest lists (and Registry.verify hashed) are opened; a refit's tower file is its
        # graph version's, verified and listed there.
        listed = frozenset(f.path for f in manifest.files)

        def own(name: str) -> Path:
            if name not in listed:
                raise EngineRejected(f"engine {manifest.version}: {name} is not listed in its manifest")
            return engine_dir / name

        tower_file = (Path(graph_dir) / USER_TOWER_FILE[manifest.backend] if manifest.graph_version
                      else own(USER_TOWER_FILE[manifest.backend]))
        runner = load_runner(manifest.backend, tower_file, num_threads=num_threads,
                             weights=own(WEIGHTS_FILE) if manifest.graph_version else None)
        vocab, n_items = VOCABULARIES.vocabulary_for(own(ITEM_IDS_FILE).read_bytes())
        items_ND = np.ascontiguousarray(np.load(own(ITEMS_FILE), allow_pickle=False), dtype=np.float32)
        pop = json.loads(own(POPULARITY_FILE).read_text())
        ann = load_item_index(engine_dir, num_threads=num_threads, listed=listed) if use_ann else None
        engine = cls(manifest, runner, vocab, n_items, items_ND, pop["item_ids"], pop["scores"], ann)
        engine.engine_dir, engine.graph_dir = engine_dir, (Path(graph_dir) if manifest.graph_version else None)
        engine.listed = listed
        if ITEM_ENCODER_FILE in listed:
            engine.encoder = ItemEncoder.load(own(ITEM_ENCODER_FILE), own(ITEM_ENCODER_META))
        if USER_ENCODER_FILE in listed:
            engine.user_encoder = ItemEncoder.load(own(USER_ENCODER_FILE), own(USER_ENCODER_META))
            engine.shipped_users = (own(USER_VECTORS_FILE) if USER_VECTORS_FILE in listed else
                                    Path(users_dir) / USER_VECTORS_FILE if users_dir is not None else None)
        return engine

    # ---- checks before taking traffic
    def golden_max_abs_diff(self) -> float:
        """The user tower's (and the feature encoders') largest difference from the build's golden outputs."""
        try:
            diff = parity_max_abs_diff(self.runner, *golden_set(self.manifest))
        except ParityError as e:
            raise EngineRejected(f"engine {self.version}: {e}") from None
        return max([diff, *(e.golden_max_abs_diff() for e in (self.encoder, self.user_encoder) if e is not None)])

    def index_recall(self) -> tuple[float, float] | None:
        """(recall@k of the index on the build's held-out queries, the build's target); None without an index."""
        if self.ann is None or self.engine_dir is None:
            return None
        try:
            return check_recall(self.ann, self.items_ND.numpy(), self.engine_dir, self.listed)
        except ValueError as e:
            raise EngineRejected(f"engine {self.version}: {e}") from None

    def warm_up(self, calls: int) -> float:
        """Run representative requests so lazy init and allocator growth happen off the request path."""
        t0 = time.perf_counter()
        hist = self.item_ids[: self.max_history]
        for _ in range(calls):
            self.recommend(hist, k=min(100, max(1, len(self.item_ids))), exclude_seen=True)
            time.sleep(0.005)  # spread over time: on 2 cores a burst of warm-up calls slowed the live batches
        return time.perf_counter() - t0

    # ---- the catalogue after the build
    def _base_index(self, item_id: str) -> int | None:
        row = self.vocab.row_of.get(item_id)
        return row - 1 if row is not None and row <= self.n_items else None

    def apply_catalog(self, changes: Sequence[tuple[str, CatalogRecord | None]]) -> int:
        """Catalogue changes in order, (item id, its record now; None: deleted). A new item is encoded from its
        features and served from the next request on (when this engine has an item encoder; returns how many
        were); a build-time item keeps its trained vector (re-served if it had been deleted); a deleted item,
        new or build-time, is no longer served."""
        latest = dict(changes)  # the last change of each id wins
        self.live.delete([i for i, r in latest.items() if r is None])
        self.live.restore([b for i, r in latest.items() if r is not None and (b := self._base_index(i)) is not None])
        new = [r for i, r in latest.items() if r is not None and self._base_index(i) is None]
        if not new or self.encoder is None:
            return 0
        for s in range(0, len(new), 4096):
            self.live.upsert([r.id for r in new[s:s + 4096]], self.encoder(new[s:s + 4096]))
        return len(new)

    def apply_user_catalog(self, changes: Sequence[tuple[int, str, CatalogRecord | None]], upto: int) -> int:
        """User record changes (catalogue version, user id, record now or None: deleted), in order, of the
        catalogue up to version `upto`: with a user encoder, each user's feature vector is (re)computed or dropped
        (once per table shared by same-encoder engines); returns how many were encoded here."""
        if self.users is None:  # no user encoder, or no catalogue feeds this engine
            return 0
        n = self.users.apply(changes)
        self.users.advance(upto)
        return n

    def fuse_user_features(self, u_BD: np.ndarray, user_ids: Sequence[str]) -> np.ndarray:
        """(B, D) tower outputs fused with each user's feature vector (no encoder, no record: unchanged)."""
        return u_BD if self.users is None else self.users.fuse(u_BD, user_ids)

    # ---- serving
    def history_rows(self, history: Sequence[str]) -> np.ndarray:
        """Known items of the history, newest last, truncated to the newest max_history, left-padded."""
        return self._padded(self._known_rows(history))

    def _known_rows(self, history: Sequence[str]) -> list[int]:
        """Rows of the history's items this engine serves, in order (an id lookup each: cache-cold in the server)."""
        row_of, n = self.vocab.row_of, self.n_items
        return [r for r in map(row_of.get, history) if r is not None and r <= n]

    def _padded(self, rows: list[int]) -> np.ndarray:
        rows = rows[-self.max_history:]
        out_T = np.zeros(self.max_history, dtype=np.int64)
        if rows:
            out_T[-len(rows):] = rows
        return out_T

    def _user_vector(self, history: Sequence[str], user_id: str = "") -> torch.Tensor | None:
        rows_T = self.history_rows(history)
        if rows_T[-1] == PAD_ROW:
            return None  # no known item: popularity
        return torch.from_numpy(self.fuse_user_features(self.runner(rows_T[None, :]), [user_id]))  # (1, D)

    def recommend(self, history: Sequence[str], k: int, exclude_seen: bool, user_id: str = "") -> Ranked:
        return self.recommend_batch([RecommendQuery(history, k, exclude_seen, user_id)])[0]

    def _popular(self, q: "RecommendQuery") -> Ranked:
        seen = set(q.history) if q.exclude_seen else set()
        deleted = self.live.current.deleted
        picked = [(i, s) for i, s in zip(self.popularity_ids, self.popularity_scores)
                  if i not in seen and not (deleted and self._base_index(i) in deleted)][:q.k]
        return Ranked([i for i, _ in picked], [s for _, s in picked], "popularity")

    def recommend_batch(self, queries: Sequence["RecommendQuery"]) -> list[Ranked]:
        """One user-tower call and one scoring pass (exact (B, N) or ANN) for every query with a known item."""
        batch = self.prepare(queries)
        if batch.rows:
            u_BD = self.fuse_user_features(self.runner(np.stack(batch.rows)),
                                           [queries[i].user_id for i in batch.model_q])
            t2 = time.perf_counter()
            if self.ann is not None:  # k_search: enough that k_max remain once the excluded are dropped
                scores_BK, idx_BK = drop_excluded(*self.ann.search(u_BD, batch.k_search), batch.k_max, batch.seen_B)
            else:
                scores_BK, idx_BK = self._exact_topk(u_BD, batch.k_max, batch.seen_B)
            batch.stamps += [t2, time.perf_counter()]
            return self.finish(batch, u_BD, scores_BK, idx_BK)
        return self.finish(batch, None, [], [])

    def prepare(self, queries: Sequence["RecommendQuery"]) -> "PreparedBatch":
        """The Python half before the tower: item rows of each query's history (or popularity, none known)."""
        live = self.live.current
        batch = PreparedBatch(queries, [time.perf_counter()], live, out=[None] * len(queries))
        for i, q in enumerate(queries):
            known = self._known_rows(q.history)  # looked up once: the tower's rows and the items to exclude
            if not known:
                batch.out[i] = self._popular(q)  # no known item
            else:
                batch.rows.append(self._padded(known))
                batch.model_q.append(i)
                # Item indices (rows - 1) the query must not get back: its whole history, when exclude_seen;
                # build-time items deleted or replaced since the build are excluded from every query too.
                seen = list({r - 1 for r in known}) if q.exclude_seen else []
                batch.seen_B.append([*seen, *live.deleted] if live.deleted else seen)
        if batch.model_q:
            batch.k_max = max(queries[i].k for i in batch.model_q)
            # What a search must return so that k_max remain once the excluded are dropped
            batch.k_search = min(batch.k_max + max(len(s) for s in batch.seen_B), self.items_ND.shape[0])
        batch.stamps.append(time.perf_counter())
        return batch

    def finish(self, batch: "PreparedBatch", u_BD: np.ndarray | None, scores_BK: list[list[float]],
               idx_BK: list[list[int]]) -> list[Ranked]:
        """The Python half after the search: ids and scores per query (k of them, excluded ones dropped), merged
        with the items upserted since the build. batch.stamps must hold the tower's and the search's ends."""
        queries, live = batch.queries, batch.live
        id_of = self.vocab.ids.__getitem__  # indices come from this engine's own items (< n_items): no bounds check
        for b, i in enumerate(batch.model_q):
            q = queries[i]
            scores = scores_BK[b][:q.k]
            if scores and scores[-1] == NEG_INF:  # rows are sorted: excluded or missing (-inf) ones are last
                scores = [s for s in scores if s != NEG_INF]
            items = list(map(id_of, idx_BK[b][:len(scores)]))  # C-level loop: ~100 ids a query
            if live.ids:
                scores, items = merge_topk(scores, items, live, torch.from_numpy(u_BD[b]), q.k,
                                           set(q.history) if q.exclude_seen else set())
            batch.out[i] = Ranked(items, scores, "model")
        if self.clock is not None:
            t0, t1, *rest = batch.stamps
            stamps = (t0, t1, *rest) if rest else (t0, t1, t1, t1)  # no query used the model: no tower, no search
            self.clock.add((*stamps, time.perf_counter()), len(queries))
        return batch.out  # type: ignore[return-value]

    def _exact_topk(self, u_BD: np.ndarray, k: int, seen_B: list) -> tuple[list[list[float]], list[list[int]]]:
        exclude_BN = None
        if any(seen_B):
            exclude_BN = torch.zeros(len(seen_B), self.items_ND.shape[0], dtype=torch.bool)
            for b, seen in enumerate(seen_B):
                if seen:
                    exclude_BN[b, torch.as_tensor(seen, dtype=torch.long)] = True
        scores_BK, idx_BK = topk_cosine_reference(torch.from_numpy(u_BD), self.items_ND, k, items_normalized=True,
                                                  exclude_BN=exclude_BN)
        return scores_BK.tolist(), idx_BK.tolist()

    def search(self, u_BD: np.ndarray, k_search: int) -> tuple[np.ndarray, np.ndarray]:
        """The k_search best items of each row, nothing excluded: (scores (B, K) float32, item indices (B, K) int64,
        -1 where the index found fewer). The index's search, or an exact scan without one."""
        if self.ann is not None:
            return self.ann.search(u_BD, k_search)
        scores_BK, idx_BK = topk_cosine_reference(torch.from_numpy(u_BD), self.items_ND, k_search,
                                                  items_normalized=True)
        return scores_BK.numpy(), idx_BK.numpy()

    def score(self, history: Sequence[str], candidates: Sequence[str],
              user_id: str = "") -> tuple[list[float], list[str], str]:
        """Scores in the candidates' order (NaN for ids this engine does not serve: unknown, or deleted since the
        build), the unknown ids, and the source. Live items (upserted since the build) score by their vectors."""
        live = self.live.current
        base = [self._base_index(c) for c in candidates]  # build-time item index, or None
        if live.deleted:
            base = [None if b in live.deleted else b for b in base]
        at_live = [live.row_of.get(c) for c in candidates] if live.ids else [None] * len(candidates)
        unknown = [c for c, b, r in zip(candidates, base, at_live) if b is None and r is None]
        u_1D = self._user_vector(history, user_id)
        if u_1D is None:
            pop = dict(zip(self.popularity_ids, self.popularity_scores))
            return ([float("nan") if b is None and r is None else pop.get(c, 0.0)
                     for c, b, r in zip(candidates, base, at_live)], unknown, "popularity")
        scores = [float("nan")] * len(candidates)
        for rows, matrix in ((base, self.items_ND), (at_live, live.vecs_MD)):
            at = [j for j, row in enumerate(rows) if row is not None]
            if at:
                got = (matrix[torch.tensor([rows[j] for j in at], dtype=torch.long)] @ u_1D[0]).tolist()
                for j, v in zip(at, got):
                    scores[j] = v
        return scores, unknown, "model"
