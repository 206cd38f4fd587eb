"""Short rounds: a small backlog reaches serving in seconds; the next full round still trains it properly.

A full round (trainer/loop.py) waits for `round_min_events` or `round_interval_s` and trains its events for
`epochs_per_round` passes with a held-out gate: tens of seconds from an event to an engine. Short rounds run
every `short_round_interval_s` between full rounds and also between the steps of one (the full round's
in-process training calls back after each step). A short round reads what arrived (at most
`short_round_max_events`) into the read-ahead buffer below, trains the buffer's `fork` `short_round_epochs`
pass(es) over the events it has not trained yet and publishes

    served = weight average of the base model + (fork - base model)

the serving weights plus every short pass since the fork was made, so an item's first interactions move its own
row at once (an average over epochs would take in a few percent of a one-pass update). The fork is a copy of the
model the last full round published (weights and optimizer state), made when a short round first needs one; a
full round's commit drops it, so short passes never pile up beyond about one full round's worth of events. A
short round costs the windows of its own events only (one window per user). The engine is a refit of the
parent's compiled graph (no compile) and carries `short_round` in its eval metrics; the server canaries it on
the small-step path (contracts/rollout.py CanaryPolicy.small_step_events).

Buffered events are not committed: the checkpoint's positions stay at the last full round, which takes the
buffer as the start of its batch and trains, gates, commits and publishes it as usual. Items: a short round
between full rounds places its events' items (admission, table growth) like a full round, and the full round
does not place them again (the admission sketch counts an event once); between a full round's steps the model's
table is in use, so events of items without a row wait as context until the next placement. A crash loses the
buffer and the fork, nothing else: the restarted trainer reads those events again from the checkpoint's
positions. The full round's model never trains on a short round's events before its own gate, and when the
serving engine is a short one the gate compares with the full-round model it was forked from (`bases`).

Short rounds need a published base: the fork is made only from a model its full round published
(`TrainerState.model_published`), never from one whose gate failed. A fork that exists when a full round's gate
fails is kept (its base is still the published model), so short rounds go on from what serves: small, noisy
full rounds fail their gate often, and dropping the fork then stopped fresh engines until a gate passed (25 s
gaps at 10 events/s).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import torch

from contracts.eventlog import EventBatch, StoredEvent
from trainer import ema
from trainer.config import TrainConfig
from trainer.examples import stack_windows
from trainer.model import TwoTower
from trainer.training import grow_table, make_optimizer, train_windows
from trainer.user_features import windows_of_users


@dataclass(slots=True)
class Fork:
    """A copy of a published model trained by short rounds, and the base it was copied from."""
    model: TwoTower
    opt: torch.optim.Optimizer
    base_avg: dict[str, torch.Tensor]   # the base's served (averaged) weights
    base_raw: dict[str, torch.Tensor]   # the base's raw weights (the fork's starting point)
    base_version: int                   # the full-round engine of the base
    base_trained_events: int            # events the base was trained on
    watermark_ms: int                   # newest event time trained into the fork (base's included)
    n_items: int                        # vocabulary items its engines serve: the base's and those whose rows a
                                        # short round placed (and trained); not rows a running full round placed,
                                        # which nothing has trained yet (random vectors would be served)
    events: int = 0                     # events trained by short rounds

    @classmethod
    def of(cls, model: TwoTower, opt: torch.optim.Optimizer, cfg: TrainConfig, version: int, trained_events: int,
           watermark_ms: int, n_items: int) -> "Fork":
        fork = copy.deepcopy(model)  # of its kind (a feature item tower too), with its own tensors
        if fork.user_features is not None:  # short engines keep the base's user encoder: the server then shares
            fork.user_features.requires_grad_(False)  # their users' vectors with the base engine's (no re-encoding)
        fork_opt = make_optimizer(fork, cfg)
        fork_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # alone it would share the moments
        avg = {k: v.clone() for k, v in ema.averaged(model, opt).state_dict().items()}
        return cls(fork, fork_opt, avg, {k: v.clone() for k, v in model.state_dict().items()}, version,
                   trained_events, watermark_ms, n_items)

    def grow(self, model: TwoTower) -> None:
        """The model's table grew (new items): the fork takes the new rows (and their features) as they are there."""
        n = self.model.num_rows
        if model.num_rows <= n:
            return
        grow_table(self.model, self.opt, model.num_rows)
        with torch.no_grad():
            self.model.item_embedding.weight[n:] = model.item_embedding.weight[n:]
            for mine, theirs in zip(self.model.row_buffers(), model.row_buffers()):
                mine[n:] = theirs[n:]

    def served(self) -> TwoTower:
        """base average + (fork - base); rows the base does not have are the fork's own."""
        out, new = copy.deepcopy(self.model), self.model.state_dict()
        weights = {}
        for k, v in new.items():
            if not v.is_floating_point():
                weights[k] = v
                continue
            avg, raw = self.base_avg[k], self.base_raw[k]
            if avg.shape == v.shape and torch.equal(v, raw):  # untrained here (a frozen part): the base's, exactly
                weights[k] = avg
                continue
            if avg.shape != v.shape:  # the item table, grown since: no base for the new rows
                avg = torch.cat([avg, v[avg.shape[0]:]])
                raw = torch.cat([raw, v[raw.shape[0]:]])
            weights[k] = avg + (v - raw)
        with torch.no_grad():
            out.load_state_dict(weights)
        return out.eval()


