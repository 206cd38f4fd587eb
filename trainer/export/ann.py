"""Retrieval for large catalogues, chosen by measurement at engine build.

Every candidate method (exact scan, HNSW with a few build settings, IVF-Flat, an int8 scan and a 4-bit fast
scan, both with exact re-ranking) is tuned on real users' query embeddings to its cheapest search setting
that reaches the target recall@k against exact search, then timed at the serving batch sizes with the
serving thread count; the cheapest qualifying method wins. Timed as it is served: given the engine's own
user tower, each search follows a tower call on real histories, and a method's cost is that pair's minus
the tower's alone. An index evicts the tower's working set from the cache between queries (a 4-bit scan of
97k items streams 3 MB through a 2 MB L2: the tower took 0.39 instead of 0.27 ms), so a search timed alone,
warm, is not what serving pays. Queries held out from tuning measure the winner's recall again (and are
stored for the server's check at load). A child engine first tries its parent's choice (same method and
build settings, search setting re-tuned) and measures everything again only when that misses the target.
An IVF child starts its k-means from the parent's centroids (a lineage's items move little between
engines), a few iterations instead of a fresh run from random items: a trainer's build beside the server is
mostly this training.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import numpy as np

from contracts.engine_format.item_index import (KINDS, ItemIndex, SearchSettings, exact_topk, recall_at_k,
                                             set_search_threads)

if TYPE_CHECKING:  # torch is imported where it is used: config modules import this one, and the train command sets
    import torch    # the OpenMP wait policy before torch loads libgomp (trainer/priority.py)

__all__ = ["AnnOptions", "RetrievalChoice", "choose_retrieval", "exact_topk", "recall_at_k"]

TowerCall = Callable[[int], object]  # tower(batch): the engine's user tower on the next `batch` real histories


@dataclass(kw_only=True, frozen=True, slots=True)
class AnnOptions:
    min_items: int = 50_000           # measure and choose for catalogues at least this large; smaller: exact scan
    k: int = 100                      # recall is measured at this k (the serving k of the SLO)
    target_recall: float = 0.95       # a method qualifies at its cheapest setting reaching this recall@k...
    tuning_margin: float = 0.005      # ...plus this on the tuning queries, so that the held-out queries (and the
                                      # server's check at load) see the target too, not just under it
    methods: tuple[str, ...] = KINDS  # candidates: "exact", "hnsw", "ivf", "sq8" (contracts/engine_format/item_index.py)
    hnsw_builds: tuple[tuple[int, int], ...] = ((16, 128), (32, 128), (32, 256))  # (M, efConstruction) built
    ef_search_candidates: tuple[int, ...] = (64, 96, 128, 192, 256, 384, 512, 768, 1024)  # HNSW, cheapest first
    ivf_lists_per_sqrt_n: float = 4.0  # IVF-Flat: nlist = this x sqrt(items)
    nprobe_candidates: tuple[int, ...] = (4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)  # IVF, cheapest first
    k_factor_candidates: tuple[float, ...] = (1.5, 2.0, 4.0, 8.0, 16.0)  # sq8/pq4: candidates re-ranked per result
    batch_sizes: tuple[int, ...] = (1, 8)  # serving batch sizes timed; a method's cost is the mean per query
    time_per_measure_s: float = 0.25  # wall time of one (method, batch size) timing
    threads: int = 2                  # FAISS threads while building and tuning
    time_beside_tower: bool = True    # time each search right after the engine's user tower (as served: the index
                                      # evicts the tower's working set), cost = pair - tower alone; False: alone
    serving_threads: int = 1          # threads while timing: as the server searches (EngineManagerConfig.num_threads)
    check_fraction: float = 0.3       # share of the queries held out from tuning (recall re-measured, stored)
    ivf_warm_iterations: int | None = 2  # IVF child of an IVF parent: k-means iterations started from the parent's
                                      # centroids (a fresh IVF runs 10 from random items; 97k items, nlist 1247:
                                      # 0.5 s vs 2.5 s, same recall); 0: the parent's centroids as they are; None:
                                      # train afresh. The child still has to reach the target, or all is measured

    def __post_init__(self) -> None:
        if self.min_items < 1 or self.k < 1:
            raise ValueError("AnnOptions.min_items and AnnOptions.k must be >= 1")
        if not 0 < self.target_recall <= 1:
            raise ValueError(f"AnnOptions.target_recall must be in (0, 1], got {self.target_recall}")
        if not self.methods or not set(self.methods) <= set(KINDS):
            raise ValueError(f"AnnOptions.methods must be a non-empty subset of {KINDS}, got {self.methods}")
        if any(m < 4 or efc < 1 for m, efc in self.hnsw_builds):
            raise ValueError(f"AnnOptions.hnsw_builds: M must be >= 4 and efConstruction >= 1, got {self.hnsw_builds}")
        for name in ("ef_search_candidates", "nprobe_candidates", "k_factor_candidates", "batch_sizes"):
            if not getattr(self, name):
                raise ValueError(f"AnnOptions.{name} must not be empty")
        if not 0 <= self.tuning_margin < 1 - self.target_recall + 1e-9:
            raise ValueError(f"AnnOptions.tuning_margin must be in [0, 1 - target_recall], got {self.tuning_margin}")
        if not 0 < self.check_fraction < 1:
            raise ValueError(f"AnnOptions.check_fraction must be in (0, 1), got {self.check_fraction}")
        if self.ivf_warm_iterations is not None and self.ivf_warm_iterations < 0:
            raise ValueError(f"AnnOptions.ivf_warm_iterations must be None or >= 0, got {self.ivf_warm_iterations}")


@dataclass(slots=True)
class RetrievalChoice:
    index: object | None      # the FAISS index to save (None: exact search)
    meta: dict                # ann.json: the choice, its settings and recall, every candidate measured
    check_queries_QD: np.ndarray  # held-out query embeddings, stored for the check at load
    check_exact_QK: np.ndarray | None  # their exact top-k item rows (None: exact search won, nothing to check)


@dataclass(slots=True)
class _Candidate:
    name: str
    index: object | None
    build: dict               # build settings (M, efConstruction, nlist)
    build_s: float
    settings: SearchSettings | None = None  # cheapest qualifying search setting (None: none qualified)
    recall: float = 0.0       # recall@k on the tuning queries at that setting (best seen when none qualified)
    cost_us: dict = field(default_factory=dict)  # batch size -> microseconds per query
    trained: str = "fresh"    # how the index was trained: "fresh", or "from the parent's centroids (N iterations)"

    def summary(self) -> dict:
        return {"name": self.name, "build": self.build, "build_seconds": round(self.build_s, 2),
                "trained": self.trained, "settings": self.settings.to_meta() if self.settings else None,
                "recall_at_k": self.recall,
                "qualified": self.settings is not None, "us_per_query": self.cost_us,
                "mean_us_per_query": _mean_cost(self.cost_us)}


def _mean_cost(cost_us: dict) -> float | None:
    return float(np.mean(list(cost_us.values()))) if cost_us else None


def _build(kind: str, build: dict, items_ND: np.ndarray, warm_LD: np.ndarray | None = None, warm_iterations: int = 0):
    """The index, trained and filled. warm_LD: an IVF's starting centroids (its quantizer is then trained by
    `warm_iterations` k-means iterations from them, not from random items)."""
    import faiss

    D = items_ND.shape[1]
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(D, build["M"], faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = build["ef_construction"]
    elif kind == "ivf":
        index = faiss.index_factory(D, f"IVF{build['nlist']},Flat", faiss.METRIC_INNER_PRODUCT)
        if warm_LD is not None:  # a trained quantizer holding nlist centroids: index.train below skips it
            warm_LD = np.ascontiguousarray(warm_LD, dtype=np.float32)
            if warm_iterations:  # FAISS's k-means keeps centroids it is given as its starting point
                clus = faiss.Clustering(D, build["nlist"], index.cp)
                clus.niter = warm_iterations
                faiss.copy_array_to_vector(warm_LD.ravel(), clus.centroids)
                clus.train(items_ND, index.quantizer)  # leaves the final centroids in the quantizer
            else:
                index.quantizer.add(warm_LD)
    elif kind == "pq4":  # m sub-vectors of D/m dims, 4 bits each, scanned with SIMD lookups (FAISS fast scan)
        index = faiss.index_factory(D, f"PQ{build['m']}x4fs,RFlat", faiss.METRIC_INNER_PRODUCT)
    else:  # sq8
        index = faiss.index_factory(D, "SQ8,RFlat", faiss.METRIC_INNER_PRODUCT)
    index.train(items_ND)
    index.add(items_ND)
    return index


def _settings(kind: str, value) -> SearchSettings:
    key = {"hnsw": "ef_search", "ivf": "nprobe", "sq8": "k_factor", "pq4": "k_factor"}[kind]
    return SearchSettings(kind=kind, **{key: value})


def _tune(cand: _Candidate, kind: str, values, queries_QD, exact_QK, opts: AnnOptions, progress) -> None:
    """Cheapest search setting reaching the target recall (settings are tried cheapest first)."""
    k = exact_QK.shape[1]
    for value in values:
        s = _settings(kind, max(value, k) if kind == "hnsw" else value)
        recall = recall_at_k(ItemIndex(cand.index, s, opts.threads).search(queries_QD, k)[1], exact_QK)
        progress(f"retrieval {cand.name} {s.to_meta()}: recall@{k} {recall:.4f}")
        cand.recall = max(cand.recall, recall)
        if recall >= opts.target_recall + opts.tuning_margin:
            cand.settings, cand.recall = s, recall
            return


def _time_per_query_us(search: Callable[[np.ndarray], object], queries_QD: np.ndarray, batch: int,
                       seconds: float, tower: TowerCall | None = None) -> float:
    """Microseconds per query over repeated searches of `batch` queries, cycling through the queries; with
    `tower`, each search follows a tower call of the same batch size, timed with it."""
    search(queries_QD[:batch])  # warm-up (lazy allocations)
    done, start, t0 = 0, 0, time.perf_counter()
    while True:
        q = queries_QD[start:start + batch]
        if len(q) < batch:
            start, q = 0, queries_QD[:batch]
        if tower is not None:
            tower(batch)
        search(q)
        done += len(q)
        start += batch
        if time.perf_counter() - t0 >= seconds:
            return (time.perf_counter() - t0) / done * 1e6


def _no_search(q: np.ndarray) -> None:
    return None


def _time(cand: _Candidate, items_t: torch.Tensor, queries_QD: np.ndarray, k: int, opts: AnnOptions,
          tower: TowerCall | None = None, tower_us: dict | None = None) -> None:
    """cand.cost_us: per batch size, microseconds per query; with `tower`, (tower + search) minus tower_us."""
    if cand.settings is None:
        return
    if cand.settings.kind == "exact":  # the server's exact path: torch matmul + top-k
        import torch

        from kernels.retrieval import topk_cosine_reference

        def search(q):
            return topk_cosine_reference(torch.from_numpy(q), items_t, k, items_normalized=True)
    else:
        ix = ItemIndex(cand.index, cand.settings, opts.serving_threads)

        def search(q):
            return ix.search(q, k)
    with _serving_threads(opts):
        cand.cost_us = {}
        for b in opts.batch_sizes:
            pair_us = _time_per_query_us(search, queries_QD, b, opts.time_per_measure_s, tower)
            cand.cost_us[str(b)] = round(max(0.0, pair_us - (tower_us[str(b)] if tower is not None else 0.0)), 2)


def _tower_us(tower: TowerCall, queries_QD: np.ndarray, opts: AnnOptions) -> dict:
    """Per batch size, microseconds per query of the tower alone (the part of a timed pair that is not the search)."""
    with _serving_threads(opts):
        return {str(b): round(_time_per_query_us(_no_search, queries_QD, b, opts.time_per_measure_s, tower), 2)
                for b in opts.batch_sizes}


@contextmanager
def _serving_threads(opts: AnnOptions):
    import torch

    torch_threads = torch.get_num_threads()
    torch.set_num_threads(opts.serving_threads)
    set_search_threads(opts.serving_threads)
    try:
        yield
    finally:
        torch.set_num_threads(torch_threads)
        set_search_threads(opts.threads)


def _candidate(kind: str, build: dict, items_ND, tune_QD, exact_QK, opts: AnnOptions, progress,
               warm_LD: np.ndarray | None = None) -> _Candidate:
    if kind == "exact":
        return _Candidate("exact", None, {}, 0.0, SearchSettings(kind="exact"), 1.0)
    t0 = time.perf_counter()
    warm = warm_LD is not None and opts.ivf_warm_iterations is not None
    index = _build(kind, build, items_ND, warm_LD if warm else None, opts.ivf_warm_iterations or 0)
    name = kind + "".join(f" {k}={v}" for k, v in build.items())
    trained = f"from the parent's centroids ({opts.ivf_warm_iterations} iterations)" if warm else "fresh"
    cand = _Candidate(name, index, build, time.perf_counter() - t0, trained=trained)
    progress(f"retrieval {name}: built in {cand.build_s:.1f}s ({trained})")
    values = {"hnsw": opts.ef_search_candidates, "ivf": opts.nprobe_candidates,
              "sq8": opts.k_factor_candidates, "pq4": opts.k_factor_candidates}[kind]
    if kind == "ivf":
        values = sorted({min(v, build["nlist"]) for v in values})  # beyond nlist: every list
    _tune(cand, kind, values, tune_QD, exact_QK, opts, progress)
    return cand


def _builds(kind: str, n_items: int, dim: int, opts: AnnOptions) -> list[dict]:
    if kind == "pq4":  # one and two dimensions per 4-bit code (finer codes: better recall, a longer scan)
        return [{"m": m} for m in (dim, dim // 2) if m >= 1 and dim % m == 0]
    if kind == "hnsw":
        return [{"M": m, "ef_construction": efc} for m, efc in opts.hnsw_builds]
    if kind == "ivf":  # FAISS wants >= 39 training points per list
        return [{"nlist": max(1, min(int(opts.ivf_lists_per_sqrt_n * math.sqrt(n_items)), n_items // 39))}]
    return [{}]


def choose_retrieval(items_ND: np.ndarray, queries_QD: np.ndarray, opts: AnnOptions, *,
                     previous: dict | None = None, parent_centroids_LD: np.ndarray | None = None,
                     tower: TowerCall | None = None, progress: Callable[[str], None] = print) -> RetrievalChoice:
    """Measure the candidates on these queries (L2-normalised user embeddings) and pick the cheapest one that
    reaches opts.target_recall. previous: the parent engine's ann.json; its method is tried alone first.
    parent_centroids_LD: the parent's IVF centroids (nlist, D), where its choice is IVF: the child's k-means
    starts from them (opts.ivf_warm_iterations). tower: the engine's compiled user tower on real histories
    (TowerCall): each candidate is timed right after it, as served; None: searches timed alone."""
    import torch

    set_search_threads(opts.threads)  # OpenMP's count is per thread: the build's threads on this one
    t0 = time.perf_counter()
    items_ND = np.ascontiguousarray(items_ND, dtype=np.float32)
    queries_QD = np.ascontiguousarray(queries_QD, dtype=np.float32)
    n_check = max(1, int(len(queries_QD) * opts.check_fraction))
    tune_QD, check_QD = queries_QD[:-n_check], queries_QD[-n_check:]
    k = min(opts.k, len(items_ND))
    exact_QK = exact_topk(tune_QD, items_ND, k)
    items_t = torch.from_numpy(items_ND)
    tower_us = _tower_us(tower, tune_QD, opts) if tower is not None else None
    if tower_us is not None:
        progress(f"retrieval: timed beside the user tower ({tower_us} us/query alone)")

    def measure(plan: list[tuple[str, dict]], warm_LD: np.ndarray | None = None) -> list[_Candidate]:
        cands = [_candidate(kind, build, items_ND, tune_QD, exact_QK, opts, progress, warm_LD) for kind, build in plan]
        for c in cands:
            _time(c, items_t, tune_QD, k, opts, tower, tower_us)
            progress(f"retrieval {c.name}: recall@{k} {c.recall:.4f}, us/query {c.cost_us or 'n/a (below target)'}")
        return cands

    reused = False
    cands: list[_Candidate] = []
    if previous and previous.get("kind") in opts.methods:
        build = previous.get("build", {})
        fits = parent_centroids_LD is not None and parent_centroids_LD.shape == (build.get("nlist"), items_ND.shape[1])
        warm = parent_centroids_LD if previous["kind"] == "ivf" and fits else None
        cands = measure([(previous["kind"], build)], warm)
        reused = cands[0].settings is not None
        if not reused:
            progress(f"retrieval: the parent's {previous['kind']} misses recall {opts.target_recall}: measuring all")
    if not reused:
        cands = measure([(kind, b) for kind in opts.methods
                         for b in _builds(kind, len(items_ND), items_ND.shape[1], opts)])
    qualified = [c for c in cands if c.settings is not None]
    if not qualified:  # no index reached the target and exact was not a candidate: the best recall it is
        best = max(cands, key=lambda c: c.recall)
        raise ValueError(f"no retrieval method reached recall@{k} {opts.target_recall} (best: {best.name} "
                         f"{best.recall:.3f}); add 'exact' to AnnOptions.methods or lower target_recall")
    win = min(qualified, key=lambda c: _mean_cost(c.cost_us))
    check_exact_QK = None if win.index is None else exact_topk(check_QD, items_ND, k)
    holdout = 1.0 if win.index is None else recall_at_k(
        ItemIndex(win.index, win.settings, opts.threads).search(check_QD, k)[1], check_exact_QK)
    meta = {**win.settings.to_meta(), "build": win.build, "k": k, "target_recall": opts.target_recall,
            "recall_at_k": win.recall, "recall_holdout": holdout, "us_per_query": win.cost_us,
            "timed_beside_tower": tower_us is not None, "tower_us_per_query": tower_us,
            "reused_parent_choice": reused, "trained": win.trained, "items": len(items_ND),
            "tuning_queries": len(tune_QD), "check_queries": len(check_QD), "serving_threads": opts.serving_threads,
            "seconds": round(time.perf_counter() - t0, 2), "candidates": [c.summary() for c in cands]}
    progress(f"retrieval chosen: {win.name} {win.settings.to_meta()} recall@{k} {win.recall:.4f} "
             f"(held out {holdout:.4f}), {_mean_cost(win.cost_us):.0f} us/query")
    return RetrievalChoice(win.index, meta, check_QD, check_exact_QK)
