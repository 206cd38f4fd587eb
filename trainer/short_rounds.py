"""Short rounds: a small backlog reaches serving in seconds; the next full round still trains it properly.

A full round (trainer/loop.py) waits for `round_min_events` or `round_interval_s` and trains its events for
`epochs_per_round` passes with a held-out gate: tens of seconds from an event to an engine. Between full rounds,
every `short_round_interval_s` a short round reads what arrived (at most `short_round_max_events`), adds it to
the read-ahead buffer below and publishes

    served = weight average of the model + (fork - model)

where `fork` is a copy of the model (with its optimizer state) trained `short_round_epochs` pass(es) over every
buffered event: the serving weights plus this pass's update, so an item's first interactions move its own row
at once (an average over epochs would take in a few percent of a one-pass update), and no short round builds on
another (each forks the full round's model afresh: no drift accumulates outside the gate). The engine is a
refit of the parent's compiled graph (no compile) and carries `short_round` in its eval metrics; the server
canaries it on the small-step path (contracts/rollout.py CanaryPolicy.small_step_events).

The buffered events are not committed: the checkpoint's positions stay at the last full round, which takes the
buffer as the start of its batch (its items already placed: the admission sketch counts an event once) and
trains, gates, commits and publishes it as usual. A crash loses the buffer and nothing else: the restarted
trainer reads those events again from the checkpoint's positions. The main model is never trained by a short
round, so the full round's held-out events are still unseen by the model it gates; and when the serving engine
is a short one, its gate compares against the full-round model it was forked from (`bases`), which never saw
them either.

Short rounds run only while the model is the one the last full round published (`TrainerState.model_published`):
one whose gate failed is not served, and neither is anything forked from it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from contracts.eventlog import EventBatch, StoredEvent
from trainer import ema
from trainer.config import TrainConfig
from trainer.examples import windows_for_new
from trainer.model import TwoTower
from trainer.training import make_optimizer, train_windows


@dataclass(slots=True)
class ReadAhead:
    """Events read after the checkpoint's positions and not yet trained by a full round."""
    events: list[StoredEvent] = field(default_factory=list)
    next_offsets: dict[str, int] | None = None  # positions after the buffer; None: empty, read from the checkpoint's
    bases: dict[int, int] = field(default_factory=dict)  # short engine version -> the full-round version it forked
    last_version: int = 0                       # newest short engine published (the next build's refit parent)
    rounds: int = 0                             # short rounds run by this process

    def start(self, committed: dict[str, int]) -> dict[str, int]:
        """Where the next read begins."""
        return dict(self.next_offsets) if self.next_offsets is not None else dict(committed)

    def add(self, batch: EventBatch) -> None:
        self.events.extend(batch.events)
        self.next_offsets = dict(batch.next_offsets)

    def keep(self, batch: EventBatch) -> None:
        """A full round that did not train: its whole batch (items placed) waits for the next one."""
        self.events, self.next_offsets = list(batch.events), dict(batch.next_offsets)

    def clear(self) -> None:
        self.events, self.next_offsets = [], None

    def base_of(self, version: int) -> int:
        """The full-round version whose model `version` was forked from (itself when it is a full one)."""
        return self.bases.get(version, version)


def buffered_windows(rows_by_user: dict[str, list[int]], user_seqs: dict[str, list[int]], T: int) -> list:
    """Next-item windows whose targets are exactly the buffered rows, after each user's kept history."""
    return [w for u, rows in rows_by_user.items() for w in windows_for_new(user_seqs.get(u, []) + rows, len(rows), T)]


def fork_and_train(model: TwoTower, opt: torch.optim.Optimizer, windows: list, *, item_prob_R: torch.Tensor,
                   n_items: int, cfg: TrainConfig, seed: int) -> TwoTower:
    """A copy of model trained cfg.short_round_epochs pass(es) over `windows` from the model's optimizer state, its
    update added to the model's weight average: the weights to serve. model and opt are not changed."""
    from trainer.examples import stack_windows

    fork = TwoTower(model.cfg, model.num_rows)
    fork.load_state_dict(model.state_dict())  # copies into fork's own tensors
    fork_opt = make_optimizer(fork, cfg)
    fork_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # load_state_dict alone would share the moments
    fork.train()
    train_windows(fork, fork_opt, *stack_windows(windows), item_prob_R=item_prob_R, n_items=n_items,
                  cfg=cfg.replace(ema_epochs=0.0), epochs=cfg.short_round_epochs,
                  generator=torch.Generator().manual_seed(seed))
    fork.eval()
    base = ema.averaged(model, opt).state_dict()
    raw, new = model.state_dict(), fork.state_dict()
    with torch.no_grad():
        fork.load_state_dict({k: base[k] + (v - raw[k]) if v.is_floating_point() else v for k, v in new.items()})
    return fork


def watermark_after(watermark_ms: int, events: list[StoredEvent], now_ms: int) -> int:
    """The event-time watermark once `events` are trained (never past the trainer's clock)."""
    return max(watermark_ms, min(max(ev.timestamp_ms for ev in events), now_ms)) if events else watermark_ms


def short_metrics(n_events: int, n_windows: int) -> dict[str, float]:
    """A short engine's eval_metrics: it has no gate of its own (its full round gates the same events)."""
    return {"short_round": 1.0, "short_round_events": float(n_events), "short_round_windows": float(n_windows),
            "gate_passed": 0.0}

