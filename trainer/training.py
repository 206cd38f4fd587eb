"""Optimisation steps over next-item windows: autocast, sampled softmax, expert-bias update."""

from __future__ import annotations

import contextlib
import time
from typing import Callable

import numpy as np
import torch

from trainer.config import TrainConfig
from trainer.loss import sampled_softmax_loss
from trainer.model import TwoTower


def make_optimizer(model: TwoTower, cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def grow_table(model: TwoTower, opt: torch.optim.Optimizer, num_rows: int) -> None:
    """Enlarge the item table and carry the optimizer state over (zeros for new rows)."""
    old = model.item_embedding.weight
    if num_rows <= old.shape[0]:
        return
    model.grow(num_rows)
    new = model.item_embedding.weight
    state = opt.state.pop(old, None)
    for group in opt.param_groups:
        group["params"] = [new if p is old else p for p in group["params"]]
    if state:
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                pad = torch.zeros((num_rows - old.shape[0], *old.shape[1:]), dtype=state[key].dtype)
                state[key] = torch.cat([state[key], pad])
        opt.state[new] = state


def autocast(precision: str):
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_windows(model: TwoTower, opt: torch.optim.Optimizer, inputs_WT: np.ndarray, targets_WT: np.ndarray,
                  mask_WT: np.ndarray, *, item_prob_R: torch.Tensor, n_items: int, cfg: TrainConfig,
                  epochs: int, generator: torch.Generator,
                  progress: Callable[[str], None] | None = None) -> list[float]:
    """Train on the windows for `epochs`; returns the mean loss of each epoch."""
    model.train()
    W = inputs_WT.shape[0]
    steps_per_epoch = -(-W // cfg.batch_size)
    losses = []
    last_report = time.monotonic()
    for epoch in range(epochs):
        order = torch.randperm(W, generator=generator).numpy()
        total, steps = 0.0, 0
        for s in range(0, W, cfg.batch_size):
            b = order[s:s + cfg.batch_size]
            inp_BT = torch.from_numpy(inputs_WT[b])
            tgt_BT = torch.from_numpy(targets_WT[b])
            m_BT = torch.from_numpy(mask_WT[b])
            if not bool(m_BT.any()):
                continue
            with autocast(cfg.precision):
                states_BTD = model.user_states(inp_BT)
                loss = sampled_softmax_loss(model, states_BTD[m_BT], tgt_BT[m_BT], item_prob_R=item_prob_R,
                                            n_items=n_items, n_random=cfg.n_random_negatives,
                                            temperature=cfg.model.temperature, generator=generator)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            model.update_expert_bias()
            total += float(loss.detach())
            steps += 1
            if progress and time.monotonic() - last_report > 30:  # long epochs show progress
                last_report = time.monotonic()
                progress(f"epoch {epoch + 1}/{epochs}: step {steps}/{steps_per_epoch}, loss {total / steps:.4f}")
        losses.append(total / max(steps, 1))
        if progress:
            progress(f"epoch {epoch + 1}/{epochs}: loss {losses[-1]:.4f} over {W} windows")
    model.eval()
    return losses
