"""An engine's item index, as the trainer builds it and the server searches it.

The build (trainer/export/ann.py) measures candidate retrieval methods on real users' queries and
records its choice in `ann.json`; when the winner is an index it is saved as `items.index` (FAISS). Exact
search has no index file. The search settings (efSearch, nprobe, re-rank factor) live in `ann.json`, so
a search here is the search that was measured there. `ann_queries.npy` holds query embeddings the index
was not tuned on; the server re-measures recall on them before the engine takes traffic, as it re-checks
parity on the golden inputs.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from contracts.registry import ANN_CHECK_FILE, ANN_EXACT_FILE, ANN_FILE, ANN_META_FILE, LEGACY_ANN_FILE

# sq8: int8 scalar-quantised scan; pq4: 4-bit product-quantised SIMD fast scan; both re-rank the best candidates exactly
KINDS = ("exact", "hnsw", "ivf", "sq8", "pq4")


@dataclass(frozen=True, slots=True)
class SearchSettings:
    kind: str                # one of KINDS
    ef_search: int = 0       # hnsw: beam width of a search (>= results wanted)
    nprobe: int = 0          # ivf: inverted lists visited per query
    k_factor: float = 0.0    # sq8, pq4: candidates re-ranked exactly per result wanted (>= 1)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"SearchSettings.kind must be one of {KINDS}, got {self.kind!r}")

    @classmethod
    def from_meta(cls, meta: dict) -> "SearchSettings":
        """ann.json -> settings; an engine built before the method choice (HNSW only) has no "kind"."""
        kind = meta.get("kind", "hnsw")
        return cls(kind=kind, ef_search=int(meta.get("ef_search", 0)), nprobe=int(meta.get("nprobe", 0)),
                   k_factor=float(meta.get("k_factor", 0.0)))

    def to_meta(self) -> dict:
        return {"kind": self.kind, "ef_search": self.ef_search, "nprobe": self.nprobe, "k_factor": self.k_factor}


def faiss_params(settings: SearchSettings, kk: int):
    """FAISS search parameters for kk results (read-only during a search, so one object serves every thread)."""
    import faiss

    if settings.kind == "hnsw":
        return faiss.SearchParametersHNSW(efSearch=max(settings.ef_search, kk))
    if settings.kind == "ivf":
        return faiss.SearchParametersIVF(nprobe=settings.nprobe)
    if settings.kind in ("sq8", "pq4"):
        return faiss.IndexRefineSearchParameters(k_factor=settings.k_factor)
    raise ValueError(f"exact search has no FAISS parameters (kind {settings.kind!r})")


_THREAD = threading.local()  # .omp_threads: the OpenMP team size this OS thread last set


def set_search_threads(num_threads: int) -> None:
    """OpenMP's thread count is per calling thread (libgomp keeps it in the thread's own ICVs): set on the loading
    thread, it left the server's compute thread at the default (every core), and each search woke an OpenMP
    worker that spun after it. Measured on a 1M-item pq4 engine at 300 QPS: a second `lt-compute` thread at 47 %
    of a core. So every searching thread sets it, once."""
    if getattr(_THREAD, "omp_threads", None) != num_threads:
        import faiss

        faiss.omp_set_num_threads(num_threads)
        _THREAD.omp_threads = num_threads


class ItemIndex:
    """A FAISS index over an engine's items with the search settings chosen at build time."""

    def __init__(self, index, settings: SearchSettings, num_threads: int = 1) -> None:
        self.index, self.settings, self.num_threads = index, settings, num_threads
        self._params: dict[int, object] = {}  # results wanted -> FAISS search parameters

    def search(self, queries_QD: np.ndarray, kk: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores (Q, kk), item indices (Q, kk)); an index of -1 marks a missing result. Searches with
        num_threads OpenMP threads whichever thread calls."""
        set_search_threads(self.num_threads)
        params = self._params.get(kk)
        if params is None:
            params = self._params[kk] = faiss_params(self.settings, kk)
        return self.index.search(np.ascontiguousarray(queries_QD, dtype=np.float32), kk, params=params)


def _present(engine_dir: Path, name: str, listed: frozenset[str] | None) -> bool:
    """listed: the manifest's verified file names; a reader opens only those (None: whatever is on disk)."""
    return name in listed if listed is not None else (Path(engine_dir) / name).is_file()


