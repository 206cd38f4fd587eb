"""Build and publish a serving engine from the trainer's model.

Steps: compile the user tower for the backend into a staging dir; check it against the eager torch
reference on golden inputs (the diff goes into the manifest; over tolerance = no publish); write
the item matrix, item ids and popularity; publish atomically through the registry.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from contracts.atomic import read_file, save_file, write_file
from contracts.catalog import CatalogStore
from contracts.registry import (ANN_CHECK_FILE, ANN_EXACT_FILE, ANN_FILE, ANN_META_FILE, ITEM_IDS_FILE, ITEMS_FILE,
                                POPULARITY_FILE, USER_ENCODER_META, USER_TOWER_FILE, USER_VECTORS_FILE, WEIGHTS_FILE,
                                EngineCorrupt, Registry)
from contracts.signing import ManifestTrust, load_private_key
from proto import livetower_v1_pb2 as pb
from contracts.engine_format.aoti_graphs import GRAPHS
from contracts.engine_format.backends import LIFTED_CONSTANT_PREFIX, UserTowerRunner, load_runner
from contracts.engine_format.item_index import read_meta as read_index_meta
from contracts.engine_format.verify import ParityError, parity_max_abs_diff
from trainer.export.ann import AnnOptions, choose_retrieval
from trainer.export.compile import CompileOptions, compile_user_tower
from trainer.export.item_encoder import export_item_encoder, export_user_encoder, export_user_vectors
from trainer.features import FeatureTwoTower
from trainer.model import TwoTower

log = logging.getLogger("livetower.build")
POPULARITY_TOP = 1000
GOLDEN_BATCH = 4


class BuildFailed(Exception):
    pass


class UserTowerExport(nn.Module):
    """The exported function: left-padded history rows (B, T) -> L2-normalised user embeddings (B, D)."""

    def __init__(self, model: TwoTower) -> None:
        super().__init__()
        self.model = model

    def forward(self, history_BT: torch.Tensor) -> torch.Tensor:
        return self.model.encode_users(history_BT)


@dataclass(kw_only=True, frozen=True, slots=True)
class BuildInfo:
    parent: int                      # version the model was trained from (0: none)
    stream_offsets: dict[str, int]   # source -> next offset to read
    watermark_ms: int                # newest event time trained on
    trained_events: int              # events trained on in total
    eval_metrics: dict[str, float]   # round metrics for the manifest


def architecture_hash(model: TwoTower, backend: str) -> str:
    """Same hash => same compiled graph (names, shapes, dtypes, config, backend, torch version)."""
    shapes = sorted((n, tuple(t.shape), str(t.dtype)) for n, t in
                    [*model.named_parameters(), *model.named_buffers()])
    blob = json.dumps([model.cfg.to_dict(), shapes, backend, torch.__version__], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def golden_histories(n_items: int, T: int, seed: int = 1234) -> torch.Tensor:
    """(GOLDEN_BATCH, T) histories with different lengths (1, T/2, T, random) of real item rows."""
    g = torch.Generator().manual_seed(seed)
    out = torch.zeros(GOLDEN_BATCH, T, dtype=torch.long)
    for b, n in enumerate((1, max(1, T // 2), T, int(torch.randint(1, T + 1, (1,), generator=g)))):
        out[b, T - n:] = torch.randint(1, n_items + 1, (n,), generator=g)
    return out


def trusted_parent(registry: Registry, parent: int, trust: ManifestTrust | None,
                   progress: Callable[[str], None]) -> int:
    """`parent` when it and the graph it runs verify (files, and the signature when `trust` is given), else 0:
    the build then reads nothing of it (no refit of its graph, no start from its retrieval choice) and
    builds in full. A tampered parent must never lend its files, and must not stop publishing either: the
    model comes from the trainer's own state, the parent's files only save time."""
    if not parent or parent not in registry.versions():
        return 0
    try:
        m = registry.verify(parent, trust=trust)
        if m.graph_version:
            registry.verify(int(m.graph_version), trust=trust)
    except EngineCorrupt as e:
        progress(f"parent engine {parent} failed verification ({e}): building in full without its files")
        return 0
    return parent


def user_vectors_source(registry: Registry, parent: int) -> int:
    """The engine whose users' vectors an engine with its parent's user encoder points to: the parent when it
    shipped them, else the one the parent points to (0: none; its servers encode every user)."""
    m = registry.read_manifest(parent)
    return parent if USER_VECTORS_FILE in {f.path for f in m.files} else int(m.user_vectors_version)


def refit_graph_version(registry: Registry, parent: int, arch_hash: str, backend: str) -> int:
    """The version whose compiled AOTI graph can run a model of `arch_hash` (0: none, compile). `parent`
    must be verified (trusted_parent)."""
    if backend != "aoti" or not parent or parent not in registry.versions():
        return 0
    m = registry.read_manifest(parent)
    if m.backend != backend or m.architecture_hash != arch_hash:
        return 0
    return int(m.graph_version or m.version)


def _write_refit_weights(tower: nn.Module, graph_file: Path, out: Path) -> bool:
    """Save the tower's tensors under the compiled graph's constant names; False if some are missing."""
    container, _ = GRAPHS.container(graph_file)
    fqns = [f for f in container.constant_fqns().values()
            if not f.startswith(LIFTED_CONSTANT_PREFIX)]  # literals: the graph keeps its own
    tensors = {**dict(tower.named_parameters()), **dict(tower.named_buffers())}
    if any(f not in tensors for f in fqns):
        return False
    save_file(out, lambda file: torch.save({f: tensors[f].detach().contiguous() for f in fqns}, file))
    return True


def _parity(runner, golden_BT: torch.Tensor, want_BD: np.ndarray) -> float:
    """The engine format's parity check; inf when the outputs cannot be compared (over any tolerance)."""
    try:
        return parity_max_abs_diff(runner, golden_BT.numpy(), want_BD)
    except ParityError:
        return float("inf")


