"""Export a feature model's item feature encoder into an engine (contracts/engine_format/item_encoder.py): the
feature-only item vector the model gives an item with no id row, as a torch.export program with a dynamic item
count, plus its FeatureConfig and golden records. Checked against eager torch before the engine is published."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from contracts.engine_format.item_encoder import ItemEncoder, golden_records
from contracts.engine_format.item_features import feature_config_json, featurize
from contracts.registry import ITEM_ENCODER_FILE, ITEM_ENCODER_META
from trainer.features import FeatureTwoTower

MAX_ITEMS_PER_CALL = 1 << 16


class ItemEncoderExport(nn.Module):
    """(cat_NC, text_NW, num_NF, present_NF) -> (N, out_dim) L2-normalised: item_proj of the feature embedding."""

    def __init__(self, model: FeatureTwoTower) -> None:
        super().__init__()
        self.model = model

    def forward(self, cat_NC, text_NW, num_NF, present_NF):
        return F.normalize(self.model.item_proj(self.model.features(cat_NC, text_NW, num_NF, present_NF)), dim=-1)


def export_item_encoder(model: FeatureTwoTower, staging: Path) -> float:
    """Write ITEM_ENCODER_FILE and ITEM_ENCODER_META into staging; the exported program's max abs diff from
    eager torch on the golden records."""
    module = ItemEncoderExport(model).eval()
    records = golden_records()
    inputs = tuple(featurize(records, model.feat_cfg))
    n = torch.export.Dim("n_items", min=1, max=MAX_ITEMS_PER_CALL)
    with torch.no_grad():
        program = torch.export.export(module, inputs, dynamic_shapes=tuple({0: n} for _ in inputs))
        want_ND = module(*inputs)
    torch.export.save(program, str(staging / ITEM_ENCODER_FILE))
    (staging / ITEM_ENCODER_META).write_text(json.dumps({
        "features": feature_config_json(model.feat_cfg),
        "golden": {"records": [r.to_dict() for r in records], "vectors": want_ND.tolist()}}))
    return ItemEncoder.load(staging / ITEM_ENCODER_FILE, staging / ITEM_ENCODER_META).golden_max_abs_diff()
