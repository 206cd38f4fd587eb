"""Trainer configuration: typed, validated, passed explicitly. `TrainConfig.tiny_debug()` for tests."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from livetower.registry import USER_TOWER_FILE
from trainer.export.ann import AnnOptions
from trainer.model import ModelConfig

PRECISIONS = ("bf16", "fp32")
BACKENDS = tuple(USER_TOWER_FILE)  # "aoti", "onnx", "torch"


@dataclass(kw_only=True, frozen=True, slots=True)
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    batch_size: int = 64               # windows (sequences of max_history targets) per step
    lr: float = 3e-3                   # AdamW learning rate
    weight_decay: float = 0.0          # AdamW weight decay
    epochs_per_round: int = 2          # passes over a round's new windows
    n_random_negatives: int = 256      # uniform negatives per step (plus in-batch)
    precision: str = "bf16"            # autocast dtype for forward: "bf16" or "fp32"
    seed: int = 0                      # RNG seed (shuffles, negatives, init)
    round_min_events: int = 1000       # start a round once this many new events wait...
    round_interval_s: float = 30.0     # ...or this long after the last round if any event waits
    max_round_events: int = 200_000    # events consumed by one round at most
    poll_interval_s: float = 1.0       # how often the log is checked
    max_eval_users: int = 2000         # holdout users evaluated per round (sampled deterministically)
    min_eval_users: int = 20           # smaller holdouts skip the gate (recorded in the manifest)
    gate_min_ratio: float = 1.0        # publish when model Recall@10 >= ratio * popularity Recall@10
    backend: str = "aoti"              # engine backend built after a passing round
    parity_tolerance: float = 1e-4     # engine vs torch reference max abs diff allowed at build
    inductor_cache_dir: Path | None = None  # TORCHINDUCTOR_CACHE_DIR for AOTI builds
    refit: bool = True                 # same architecture as the parent engine (aoti): publish weights for its
                                       # compiled graph instead of recompiling (no compile; the server refits)
    ann: AnnOptions = field(default_factory=AnnOptions)  # HNSW index for catalogues >= ann.min_items

    def __post_init__(self) -> None:
        for name in ("batch_size", "epochs_per_round", "n_random_negatives", "round_min_events",
                     "max_round_events", "max_eval_users", "min_eval_users"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "round_interval_s", "poll_interval_s", "parity_tolerance"):
            if not getattr(self, name) > 0:
                raise ValueError(f"TrainConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.weight_decay < 0 or self.gate_min_ratio < 0:
            raise ValueError("TrainConfig.weight_decay and gate_min_ratio must be >= 0")
        if self.precision not in PRECISIONS:
            raise ValueError(f"TrainConfig.precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"TrainConfig.backend must be one of {BACKENDS}, got {self.backend!r}")

    @classmethod
    def tiny_debug(cls, **overrides) -> "TrainConfig":
        base = dict(model=ModelConfig.tiny_debug(), batch_size=32, n_random_negatives=64, round_min_events=50,
                    round_interval_s=0.5, poll_interval_s=0.2, min_eval_users=5, backend="torch")
        base.update(overrides)
        return cls(**base)

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)
