"""Item side features in the item tower: hashing, the feature encoder, and how it combines with the id embedding.

nanoGPT style: plain torch math, shapes in the names. N items, C categorical slots, W text tokens, F numeric
features, D the tower's dim, R table rows.

1. `featurize` (plain Python, no torch graph): catalogue records -> integer tensors. Every categorical
   (name, value) pair and every text token (a lower-cased word, and each char n-gram of the word with `#`
   boundary marks, both keyed by the feature name) is hashed with BLAKE2b into a fixed vocabulary:
   `cat_buckets` / `text_buckets` rows, row 0 = padding. Hashing needs no vocabulary file and takes unseen
   values (a new item's title words) without growing anything; colliding pairs share a row. Numeric features
   are passed raw with a presence mask. Stable across processes (Python's hash() is salted; BLAKE2b is not),
   so a server that hashes the same way gets the same rows.
2. `FeatureEncoder` (tensors in, tensors out; no data-dependent control flow, so torch.export takes it):
   categorical multi-hot = mean of EmbeddingBag rows, text = mean of EmbeddingBag rows, numeric standardised
   with the catalogue's mean/std (buffers) and projected with its presence mask; the three summed, then a
   residual SiLU MLP: (N, D).
3. `combine_item_embedding`: item vector = has_id * id_embedding + feature_embedding. An item with a trained
   id row gets both; an item without one (new, cold) gets the feature embedding alone. Training drops the
   id part of each item occurrence with probability `id_dropout` (as DropoutNet, Volkovs et al. 2017), so
   the feature-only vector is trained to stand alone in the same space.
4. `FeatureTwoTower`: trainer/model.py's TwoTower with that item tower (the user tower unchanged: the history
   is embedded from the id table as before). It holds every row's feature tensors as buffers, so
   `encode_items(rows)` keeps TwoTower's signature and the offline training and evaluation code runs as is.

The hashing (step 1) lives in contracts/engine_format/item_features.py: the server encodes upserted items with
the same code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from contracts.engine_format.item_features import PAD_BUCKET, FeatureConfig, FeatureTensors
from trainer.model import PAD_ROW, TwoTower
from trainer.model_config import INIT_STD, ModelConfig

# ---- 2. the encoder ----

class FeatureEncoder(nn.Module):
    """(cat_NC, text_NW, num_NF, present_NF) -> (N, D) feature embedding."""

    def __init__(self, cfg: FeatureConfig):
        super().__init__()
        self.cfg = cfg
        D, Fn = cfg.dim, len(cfg.numeric)
        self.cat_bag = nn.EmbeddingBag(cfg.cat_buckets, D, mode="mean", padding_idx=PAD_BUCKET)
        self.text_bag = nn.EmbeddingBag(cfg.text_buckets, D, mode="mean", padding_idx=PAD_BUCKET)
        self.num_proj = nn.Linear(2 * Fn, D) if Fn else None  # [standardised values, presence] -> D
        self.register_buffer("num_mean_F", torch.zeros(Fn))
        self.register_buffer("num_std_F", torch.ones(Fn))
        self.mlp_in = nn.Linear(D, 2 * D)
        self.mlp_out = nn.Linear(2 * D, D)
        for m in (self.cat_bag, self.text_bag):
            nn.init.normal_(m.weight, std=INIT_STD)
            with torch.no_grad():
                m.weight[PAD_BUCKET].zero_()
        for m in (self.num_proj, self.mlp_in, self.mlp_out):
            if m is not None:
                nn.init.normal_(m.weight, std=INIT_STD)
                nn.init.zeros_(m.bias)

    @torch.no_grad()
    def fit_numeric(self, num_NF: Tensor, present_NF: Tensor) -> None:
        """Set the standardisation from the catalogue: mean/std of each numeric feature where present."""
        n_F = present_NF.sum(0).clamp_min(1.0)
        mean_F = (num_NF * present_NF).sum(0) / n_F
        var_F = (((num_NF - mean_F) * present_NF) ** 2).sum(0) / n_F
        self.num_mean_F.copy_(mean_F)
        self.num_std_F.copy_(torch.where(var_F > 0, var_F.sqrt(), torch.ones_like(var_F)))

    def forward(self, cat_NC: Tensor, text_NW: Tensor, num_NF: Tensor, present_NF: Tensor) -> Tensor:
        h_ND = self.cat_bag(cat_NC) + self.text_bag(text_NW)  # mean over non-padding slots; all-padding -> 0
        if self.num_proj is not None:
            z_NF = (num_NF - self.num_mean_F) / self.num_std_F * present_NF  # absent -> 0 (= the mean)
            h_ND = h_ND + self.num_proj(torch.cat([z_NF, present_NF], dim=-1))
        return h_ND + self.mlp_out(F.silu(self.mlp_in(h_ND)))  # (N, D)


# ---- 3. id + features ----

def combine_item_embedding(id_ND: Tensor, has_id_N1: Tensor, feat_ND: Tensor) -> Tensor:
    """(N, D) item vector before the tower's projection: id row (where the item has a trained one) + features.
    has_id_N1: 1.0 where the item has an id row, 0.0 for a feature-only item."""
    return has_id_N1 * id_ND + feat_ND


# ---- 4. the two-tower model with a feature item tower ----

class FeatureTwoTower(TwoTower):
    """TwoTower whose encode_items(rows) combines each row's id embedding with its feature embedding.

    features: every table row's hashed features (row 0 = padding); has_id_R: 1.0 for rows whose id embedding
    is trained (or will be), 0.0 for feature-only rows. Both are buffers (saved with the state dict)."""

    def __init__(self, cfg: ModelConfig, num_rows: int, feat_cfg: FeatureConfig, features: FeatureTensors,
                 has_id_R: Tensor):
        super().__init__(cfg, num_rows)
        if feat_cfg.dim != cfg.dim:
            raise ValueError(f"FeatureConfig.dim={feat_cfg.dim} must equal ModelConfig.dim={cfg.dim}")
        if features.cat_NC.shape[0] != num_rows or has_id_R.shape != (num_rows,):
            raise ValueError(f"features ({features.cat_NC.shape[0]} rows) and has_id_R {tuple(has_id_R.shape)} "
                             f"must cover the table's {num_rows} rows")
        self.feat_cfg = feat_cfg
        self.features = FeatureEncoder(feat_cfg)
        self.features.fit_numeric(features.num_NF, features.present_NF)
        for name, t in zip(FeatureTensors._fields, features):
            self.register_buffer(f"row_{name}", t.clone())
        self.register_buffer("has_id_R", has_id_R.float().clone())

    def row_features(self, rows_N: Tensor) -> FeatureTensors:
        return FeatureTensors(self.row_cat_NC[rows_N], self.row_text_NW[rows_N], self.row_num_NF[rows_N],
                              self.row_present_NF[rows_N])

    def feature_embedding(self, rows_N: Tensor) -> Tensor:
        """(N, D) feature-only vectors of table rows (pad rows -> 0)."""
        if self.training:  # each distinct row once (a batch repeats popular items many times)
            uniq_U, inv_N = torch.unique(rows_N, return_inverse=True)
            return self.features(*self.row_features(uniq_U))[inv_N] * (rows_N != PAD_ROW).unsqueeze(-1)
        return self.features(*self.row_features(rows_N)) * (rows_N != PAD_ROW).unsqueeze(-1)

    def item_vectors(self, rows_N: Tensor) -> Tensor:
        has_N1 = self.has_id_R[rows_N].unsqueeze(-1)
        if self.training and self.feat_cfg.id_dropout > 0:
            has_N1 = has_N1 * (torch.rand_like(has_N1) >= self.feat_cfg.id_dropout).to(has_N1.dtype)
        return combine_item_embedding(self.item_embedding(rows_N), has_N1, self.feature_embedding(rows_N))

    def encode_items(self, rows_N: Tensor) -> Tensor:
        return F.normalize(self.item_proj(self.item_vectors(rows_N)), dim=-1)  # (N, out_dim)

    @classmethod
    def empty(cls, cfg: ModelConfig, num_rows: int, feat_cfg: FeatureConfig) -> "FeatureTwoTower":
        """No row has features or an id yet (a checkpoint's state dict is loaded into it, or rows are assigned)."""
        Fn, R = len(feat_cfg.numeric), num_rows
        feats = FeatureTensors(torch.zeros(R, feat_cfg.max_cat_values, dtype=torch.int64),
                               torch.zeros(R, feat_cfg.max_text_tokens, dtype=torch.int64), torch.zeros(R, Fn),
                               torch.zeros(R, Fn))
        return cls(cfg, num_rows, feat_cfg, feats, torch.zeros(R))

    def row_buffers(self) -> list[Tensor]:
        return [self.row_cat_NC, self.row_text_NW, self.row_num_NF, self.row_present_NF, self.has_id_R]

    @torch.no_grad()
    def assign_rows(self, rows_N: Tensor, features: FeatureTensors, has_id_N: Tensor) -> None:
        """Set the hashed features and has-id flags of table rows (new items, changed catalogue records)."""
        for name, t in zip(FeatureTensors._fields, features):
            getattr(self, f"row_{name}")[rows_N] = t
        self.has_id_R[rows_N] = has_id_N.float()

    @torch.no_grad()
    def grow(self, num_rows: int) -> None:
        """Enlarge the table; the new rows have no features and no id until assign_rows sets them."""
        old = self.num_rows
        if num_rows <= old:
            return
        super().grow(num_rows)
        for name in FeatureTensors._fields:
            buf = getattr(self, f"row_{name}")
            setattr(self, f"row_{name}", torch.cat([buf, buf.new_zeros((num_rows - old, *buf.shape[1:]))]))
        self.has_id_R = torch.cat([self.has_id_R, self.has_id_R.new_zeros(num_rows - old)])