def read_meta(engine_dir: Path, listed: frozenset[str] | None = None) -> dict | None:
    path = Path(engine_dir) / ANN_META_FILE
    return json.loads(path.read_text()) if _present(engine_dir, ANN_META_FILE, listed) else None


def load_item_index(engine_dir: Path, *, num_threads: int = 1, listed: frozenset[str] | None = None) -> ItemIndex | None:
    """The engine's index, or None when it has none (exact search). listed: see _present."""
    engine_dir = Path(engine_dir)
    meta = read_meta(engine_dir, listed)
    path = next((engine_dir / f for f in (ANN_FILE, LEGACY_ANN_FILE) if _present(engine_dir, f, listed)), None)
    settings = SearchSettings.from_meta(meta) if meta is not None else None
    if settings is None or path is None or settings.kind == "exact":
        return None
    import faiss  # only engines with an index need it

    return ItemIndex(faiss.read_index(str(path)), settings, num_threads)


def exact_topk(queries_QD: np.ndarray, items_ND: np.ndarray, k: int, chunk: int = 256) -> np.ndarray:
    """Exact top-k item indices (Q, k) by inner product (cosine on L2-normalised vectors)."""
    import torch

    items = torch.from_numpy(np.ascontiguousarray(items_ND, dtype=np.float32))
    out = [torch.topk(torch.from_numpy(np.ascontiguousarray(queries_QD[s:s + chunk], dtype=np.float32)) @ items.T,
                      k, dim=1).indices.numpy() for s in range(0, len(queries_QD), chunk)]
    return np.concatenate(out) if out else np.zeros((0, k), dtype=np.int64)


def recall_at_k(found_QK: np.ndarray, exact_QK: np.ndarray) -> float:
    """Share of the exact top-k found (a -1 in found never matches)."""
    hits = sum(len(set(f.tolist()) & set(e.tolist())) for f, e in zip(found_QK, exact_QK))
    return float(hits / max(exact_QK.size, 1))


SPOT_QUERIES = 8  # stored exact answers re-derived at load, so that they are known to come from these items


def check_recall(index: ItemIndex, items_ND: np.ndarray, engine_dir: Path,
                 listed: frozenset[str] | None = None) -> tuple[float, float] | None:
    """(recall@k on the stored held-out queries, the build's target), or None when the engine stored none.
    Against the build's exact answers (ann_exact.npy) where the engine has them, after re-deriving SPOT_QUERIES
    of them from items_ND (ValueError when they disagree); else exact search over every query here."""
    meta, path = read_meta(engine_dir, listed), Path(engine_dir) / ANN_CHECK_FILE
    if meta is None or not _present(engine_dir, ANN_CHECK_FILE, listed):
        return None
    queries_QD = np.load(path, allow_pickle=False)
    k = min(int(meta["k"]), len(items_ND))
    if _present(engine_dir, ANN_EXACT_FILE, listed):
        exact_QK = np.load(Path(engine_dir) / ANN_EXACT_FILE, allow_pickle=False)
        if exact_QK.shape != (len(queries_QD), k):
            raise ValueError(f"{ANN_EXACT_FILE} has shape {exact_QK.shape}, want ({len(queries_QD)}, {k})")
        spot = np.unique(np.linspace(0, len(queries_QD) - 1, min(SPOT_QUERIES, len(queries_QD))).astype(int))
        agree = recall_at_k(exact_topk(queries_QD[spot], items_ND, k), exact_QK[spot])
        if agree < 0.99:  # not 1.0: a float tie at the k-th place may fall either way
            raise ValueError(f"{ANN_EXACT_FILE} does not match the engine's items: the exact top-{k} of "
                             f"{len(spot)} of its queries re-derived at load agree {agree:.3f} (want >= 0.99)")
    else:  # engines built before the exact answers were stored
        exact_QK = exact_topk(queries_QD, items_ND, k)
    recall = recall_at_k(index.search(queries_QD, k)[1], exact_QK)
    return recall, float(meta["target_recall"])
