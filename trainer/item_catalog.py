"""The sidecar's feature item tower (TrainConfig.item_features): table rows whose features follow the catalogue.

The trainer trains trainer/features.py's FeatureTwoTower instead of the id-only TwoTower. Its rows are still
admitted by events (trainer/items.py): an item gets a row, an id embedding and `has_id` = 1 once it has enough
events. What the catalogue adds is each row's hashed features, read from the catalogue store
(`<data_dir>/catalog.sqlite`, written by UpsertItems / `livetower catalog load`): rows admitted since the last
refresh get their item's record (an item with no record gets no features: its vector is its id row alone), and
rows whose record changed since the catalogue version the model last saw get the new one. That version is
checkpointed with the model, so a restart re-applies only what changed after it.

Items in the catalogue that have no events are not rows: the server serves them by their features with the
engine's exported item encoder (server/engine/live_items.py), replaying the catalogue into every engine it
loads, so the next engine takes them over with its newer encoder.

The feature config is fixed when the model is first made: the numeric features are those the catalogue's item
records carry then (sorted by name); numeric features added to the catalogue later are ignored by this model.
"""

from __future__ import annotations

import torch

from contracts.catalog import CatalogRecord, CatalogStore
from contracts.engine_format.item_features import FeatureConfig, featurize
from trainer.features import FeatureTwoTower
from trainer.model_config import ModelConfig
from trainer.vocab import ItemVocab


def feature_config_for(records: list[CatalogRecord], dim: int, *, scan_limit: int = 100_000) -> FeatureConfig:
    """The encoder shape for this catalogue: the numeric features of (up to scan_limit) item records."""
    names: set[str] = set()
    for record in records[:scan_limit]:
        names.update(record.numeric)
    return FeatureConfig(dim=dim, numeric=tuple(sorted(names)))


def new_feature_model(cfg: ModelConfig, num_rows: int, store: CatalogStore) -> FeatureTwoTower:
    """A fresh feature model (no row has features yet) whose numeric standardisation is the catalogue's."""
    records = list(store.iterate("item"))  # one read serves the config and the standardisation
    feat_cfg = feature_config_for(records, cfg.dim)
    model = FeatureTwoTower.empty(cfg, num_rows, feat_cfg)
    if records and feat_cfg.numeric:
        f = featurize(records, feat_cfg)
        model.features.fit_numeric(f.num_NF, f.present_NF)
    return model


def feature_config_to_state(cfg: FeatureConfig) -> dict:
    """For the checkpoint (plain containers only)."""
    return {name: list(v) if isinstance(v, tuple) else v for name, v in
            ((f, getattr(cfg, f)) for f in FeatureConfig.__dataclass_fields__)}


def feature_config_from_state(d: dict) -> FeatureConfig:
    return FeatureConfig(**{k: tuple(v) if k == "numeric" else v for k, v in d.items()})


def refresh_rows(model: FeatureTwoTower, vocab: ItemVocab, store: CatalogStore, seen_version: int) -> tuple[int, int]:
    """Give rows admitted since the last call (has_id 0 among the vocabulary's) their records' features, and rows
    whose record changed after `seen_version` their new ones. Returns (the catalogue version now seen, rows
    assigned)."""
    n = len(vocab)
    rows = set((torch.nonzero(model.has_id_R[1:n + 1] == 0).flatten() + 1).tolist())
    version = seen_version
    while changes := store.changes_since(version):
        version = changes[-1].version
        rows.update(row for c in changes if c.kind == "item" and (row := vocab.row_of.get(c.id)))
    if not rows:
        return version, 0
    ordered = sorted(rows)
    records = [store.get(vocab.ids[r - 1]) for r in ordered]
    model.assign_rows(torch.tensor(ordered), featurize(records, model.feat_cfg), torch.ones(len(ordered)))
    return version, len(ordered)
