"""Trainer configuration: typed, validated, passed explicitly. `TrainConfig.tiny_debug()` for tests."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from contracts.eventlog import RetentionConfig
from contracts.registry import BACKENDS
from contracts.tracing import TracingConfig
from trainer.export.ann import AnnOptions
from trainer.model_config import ModelConfig

# Training precision: "bf16" autocast (default), "fp16" autocast + GradScaler, "fp32". No fp8: it is only worth it
# where measured faster on Hopper for our shapes, and no such measurement exists yet (issue 6, GPU numbers blocked).
PRECISIONS = ("bf16", "fp16", "fp32")
ELASTIC_DEVICES = ("auto", "cpu", "cuda")  # "auto": cuda when a GPU is visible, else cpu
START_METHODS = ("spawn", "fork", "forkserver")


@dataclass(kw_only=True, frozen=True, slots=True)
class ElasticConfig:
    """How many workers a training round gets and how it survives losing one (trainer/elastic/).

    A round with W > 1 runs on W processes (DDP; gloo on CPU, NCCL on GPU) started by torch.distributed.elastic
    with a c10d rendezvous. The policy (trainer/elastic/policy.py) picks W in [min_workers, max_workers]
    from the backlog, the freshness target and the devices; a failed round re-runs with one worker fewer.
    """

    min_workers: int = 1                 # fewest workers a round runs on (with fewer devices it runs on those, and
                                         # says so; a retry after a failure may go below it, down to 1)
    max_workers: int = 1                 # most workers a round may get; 1 = every round trains in the trainer process
    events_per_worker: int = 50_000      # backlog given to one worker before the policy adds another
    freshness_target_s: float = 60.0     # wanted training time of a round: add workers while the measured
                                         # per-worker rate says the backlog would take longer
    device: str = "auto"                 # "cpu" (gloo), "cuda" (NCCL, one GPU per worker) or "auto" (cuda when a
                                         # GPU is visible, else cpu)
    threads_per_worker: int = 1          # torch intra-op threads per worker process (CPU devices = cores // this)
    max_round_retries: int = 2           # a failed round re-runs from its newest epoch checkpoint with one worker
                                         # fewer, at most this often
    agent_max_restarts: int = 0          # restarts of the same W workers by the elastic agent before that
                                         # (0: a lost local worker is taken as gone)
    start_method: str = "forkserver"     # worker start: "forkserver" (a clean server process imports torch once, then
                                         # forks each worker warm: ~3 s for the first round, < 1 s after), "spawn"
                                         # (every worker imports torch: ~3 s each time), "fork" (fast, but unsafe in
                                         # a parent with threads or CUDA)
    rendezvous_timeout_s: float = 60.0   # c10d rendezvous: how long the workers wait for each other
    monitor_interval_s: float = 0.1      # how often the elastic agent polls its workers (bounds failure detection)
    stall_timeout_s: float = 300.0       # a worker with no training step for this long (hung collective, store,
                                         # start) prints its stacks and exits, so the round fails over, not hangs
    in_process_single_worker: bool = True  # W = 1 trains in the calling process: no launch, no process group
    work_dir: Path | None = None         # round files: data, epoch checkpoints, worker logs (None: a temp dir;
                                         # removed after a successful round, kept after a failed one)

    def __post_init__(self) -> None:
        for name in ("min_workers", "max_workers", "events_per_worker", "threads_per_worker"):
            if getattr(self, name) < 1:
                raise ValueError(f"ElasticConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_round_retries", "agent_max_restarts"):
            if getattr(self, name) < 0:
                raise ValueError(f"ElasticConfig.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("freshness_target_s", "rendezvous_timeout_s", "monitor_interval_s", "stall_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ElasticConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.max_workers < self.min_workers:
            raise ValueError(f"ElasticConfig.max_workers ({self.max_workers}) must be >= min_workers "
                             f"({self.min_workers}); raise max_workers or lower min_workers")
        if self.device not in ELASTIC_DEVICES:
            raise ValueError(f"ElasticConfig.device must be one of {ELASTIC_DEVICES}, got {self.device!r}")
        if self.start_method not in START_METHODS:
            raise ValueError(f"ElasticConfig.start_method must be one of {START_METHODS}, got {self.start_method!r}")

    def replace(self, **changes) -> "ElasticConfig":
        return dataclasses.replace(self, **changes)


@dataclass(kw_only=True, frozen=True, slots=True)
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)  # the architecture (trainer/model.py)
    batch_size: int = 128              # windows (sequences of max_history targets) per step
    lr: float = 1e-3                   # AdamW learning rate
    weight_decay: float = 0.0          # AdamW weight decay
    epochs_per_round: int = 10         # passes over a round's new (and replayed) windows. With dropout 0.5 the tower
                                       # needs many: ml-100k in rounds of 5k events (3-layer tower), test Recall@10
                                       # 0.092 at 2, 0.160 at 10, 0.172 at 20 vs 0.177 offline (docs/quality.md)
    n_random_negatives: int = 500      # uniform negatives per step, shared by every target of the batch
    in_batch_negatives: bool = False   # the batch's other positives are negatives too (popularity-sampled: needs
                                       # logq_correction, or popular items are pushed down)
    logq_correction: bool = False      # subtract log of each candidate's expected count (Yi et al. 2019)
    pairwise_weight: float = 40.0      # + this x mean softplus(s_neg - s_pos) over the uniform negatives (a rank
                                       # surrogate beside the softmax; trainer/loss.py). Games, with ema_epochs 4.1:
                                       # best validation NDCG@10 at 40 (0.5822; 20: 0.5810, 10: 0.5793, 3: 0.5770,
                                       # 0: 0.5756; larger not tried)
    ema_epochs: float = 4.1            # > 0: evaluate, gate and publish an exponential moving average of the
                                       # weights over about this many epochs of a round (trainer/ema.py); 0 = the raw
                                       # weights. 4.1 = decay 0.999 on an offline Games epoch (244 steps)
    precision: str = "bf16"            # "bf16" autocast, "fp16" autocast + GradScaler, or "fp32" (see PRECISIONS)
    fp16_init_scale: float = 256.0     # fp16: GradScaler's first loss scale. torch's 65536 overflowed (= skipped) the
                                       # first 7 steps of a fresh scaler on our loss; 512 is the largest that held
    seed: int = 0                      # RNG seed (shuffles, negatives, init)
    round_min_events: int = 1000       # start a round once this many new events wait...
    round_interval_s: float = 30.0     # ...or this long after the last round if any event waits
    max_round_events: int = 200_000    # events consumed by one round at most
    short_round_max_events: int = 0    # > 0: short rounds (trainer/short_rounds.py): every short_round_interval_s,
                                       # between full rounds and between a full round's steps, the events that arrived
                                       # (at most this many per short round) train a fork of the published model and
                                       # are published as a refit within about a second; the next full round still
                                       # trains, gates and commits them. 0 = off
    short_round_interval_s: float = 1.0  # least time between two short rounds (a short round starts once events wait)
    short_round_epochs: int = 1        # passes of a short round over the events it has not trained yet
    item_features: bool = False       # train a feature item tower (trainer/item_catalog.py): rows carry their items'
                                       # catalogue features (<data_dir>/catalog.sqlite) and engines carry the item
                                       # encoder, so the server serves new catalogue items by their features. A fresh
                                       # checkpoint only: an existing one keeps its model's kind
    user_features: bool = False       # user features beside the history (trainer/user_features.py): each trained
                                       # user's catalogue record (kind "user") feeds a feature encoder fused with the
                                       # user tower's output, and engines carry the encoder. A fresh checkpoint only
    poll_interval_s: float = 1.0       # how often the log is checked
    max_eval_users: int = 2000         # holdout users evaluated per round (sampled deterministically)
    min_eval_users: int = 20           # smaller holdouts skip the gate (recorded in the manifest)
    gate_min_ratio: float = 1.0        # publish when model Recall@10 >= ratio * popularity Recall@10...
    gate_min_vs_serving: float = 0.95  # ...and >= this * the serving (last published) model's on the same fresh
                                       # holdout, less 2 standard errors of the paired difference (noise)
    replay_fraction: float = 0.5       # replay windows from earlier users' kept sequences, per new window (anti-forgetting)
    item_min_count: int = 2            # a new item id gets a table row once it has this many events (counted in a
                                       # fixed-size sketch); its events before that train nothing (trainer/items.py)
    max_new_items_per_round: int = 50_000  # item ids admitted to the table per round at most (first seen first)
    item_ttl_s: float = 30 * 86400.0   # items with no event for this long (event time, before the watermark) lose
                                       # their rows; rows are renumbered, the table keeps its capacity (0: never)
    admission_sketch_width: int = 1 << 21  # counters per row of the admission count-min sketch (4 rows of uint16:
                                           # 16 MiB); halved every width/2 additions (trainer/items.py)
    max_users: int = 500_000           # users whose recent rows the trainer keeps (user_seqs: replay, holdout
                                       # context), least recently active dropped first
    retention: RetentionConfig = field(default_factory=RetentionConfig)  # event-log and dead-letter retention
                                       # (SQLite log; the trainer runs it after its commits)
    backend: str = "aoti"              # engine backend built after a passing round
    parity_tolerance: float = 1e-4     # engine vs torch reference max abs diff allowed at build
    inductor_cache_dir: Path | None = None  # TORCHINDUCTOR_CACHE_DIR for AOTI builds
    refit: bool = True                 # same architecture as the parent engine (aoti): publish weights for its
                                       # compiled graph instead of recompiling (no compile; the server refits)
    signing_key: Path | None = None    # Ed25519 private key file (raw 32 bytes or PEM, mode 600): every published
                                       # manifest is signed (manifest.sig) and a parent must verify with it before a
                                       # refit reuses its files (`livetower registry keygen` makes one)
    keep_engines: int = 20             # after each publish delete older engines beyond the newest this many (never
                                       # stable, canary, the previous stable, nor their graph versions); 0 = keep all
    ann: AnnOptions = field(default_factory=AnnOptions)  # HNSW index for catalogues >= ann.min_items
    elastic: ElasticConfig = field(default_factory=ElasticConfig)  # workers per round, retries (trainer/elastic/)
    tracing: TracingConfig = field(default_factory=TracingConfig)  # OpenTelemetry round spans over OTLP (off)

    def __post_init__(self) -> None:
        for name in ("batch_size", "epochs_per_round", "n_random_negatives", "round_min_events",
                     "max_round_events", "max_eval_users", "min_eval_users"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "round_interval_s", "poll_interval_s", "parity_tolerance", "fp16_init_scale",
                     "short_round_interval_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"TrainConfig.{name} must be > 0, got {getattr(self, name)}")
        for name in ("item_min_count", "max_new_items_per_round", "admission_sketch_width", "max_users",
                     "short_round_epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.item_min_count > 65535:
            raise ValueError(f"TrainConfig.item_min_count must be <= 65535 (sketch counters), got {self.item_min_count}")
        if not self.item_ttl_s >= 0:
            raise ValueError(f"TrainConfig.item_ttl_s must be >= 0 (0: never evict), got {self.item_ttl_s}")
        for name in ("gate_min_vs_serving", "replay_fraction"):
            if not 0 <= getattr(self, name) <= 10:
                raise ValueError(f"TrainConfig.{name} must be in [0, 10], got {getattr(self, name)}")
        if self.weight_decay < 0 or self.gate_min_ratio < 0:
            raise ValueError("TrainConfig.weight_decay and gate_min_ratio must be >= 0")
        if self.ema_epochs < 0:
            raise ValueError(f"TrainConfig.ema_epochs must be >= 0, got {self.ema_epochs}")
        for name in ("item_features", "user_features"):
            if getattr(self, name) and self.elastic.max_workers > 1:
                raise ValueError(f"TrainConfig.{name} trains in the trainer process only: set "
                                 "elastic.max_workers to 1 (the launched workers build the id-only model)")
        if self.short_round_max_events < 0:
            raise ValueError(f"TrainConfig.short_round_max_events must be >= 0 (0: no short rounds), got "
                             f"{self.short_round_max_events}")
        if self.keep_engines < 0:
            raise ValueError(f"TrainConfig.keep_engines must be >= 0, got {self.keep_engines}")
        if self.pairwise_weight < 0:
            raise ValueError(f"TrainConfig.pairwise_weight must be >= 0, got {self.pairwise_weight}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"TrainConfig.precision must be one of {PRECISIONS}, got {self.precision!r}")
        if not isinstance(self.elastic, ElasticConfig):
            raise ValueError(f"TrainConfig.elastic must be an ElasticConfig, got {type(self.elastic).__name__}")
        if self.backend not in BACKENDS:
            raise ValueError(f"TrainConfig.backend must be one of {BACKENDS}, got {self.backend!r}")

    @classmethod
    def tiny_debug(cls, **overrides) -> "TrainConfig":
        # ema_epochs / pairwise_weight 0: over the tests' 2-epoch rounds an average lags the few steps trained
        # (a round failed its popularity gate), and so did a round with the pairwise term at 10 (R@10 0.37 vs 0.42)
        base = dict(model=ModelConfig.tiny_debug(), batch_size=32, n_random_negatives=64, epochs_per_round=2,
                    ema_epochs=0.0, pairwise_weight=0.0,
                    round_min_events=50, round_interval_s=0.5, poll_interval_s=0.2, min_eval_users=5, backend="torch")
        base.update(overrides)
        return cls(**base)

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)
