"""Export a model's feature encoders into an engine (contracts/engine_format/item_encoder.py), each as a
torch.export program with a dynamic record count, plus its FeatureConfig and golden records, checked against
eager torch before the engine is published:
- the item encoder of a feature item tower: the feature-only item vector the model gives an item with no id row;
- the user encoder of a model with user features: the user's feature vector (trainer/user_features.py), and
  the catalogue's users' vectors computed with it (contracts/engine_format/user_vectors.py)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from contracts.catalog import CatalogRecord, CatalogStore, record_from_body
from contracts.engine_format.item_encoder import ItemEncoder, golden_records, golden_user_records
from contracts.engine_format.item_features import FeatureConfig, feature_config_json, featurize
from contracts.engine_format.user_vectors import body_digest, write_user_vectors
from contracts.registry import (ITEM_ENCODER_FILE, ITEM_ENCODER_META, USER_ENCODER_FILE, USER_ENCODER_META,
                                USER_VECTORS_FILE)
from trainer.features import FeatureTwoTower
from trainer.model import TwoTower

MAX_ITEMS_PER_CALL = 1 << 16
USER_VECTORS_BATCH = 4096  # records per encoder call when shipping users' vectors


class ItemEncoderExport(nn.Module):
    """(cat_NC, text_NW, num_NF, present_NF) -> (N, out_dim) L2-normalised: item_proj of the feature embedding."""

    def __init__(self, model: FeatureTwoTower) -> None:
        super().__init__()
        self.model = model

    def forward(self, cat_NC, text_NW, num_NF, present_NF):
        return F.normalize(self.model.item_proj(self.model.features(cat_NC, text_NW, num_NF, present_NF)), dim=-1)


def _export_encoder(module: nn.Module, cfg: FeatureConfig, records: Sequence[CatalogRecord], staging: Path,
                    file: str, meta: str) -> float:
    """Write `file` (the program) and `meta` into staging; the program's max abs diff from eager torch on the
    golden records."""
    module = module.eval()
    inputs = tuple(featurize(list(records), cfg))
    n = torch.export.Dim("n_records", min=1, max=MAX_ITEMS_PER_CALL)
    with torch.no_grad():
        program = torch.export.export(module, inputs, dynamic_shapes=tuple({0: n} for _ in inputs))
        want_ND = module(*inputs)
    torch.export.save(program, str(staging / file))
    (staging / meta).write_text(json.dumps({
        "features": feature_config_json(cfg), "weights_sha256": weights_sha256(module, cfg),
        "golden": {"records": [r.to_dict() for r in records], "vectors": want_ND.tolist()}}))
    return ItemEncoder.load(staging / file, staging / meta).golden_max_abs_diff()


def weights_sha256(module: nn.Module, cfg: FeatureConfig) -> str:
    """A hash of the encoder as a function: its config and every tensor of its state dict (names, dtypes, shapes,
    bytes). The server shares users' vectors between engines whose user encoders hash alike."""
    h = hashlib.sha256(json.dumps(feature_config_json(cfg), sort_keys=True).encode())
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def export_item_encoder(model: FeatureTwoTower, staging: Path) -> float:
    """ITEM_ENCODER_FILE and ITEM_ENCODER_META; the max abs diff from eager torch."""
    return _export_encoder(ItemEncoderExport(model), model.feat_cfg, golden_records(), staging, ITEM_ENCODER_FILE,
                           ITEM_ENCODER_META)


def export_user_encoder(model: TwoTower, staging: Path) -> float:
    """USER_ENCODER_FILE and USER_ENCODER_META (the model has user features); the max abs diff from eager torch."""
    table = model.user_features
    return _export_encoder(table.encoder, table.cfg, golden_user_records(), staging, USER_ENCODER_FILE,
                           USER_ENCODER_META)


def export_user_vectors(staging: Path, catalog: CatalogStore, parent_encoder_meta: Path | None,
                        progress: Callable[[str], None]) -> int:
    """USER_VECTORS_FILE: the catalogue's live user records encoded by the staged (exported, parity-checked) user
    encoder, the program the server runs. Skipped (returns -1) when the parent engine's user encoder hashes alike:
    a short round's refit keeps its full round's encoder, and servers share that table in memory, so only the
    engines that change the encoder ship one (1M users: ~256 MB at D=64). Returns the number of users shipped."""
    encoder = ItemEncoder.load(staging / USER_ENCODER_FILE, staging / USER_ENCODER_META)
    if parent_encoder_meta is not None and parent_encoder_meta.is_file() and \
            json.loads(parent_encoder_meta.read_text()).get("weights_sha256") == encoder.weights_key:
        return -1
    version, rows = catalog.live_bodies("user")
    if not rows:
        return 0
    vecs_ND: np.ndarray | None = None
    report = max(len(rows) // 10, USER_VECTORS_BATCH)
    for s in range(0, len(rows), USER_VECTORS_BATCH):
        chunk = rows[s:s + USER_VECTORS_BATCH]
        out_ND = encoder([record_from_body("user", rid, body) for rid, body in chunk])
        if vecs_ND is None:
            vecs_ND = np.empty((len(rows), out_ND.shape[1]), np.float32)
        vecs_ND[s:s + len(chunk)] = out_ND
        if (s + len(chunk)) // report != s // report and s + len(chunk) < len(rows):
            progress(f"users' feature vectors: {s + len(chunk):,} of {len(rows):,} encoded")
    digests_N = np.fromiter((body_digest(body) for _, body in rows), dtype=np.uint64, count=len(rows))
    write_user_vectors(staging / USER_VECTORS_FILE, [rid for rid, _ in rows], digests_N, vecs_ND, encoder.weights_key)
    progress(f"users' feature vectors shipped: {len(rows):,} users (catalogue version {version})")
    return len(rows)