@dataclass(slots=True)
class ReadAhead:
    """Events read after the checkpoint's positions and not in any full round yet, and the short rounds' fork."""
    events: list[StoredEvent] = field(default_factory=list)
    next_offsets: dict[str, int] | None = None  # positions after the buffer; None: read from the checkpoint's
    placed: int = 0                             # the first `placed` events have had their items placed
    trained: int = 0                            # the first `trained` events were trained by the fork
    in_round: dict[str, list[int]] = field(default_factory=dict)  # rows of the running full round's events (context)
    fork: Fork | None = None
    bases: dict[int, int] = field(default_factory=dict)  # short engine version -> the full-round version it forked
    last_version: int = 0                       # newest short engine published (the next build's refit parent)
    rounds: int = 0                             # short rounds run by this process

    def start(self, committed: dict[str, int]) -> dict[str, int]:
        """Where the next read begins."""
        return dict(self.next_offsets) if self.next_offsets is not None else dict(committed)

    def add(self, batch: EventBatch) -> None:
        self.events.extend(batch.events)
        self.next_offsets = dict(batch.next_offsets)

    def take(self) -> tuple[list[StoredEvent], int]:
        """For a full round: (the buffered events, how many are placed); the buffer restarts after them (the
        fork and its positions stay: it serves until the round commits)."""
        events, placed = self.events, self.placed
        self.events, self.placed, self.trained = [], 0, 0
        return events, placed

    def put_back(self, batch: EventBatch) -> None:
        """A full round that did not train: its batch (items placed) goes back before what was read since (never
        placed: no placement happens during a full round); the fork is dropped (it is re-made from the model)."""
        self.events = list(batch.events) + self.events
        self.placed, self.trained, self.in_round, self.fork = len(batch.events), 0, {}, None

    def committed(self, *, keep_fork: bool = False) -> None:
        """A full round committed: the model moved on, so the fork is stale, unless the round's gate failed
        (keep_fork: the model it would be made from is not published; the fork still is the published lineage)."""
        self.in_round, self.trained = {}, 0
        if not keep_fork:
            self.fork = None

    def base_of(self, version: int) -> int:
        """The full-round version whose model `version` was forked from (itself when it is a full one)."""
        return self.bases.get(version, version)


def windows_after(context: dict[str, list[int]], new: dict[str, list[int]], user_seqs: dict[str, list[int]],
                  T: int) -> tuple[list, list[str]]:
    """Next-item windows whose targets are exactly the `new` rows, after each user's kept history and its rows
    read before them (`context`), and the user of each."""
    return windows_of_users(((u, user_seqs.get(u, []) + context.get(u, []) + rows, len(rows))
                             for u, rows in new.items()), T)


def merge_rows(*parts: dict[str, list[int]]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for part in parts:
        for u, rows in part.items():
            out[u] = out.get(u, []) + rows
    return out


def train_fork(fork: Fork, windows: list, events: list[StoredEvent], *, item_prob_R: torch.Tensor, n_items: int,
               cfg: TrainConfig, seed: int, now_ms: int, users_W: np.ndarray | None = None) -> TwoTower:
    """Train the fork cfg.short_round_epochs pass(es) over `windows` (of `events`; users_W: each window's user row
    for a model with user features); returns the weights to serve."""
    fork.events += len(events)
    fork.watermark_ms = watermark_after(fork.watermark_ms, events, now_ms)
    fork.model.train()
    train_windows(fork.model, fork.opt, *stack_windows(windows), item_prob_R=item_prob_R, n_items=n_items,
                  cfg=cfg.replace(ema_epochs=0.0), epochs=cfg.short_round_epochs,
                  generator=torch.Generator().manual_seed(seed), users_W=users_W)
    fork.model.eval()
    return fork.served()


def watermark_after(watermark_ms: int, events: list[StoredEvent], now_ms: int) -> int:
    """The event-time watermark once `events` are trained (never past the trainer's clock)."""
    return max(watermark_ms, min(max(ev.timestamp_ms for ev in events), now_ms)) if events else watermark_ms


def short_metrics(n_events: int, n_windows: int) -> dict[str, float]:
    """A short engine's eval_metrics: it has no gate of its own (its full round gates the same events)."""
    return {"short_round": 1.0, "short_round_events": float(n_events), "short_round_windows": float(n_windows),
            "gate_passed": 0.0}