def _try_refit(tower: nn.Module, graph_file: Path, weights: Path, golden_BT: torch.Tensor, want_BD: np.ndarray,
               tolerance: float, graph_version: int,
               progress: Callable[[str], None]) -> tuple[float, UserTowerRunner] | None:
    """Write the refit weights and check them on the compiled graph: (the parity diff, the runner), or None when
    the caller must compile (constants that do not map, or parity over tolerance)."""
    if not _write_refit_weights(tower, graph_file, weights):
        progress("refit impossible (graph constants differ from the model's tensors): compiling")
        return None
    runner = load_runner("aoti", graph_file, weights=weights)
    diff = _parity(runner, golden_BT, want_BD)
    if not diff <= tolerance:
        weights.unlink()
        progress(f"refit of engine {graph_version}'s graph differs from the torch reference by {diff:.3g} "
                 f"(tolerance {tolerance:g}): compiling")
        return None
    progress(f"refit: weights for the compiled graph of engine {graph_version} (no recompile, parity {diff:.2g})")
    return diff, runner


def _choose_retrieval(registry: Registry, parent: int, tower: nn.Module, runner, items_ND: np.ndarray,
                      ann: AnnOptions | None, queries_QT: np.ndarray | None, staging: Path,
                      progress: Callable[[str], None]) -> dict | None:
    """Measure and choose the retrieval method; write items.index (when an index won), ann.json, ann_queries.npy.
    runner: the engine's compiled user tower, run on these histories before each timed search (ann.TowerCall)."""
    if ann is None or queries_QT is None or len(items_ND) < ann.min_items:
        return None
    import faiss

    with torch.no_grad():
        queries_QD = torch.cat([tower(torch.from_numpy(queries_QT[s:s + 256]))
                                for s in range(0, len(queries_QT), 256)]).numpy()
    previous = read_index_meta(registry.engine_dir(parent)) if parent and registry.engine_dir(parent).is_dir() else None
    warm_ivf = previous is not None and previous.get("kind") == "ivf" and ann.ivf_warm_iterations is not None
    centroids = _ivf_centroids(registry.engine_dir(parent) / ANN_FILE) if warm_ivf else None
    rows_QT = np.ascontiguousarray(queries_QT, dtype=np.int64)
    cursor = [0]

    def tower_call(batch: int) -> object:  # the next `batch` histories, cycling, as served batches arrive
        start = cursor[0] if cursor[0] + batch <= len(rows_QT) else 0
        cursor[0] = start + batch
        return runner(rows_QT[start:start + batch])

    choice = choose_retrieval(items_ND, queries_QD, ann, previous=previous, parent_centroids_LD=centroids,
                              tower=tower_call if ann.time_beside_tower and len(rows_QT) >= max(ann.batch_sizes)
                              else None, progress=progress)
    if choice.index is not None:
        write_file(staging / ANN_FILE, faiss.serialize_index(choice.index))
    save_file(staging / ANN_CHECK_FILE, lambda f: np.save(f, choice.check_queries_QD))
    if choice.check_exact_QK is not None:
        save_file(staging / ANN_EXACT_FILE, lambda f: np.save(f, choice.check_exact_QK.astype(np.int32)))
    (staging / ANN_META_FILE).write_text(json.dumps(choice.meta, indent=1))
    return choice.meta


