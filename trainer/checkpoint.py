"""Atomic trainer checkpoints: model, optimizer, vocabulary, item counts, user sequences, offsets.

Written as one file via temp + fsync + rename, so a crash at any point leaves the previous
checkpoint intact. The offsets inside are the truth for resume (at-least-once).

No pickle: the file holds tensors and plain containers (dict, list, str, int, float, bool, None) only
and is read with torch.load(weights_only=True), so a crafted checkpoint cannot run code. numpy arrays
are stored as tensors and the per-user sequences as one flat tensor plus lengths. Format 1 files
(pickled numpy, read with weights_only=False) are refused with advice: start fresh.
"""

from __future__ import annotations

import io
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from contracts.atomic import read_file, save_atomic

CHECKPOINT_FILE = "checkpoint.pt"
FORMAT_VERSION = 2
_ARRAYS = ("item_counts", "item_last_seen_ms", "admission_sketch")  # numpy fields, stored as tensors


@dataclass(kw_only=True, slots=True)
class TrainerState:
    model_config: dict                         # ModelConfig.to_dict()
    model: dict                                # model state_dict
    optimizer: dict                            # optimizer state_dict
    vocab: list[str]                           # item ids in row order (row r <-> vocab[r-1])
    item_counts: np.ndarray                    # (rows,) positives seen per row, for log-Q and popularity
    user_seqs: dict[str, list[int]]            # newest max_history rows per user, oldest first; least recently
                                               # active user first (LRU order, at most TrainConfig.max_users)
    offsets: dict[str, int]                    # source -> next offset to read
    step: int = 0                              # rounds completed
    trained_events: int = 0                    # events consumed in total
    watermark_ms: int = 0                      # newest event time consumed, never past the trainer's clock
    published_version: int = 0                 # last engine version this trainer published
    history: list[dict] = field(default_factory=list)  # per-round summaries (metrics, decision)
    published_models: dict[int, dict] = field(default_factory=dict)  # version -> state_dict, kept for the gate's
    # baseline: the server's stable version (registry rollout.json) and the last published one, no others
    published_vocab_epochs: dict[int, int] = field(default_factory=dict)  # version -> vocab_epoch it was built at
    item_last_seen_ms: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # (rows,) newest event
                                               # time per row (item TTL, trainer/items.py)
    admission_sketch: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.uint16))  # count-min sketch
                                               # of events of ids not yet in the vocabulary
    admission_added: int = 0                   # sketch additions since its last halving
    vocab_epoch: int = 0                       # compactions so far: rows of different epochs name different items
    model_published: bool = False              # the model is the one the last full round published (short rounds
                                               # fork only from such a model: trainer/short_rounds.py)
    feature_config: dict | None = None         # FeatureConfig of a feature item tower (trainer/item_catalog.py);
                                               # None: the id-only TwoTower
    catalog_version: int = 0                   # catalogue version the feature rows reflect
    user_feature_config: dict | None = None    # FeatureConfig of the user features (trainer/user_features.py);
                                               # None: the history alone


def _plain(state: TrainerState) -> dict:
    d = {k: getattr(state, k) for k in TrainerState.__slots__}
    for k in _ARRAYS:
        d[k] = torch.from_numpy(np.ascontiguousarray(d[k]))
    seqs = state.user_seqs
    d["user_seqs"] = {"users": list(seqs), "lengths": torch.tensor([len(s) for s in seqs.values()], dtype=torch.int64),
                      "rows": torch.tensor([r for s in seqs.values() for r in s], dtype=torch.int64)}
    return d


def _from_plain(d: dict) -> dict:
    for k in _ARRAYS:
        if k in d:
            d[k] = d[k].numpy().copy()
    packed = d["user_seqs"]
    bounds = np.concatenate([[0], np.cumsum(packed["lengths"].numpy())])
    rows = packed["rows"].tolist()
    d["user_seqs"] = OrderedDict((u, rows[bounds[i]:bounds[i + 1]]) for i, u in enumerate(packed["users"]))
    return d


def save_checkpoint(directory: Path, state: TrainerState) -> Path:
    path = Path(directory) / CHECKPOINT_FILE
    save_atomic(path, lambda f: torch.save({"format": FORMAT_VERSION, **_plain(state)}, f))
    return path


def load_checkpoint(directory: Path) -> TrainerState | None:
    path = Path(directory) / CHECKPOINT_FILE
    if not path.exists():
        return None
    try:
        d = torch.load(io.BytesIO(read_file(path)), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - an unpicklable global: an old (format 1) or a crafted file
        raise ValueError(f"{path}: not a format {FORMAT_VERSION} checkpoint (tensors and plain containers only; "
                         f"format 1 files were pickled and are not read): {type(e).__name__}: {str(e)[:300]}. "
                         "Move it away to start fresh") from e
    if not isinstance(d, dict) or d.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path}: checkpoint format {d.get('format') if isinstance(d, dict) else '?'} is not "
                         f"{FORMAT_VERSION}; move it away to start fresh")
    d.pop("format")
    known = set(TrainerState.__slots__)
    return TrainerState(**{k: v for k, v in _from_plain(d).items() if k in known})
