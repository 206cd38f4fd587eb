"""An engine's feature encoders: catalogue records -> vectors.

- The item encoder: L2-normalised item vectors in the engine's item space, for items no engine has a row for
  (new or changed in the catalogue). Engines of item-feature models carry it (trainer/export/build.py writes it);
  the server encodes upserted items with it and serves them at once.
- The user encoder (same file layout, USER_ENCODER_FILE / USER_ENCODER_META): a user record -> the user's
  feature vector (not normalised), which the server adds to the user tower's output and renormalises
  (`fuse_user_vectors`, trainer/model.py's fuse_user_features in numpy).

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


def fuse_user_vectors(u_BD: np.ndarray, f_BD: np.ndarray) -> np.ndarray:
    """(B, D) user vectors with features: the tower's normalised output plus the feature vectors, renormalised
    (a zero feature row leaves the tower's vector as it is, up to rounding)."""
    x_BD = u_BD + f_BD
    return np.ascontiguousarray(x_BD / np.maximum(np.linalg.norm(x_BD, axis=-1, keepdims=True), 1e-12),
                                dtype=np.float32)


class ItemEncoder:
    def __init__(self, program: torch.export.ExportedProgram, cfg: FeatureConfig, golden: dict,
                 weights_key: str | None = None) -> None:
        self._module = program.module()
        self.cfg = cfg
        self.weights_key = weights_key  # the build's hash of the config and weights: equal = the same function
        self.golden_records = [CatalogRecord.from_dict(r) for r in golden.get("records", [])]
        self.golden_vectors_ND = np.asarray(golden.get("vectors", []), dtype=np.float32)

    @classmethod
    def load(cls, encoder_file: Path, meta_file: Path) -> "ItemEncoder":
        meta = json.loads(Path(meta_file).read_text())
        return cls(torch.export.load(str(encoder_file)), feature_config_from_json(meta["features"]), meta["golden"],
                   meta.get("weights_sha256"))

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


def golden_user_records(n: int = 3) -> list[CatalogRecord]:
    """User records over every input kind (ml-100k's u.user shape plus text), and one with none."""
    return [CatalogRecord(id="golden-u0", kind="user", categorical={"gender": ("F",), "occupation": ("writer",)},
                          numeric={"age": 31.0}, text={"bio": "likes film noir"}),
            CatalogRecord(id="golden-u1", kind="user", categorical={"zip3": ("940",)}),
            CatalogRecord(id="golden-u2", kind="user")][:n]
