"""An exponential moving average of the weights, kept in the optimizer's per-parameter state (key "ema"), so it
travels wherever the optimizer state does: DDP workers (trainer/elastic/), checkpoints, a grown item table.

The decay is set per round from `TrainConfig.ema_epochs` and the round's steps per epoch, so the average spans
about that many epochs of whatever is being trained: a 10-epoch sidecar round on a few thousand events and a
60-epoch offline run alike (an offline Games epoch is 244 steps: ema_epochs 4.1 = decay 0.999). Training goes on
from the raw weights; evaluation, gating and engines use the averaged ones (`averaged`).
"""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn

EMA_KEY = "ema"


def decay_for(ema_epochs: float, steps_per_epoch: int) -> float:
    """Per-step decay of an average over ~ema_epochs epochs of steps_per_epoch steps; 0 = no average."""
    if ema_epochs <= 0:
        return 0.0
    return 1.0 - 1.0 / max(ema_epochs * steps_per_epoch, 1.0)


@torch.no_grad()
def update(opt: torch.optim.Optimizer, decay: float) -> None:
    """After an optimizer step: ema <- decay * ema + (1 - decay) * w; a parameter without one starts at w.
    decay 0 (decay_for's "no average") does nothing."""
    if decay <= 0:
        return
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state[p]
            if EMA_KEY not in st:
                st[EMA_KEY] = p.detach().clone()
            else:
                st[EMA_KEY].lerp_(p.detach(), 1.0 - decay)


def has_average(opt: torch.optim.Optimizer) -> bool:
    return any(EMA_KEY in opt.state.get(p, {}) for g in opt.param_groups for p in g["params"])


@contextlib.contextmanager
def swapped_in(model: nn.Module, opt: torch.optim.Optimizer):
    """Within the block the model holds the averaged weights (parameters without an average keep theirs)."""
    saved = []
    with torch.no_grad():
        for p in model.parameters():
            avg = opt.state.get(p, {}).get(EMA_KEY)
            if avg is not None:
                saved.append((p, p.detach().clone()))
                p.copy_(avg)
    try:
        yield model
    finally:
        with torch.no_grad():
            for p, raw in saved:
                p.copy_(raw)


def averaged(model: nn.Module, opt: torch.optim.Optimizer) -> nn.Module:
    """A copy of the model with the averaged weights (the model itself when there is no average)."""
    if not has_average(opt):
        return model
    with swapped_in(model, opt):
        return copy.deepcopy(model)
