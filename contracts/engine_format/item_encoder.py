"""An engine's item feature encoder: catalogue records -> L2-normalised item vectors in the engine's item space,
for items no engine has a row for (new or changed in the catalogue). Engines of feature models carry it
(trainer/export/build.py writes it); the server encodes upserted items with it and serves them at once.

Files: ITEM_ENCODER_FILE, a torch.export program of (cat_NC, text_NW, num_NF, present_NF) -> (N, D) with a
dynamic N; ITEM_ENCODER_META, {"features": FeatureConfig as JSON, "golden": {"records": [...], "vectors": [...]}}.
The golden records are re-encoded at load and compared with the vectors the build computed in eager torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from contracts.catalog import CatalogRecord
from contracts.engine_format.item_features import FeatureConfig, feature_config_from_json, featurize


class ItemEncoder:
    def __init__(self, program: torch.export.ExportedProgram, cfg: FeatureConfig, golden: dict) -> None:
        self._module = program.module()
        self.cfg = cfg
        self.golden_records = [CatalogRecord.from_dict(r) for r in golden.get("records", [])]
        self.golden_vectors_ND = np.asarray(golden.get("vectors", []), dtype=np.float32)

    @classmethod
    def load(cls, encoder_file: Path, meta_file: Path) -> "ItemEncoder":
        meta = json.loads(Path(meta_file).read_text())
        return cls(torch.export.load(str(encoder_file)), feature_config_from_json(meta["features"]), meta["golden"])

    def __call__(self, records: Sequence[CatalogRecord]) -> np.ndarray:
        """(N, D) float32, rows L2-normalised; records[i] -> row i."""
        if not records:
            raise ValueError("records must not be empty")
        with torch.inference_mode():
            out = self._module(*featurize(list(records), self.cfg))
        return np.ascontiguousarray(out.numpy(), dtype=np.float32)

    def golden_max_abs_diff(self) -> float:
        if not self.golden_records:
            return 0.0
        return float(np.abs(self(self.golden_records) - self.golden_vectors_ND).max())


def golden_records(n: int = 4) -> list[CatalogRecord]:
    """Records that exercise every input: several categorical values, text with char n-grams, numbers, none."""
    return [CatalogRecord(id="golden-0", categorical={"genre": ("Drama", "Comedy")}, text={"title": "A Golden Film"},
                          numeric={"year": 1995.0}),
            CatalogRecord(id="golden-1", text={"title": "Only text here"}),
            CatalogRecord(id="golden-2", categorical={"genre": ("Horror",)}),
            CatalogRecord(id="golden-3")][:n]
