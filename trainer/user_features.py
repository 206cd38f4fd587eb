"""User side features in the user tower: a feature encoder beside the history, fused late.

The user's vector is `fuse_user_features(history vector, feature vector)` (trainer/model.py): the DeepSeek
history tower's normalised output plus the encoder's output for the user's catalogue record, renormalised. The
encoder is trainer/features.py's FeatureEncoder (the item side's architecture: hashed categorical and text
bags, standardised numerics, a residual MLP) over a user FeatureConfig (ml-100k's u.user: age, gender,
occupation, zip3).

Why late fusion, not a profile token inside the transformer: the compiled history tower (three backends, the
refit path, the parity goldens, KServe's tensor API) keeps its one-input signature, and the feature vector of a
user changes only when the user's record does, so the server encodes it once per record (with the exported
encoder the engine carries) instead of once per request. Its cost per request is one vector add.

`UserFeatureTable` holds the encoder and the hashed features of a set of user rows (row 0 = no record: a zero
vector, so such a user's vector is the history's alone). The rows are not saved with the state dict: they are
data (the catalogue's), rebuilt from the records each time, as the item side's rows are re-read from the
catalogue.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
from torch import Tensor, nn

from contracts.catalog import CatalogRecord, CatalogStore
from contracts.engine_format.item_features import FeatureConfig, FeatureTensors, featurize
from trainer.examples import windows_for_new
from trainer.features import FeatureEncoder
from trainer.model import PAD_ROW


def user_feature_config(records: Sequence[CatalogRecord], dim: int, **kw) -> FeatureConfig:
    """The encoder shape for these user records: their numeric features (sorted by name); no id dropout (a user
    has no id embedding to drop)."""
    names = sorted({n for r in records for n in r.numeric})
    return FeatureConfig(dim=dim, numeric=tuple(names), id_dropout=0.0, **kw)


class UserFeatureTable(nn.Module):
    """users_B (int64 rows into the table, 0 = none) -> (B, D) feature vectors."""

    def __init__(self, cfg: FeatureConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = FeatureEncoder(cfg)
        self.set_rows([])

    def set_rows(self, records: Sequence[CatalogRecord | None], *, fit_numeric: bool = False) -> None:
        """Row i + 1 = records[i] (None: no features). fit_numeric: standardise the numerics on these records
        (once, when the model is made; later tables keep the trained standardisation)."""
        feats = featurize([None, *records], self.cfg)
        device = self.encoder.mlp_in.weight.device
        for name, t in zip(FeatureTensors._fields, feats):
            self.register_buffer(f"row_{name}", t.to(device), persistent=False)
        if fit_numeric and self.cfg.numeric:
            self.encoder.fit_numeric(feats.num_NF, feats.present_NF)

    @property
    def num_rows(self) -> int:
        return self.row_cat_NC.shape[0]

    def forward(self, users_B: Tensor) -> Tensor:
        f = FeatureTensors(self.row_cat_NC, self.row_text_NW, self.row_num_NF, self.row_present_NF).index(users_B)
        return self.encoder(*f) * (users_B != PAD_ROW).unsqueeze(-1)  # (B, D); no record -> 0


def attach_user_features(model: nn.Module, cfg: FeatureConfig, records: Sequence[CatalogRecord | None]) -> None:
    """Give a TwoTower user features: a fresh encoder (numerics standardised on `records`) and those rows."""
    if cfg.dim != model.cfg.out_dim:
        raise ValueError(f"FeatureConfig.dim={cfg.dim} must equal ModelConfig.out_dim={model.cfg.out_dim}")
    table = UserFeatureTable(cfg)
    table.set_rows(records, fit_numeric=True)
    model.user_features = table.to(next(model.parameters()).device)


# ---- the sidecar: the trained users' rows, from the catalogue store ----

def new_user_features(model: nn.Module, store: CatalogStore) -> FeatureConfig:
    """Give a fresh sidecar model user features shaped by the catalogue's user records (their numerics
    standardised); returns the config (checkpointed: a restart rebuilds the same encoder)."""
    records = list(store.iterate("user"))
    cfg = user_feature_config(records, model.cfg.out_dim)
    attach_user_features(model, cfg, records)
    return cfg


def window_user_rows(model: nn.Module, users: Sequence[str], store: CatalogStore | None) -> np.ndarray | None:
    """For a model with user features: set its table to the distinct `users`' records (read from the store now,
    so a changed record trains from the next call on) and return each window's row; None for a model without."""
    table = model.user_features
    if table is None:
        return None
    distinct = list(dict.fromkeys(users))
    table.set_rows([store.get(u, "user") if store is not None else None for u in distinct])
    row_of = {u: i for i, u in enumerate(distinct, start=1)}
    return np.fromiter((row_of[u] for u in users), np.int64, len(users))


def windows_of_users(parts: Iterable[tuple[str, list[int], int]], T: int) -> tuple[list, list[str]]:
    """(windows, the user of each) for (user, rows oldest first, new rows at the end) triples
    (trainer/examples.py's windows_for_new per user)."""
    windows, users = [], []
    for user, seq, n_new in parts:
        new = windows_for_new(seq, n_new, T)
        windows += new
        users += [user] * len(new)
    return windows, users
