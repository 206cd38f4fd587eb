"""Atomic trainer checkpoints: model, optimizer, vocabulary, item counts, user sequences, offsets.

Written as one file via temp + fsync + rename, so a crash at any point leaves the previous
checkpoint intact. The offsets inside are the truth for resume (at-least-once).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from contracts.atomic import write_atomic

CHECKPOINT_FILE = "checkpoint.pt"
FORMAT_VERSION = 1


@dataclass(kw_only=True, slots=True)
class TrainerState:
    model_config: dict                         # ModelConfig.to_dict()
    model: dict                                # model state_dict
    optimizer: dict                            # optimizer state_dict
    vocab: list[str]                           # item ids in row order (row r <-> vocab[r-1])
    item_counts: np.ndarray                    # (rows,) positives seen per row, for log-Q and popularity
    user_seqs: dict[str, list[int]]            # newest max_history rows per user, oldest first
    offsets: dict[str, int]                    # source -> next offset to read
    step: int = 0                              # rounds completed
    trained_events: int = 0                    # events consumed in total
    watermark_ms: int = 0                      # newest event time consumed
    published_version: int = 0                 # last engine version this trainer published
    history: list[dict] = field(default_factory=list)  # per-round summaries (metrics, decision)
    published_models: dict[int, dict] = field(default_factory=dict)  # version -> state_dict, kept for the gate's
    # baseline: the server's stable version (registry rollout.json) and the last published one, no others


def save_checkpoint(directory: Path, state: TrainerState) -> Path:
    path = Path(directory) / CHECKPOINT_FILE
    buf = io.BytesIO()
    torch.save({"format": FORMAT_VERSION, **{k: getattr(state, k) for k in TrainerState.__slots__}}, buf)
    write_atomic(path, buf.getvalue())
    return path


def load_checkpoint(directory: Path) -> TrainerState | None:
    path = Path(directory) / CHECKPOINT_FILE
    if not path.exists():
        return None
    d = torch.load(path, map_location="cpu", weights_only=False)
    if d.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path}: checkpoint format {d.get('format')} is not {FORMAT_VERSION}; "
                         "move it away to start fresh")
    d.pop("format")
    known = set(TrainerState.__slots__)
    return TrainerState(**{k: v for k, v in d.items() if k in known})