def _ivf_centroids(index_path: Path) -> np.ndarray | None:
    """An IVF index's coarse centroids (nlist, D), or None when the file is missing or holds no IVF. The parent
    was verified (trusted_parent) before its files are read."""
    import faiss

    if not index_path.is_file():
        return None
    # Held in a name: extract_index_ivf's view does not keep the index alive.
    index = faiss.deserialize_index(np.frombuffer(read_file(index_path), dtype=np.uint8))
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:  # not an IVF index
        return None
    return ivf.quantizer.reconstruct_n(0, ivf.nlist)


def _retrieval_metrics(meta: dict | None) -> dict[str, float]:
    if not meta:
        return {}
    k = meta["k"]
    out = {f"ann_recall@{k}": meta["recall_at_k"], f"ann_recall_holdout@{k}": meta["recall_holdout"],
           "retrieval_us_per_query": float(np.mean(list(meta["us_per_query"].values())))}
    if meta["kind"] == "hnsw":
        out["ann_ef_search"] = float(meta["ef_search"])
    return out


def build_engine(model: TwoTower, vocab_ids: list[str], item_counts: np.ndarray, registry: Registry,
                 info: BuildInfo, options: CompileOptions, *, parity_tolerance: float,
                 ann: AnnOptions | None = None, ann_queries_QT: np.ndarray | None = None,
                 refit: bool = True, signing_key: Path | None = None, user_catalog: CatalogStore | None = None,
                 progress: Callable[[str], None] = log.info) -> pb.EngineManifest:
    """ann + ann_queries_QT (real users' histories, left-padded rows): for a catalogue of at least
    ann.min_items items, choose the retrieval method by measurement on those users' embeddings (trainer/export/
    ann.py), starting from the parent engine's choice; the index (if one won) and ann.json go into the engine.
    refit: when the parent engine has the same architecture hash (aoti), publish only the weights for
    its compiled graph (manifest.graph_version) instead of recompiling. The parent's files are used only
    once it verifies (trusted_parent). signing_key: an Ed25519 private key file; the manifest is signed with
    it and a parent must carry a signature that verifies with it. user_catalog: a model with user features ships
    the catalogue's users' vectors when its user encoder differs from the parent engine's (export_user_vectors)."""
    t0 = time.perf_counter()
    n_items = len(vocab_ids)
    if n_items < 1:
        raise BuildFailed("no items in the vocabulary yet")
    frozen = copy.deepcopy(model).float().eval()
    tower = UserTowerExport(frozen).eval()
    T = frozen.cfg.max_history
    golden_BT = golden_histories(n_items, T)
    arch = architecture_hash(frozen, options.backend)
    key = load_private_key(signing_key) if signing_key is not None else None
    parent = trusted_parent(registry, info.parent, ManifestTrust.of_signer(key) if key else None, progress)
    graph_version = refit_graph_version(registry, parent, arch, options.backend) if refit else 0
    staging = registry.staging_dir()
    try:
        with torch.no_grad():
            want_BD = tower(golden_BT).numpy()
        diff = runner = None
        if graph_version:
            refit = _try_refit(tower, registry.engine_dir(graph_version) / USER_TOWER_FILE[options.backend],
                               staging / WEIGHTS_FILE, golden_BT, want_BD, parity_tolerance, graph_version, progress)
            diff, runner = refit if refit is not None else (None, None)
            graph_version = graph_version if diff is not None else 0
        if diff is None:
            progress(f"building {options.backend} engine: {n_items} items, table {frozen.num_rows} rows")
            compile_user_tower(tower, golden_BT, staging, options, progress=progress)
            runner = load_runner(options.backend, staging / USER_TOWER_FILE[options.backend])
            diff = _parity(runner, golden_BT, want_BD)
            if not diff <= parity_tolerance:
                raise BuildFailed(f"{options.backend} engine differs from the torch reference by {diff:.3g} "
                                  f"(tolerance {parity_tolerance:g}); not publishing")
        with torch.no_grad():
            items_ND = frozen.encode_items(torch.arange(1, n_items + 1)).numpy().astype(np.float32)
        save_file(staging / ITEMS_FILE, lambda f: np.save(f, items_ND))
        # New items get vectors from their features, and users' records feature vectors fused with the tower's,
        # in the server: each encoder the model has is exported and checked against eager torch.
        for side, export in (("item", export_item_encoder if isinstance(frozen, FeatureTwoTower) else None),
                             ("user", export_user_encoder if frozen.user_features is not None else None)):
            if export is None:
                continue
            enc_diff = export(frozen, staging)
            if not enc_diff <= parity_tolerance:
                raise BuildFailed(f"the exported {side} encoder differs from the torch reference by {enc_diff:.3g} "
                                  f"(tolerance {parity_tolerance:g}); not publishing")
            diff = max(diff, enc_diff)
            progress(f"{side} feature encoder exported (parity {enc_diff:.2g})")
        users_from = 0
        if frozen.user_features is not None and user_catalog is not None:
            shipped = export_user_vectors(staging, user_catalog,
                                          registry.engine_dir(parent) / USER_ENCODER_META if parent else None, progress)
            users_from = user_vectors_source(registry, parent) if shipped == -1 else 0
        retrieval = _choose_retrieval(registry, parent, tower, runner, items_ND, ann, ann_queries_QT, staging, progress)
        (staging / ITEM_IDS_FILE).write_text(json.dumps(vocab_ids))
        counts = item_counts[1:n_items + 1].astype(np.float64)
        top = np.argsort(-counts, kind="stable")[:POPULARITY_TOP]
        total = max(counts.sum(), 1.0)
        (staging / POPULARITY_FILE).write_text(json.dumps(
            {"item_ids": [vocab_ids[i] for i in top], "scores": [float(counts[i] / total) for i in top]}))
        manifest = pb.EngineManifest(
            parent=info.parent, architecture_hash=arch, graph_version=graph_version,
            backend=options.backend, item_count=n_items, dim=frozen.cfg.out_dim, max_history=T,
            stream_offsets=info.stream_offsets, watermark_ms=info.watermark_ms,
            eval_metrics={**info.eval_metrics, **_retrieval_metrics(retrieval)},
            retrieval_json=json.dumps(retrieval) if retrieval else "",
            golden=pb.GoldenSet(batch=GOLDEN_BATCH, seq_len=T, dim=frozen.cfg.out_dim,
                                history_rows=golden_BT.flatten().tolist(),
                                user_embeddings=want_BD.flatten().tolist()),
            parity_max_abs_diff=diff, model_config_json=json.dumps(frozen.cfg.to_dict()),
            trained_events=info.trained_events, user_vectors_version=users_from)
        manifest.build_seconds = time.perf_counter() - t0
        version = registry.publish(staging, manifest, signing_key=key)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    how = f"{options.backend}, refit of {graph_version}" if graph_version else options.backend
    progress(f"published engine {version} ({how}, parity {diff:.2g}, {manifest.build_seconds:.1f}s)")
    return manifest
