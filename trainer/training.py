"""Optimisation steps over next-item windows: precision (bf16 / fp16 + GradScaler / fp32), sampled softmax,
expert-bias update. The step is shared with the DDP workers of trainer/elastic/."""

from __future__ import annotations

import contextlib
import time
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trainer import ema
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
        if ema.EMA_KEY in state:  # new rows' average starts at their initial value
            state[ema.EMA_KEY] = torch.cat([state[ema.EMA_KEY], new.detach()[old.shape[0]:].clone()])
        opt.state[new] = state


# Autocast dtype per TrainConfig.precision (None: no autocast). fp16 also scales the loss (GradScaler).
AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def autocast(precision: str, device_type: str = "cpu"):
    """The forward's autocast context for `precision` on `device_type` ("cpu" or "cuda")."""
    if precision not in AUTOCAST_DTYPES:
        raise ValueError(f"precision must be one of {tuple(AUTOCAST_DTYPES)}, got {precision!r}")
    dtype = AUTOCAST_DTYPES[precision]
    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type, dtype=dtype)


def make_grad_scaler(precision: str, device_type: str = "cpu",
                     init_scale: float = 256.0) -> torch.amp.GradScaler | None:
    """A GradScaler for fp16 (its 5-bit exponent underflows small gradients); None for bf16/fp32.
    Keep one across rounds (train_windows(scaler=...)) so the scale it found is not searched again."""
    return torch.amp.GradScaler(device_type, init_scale=init_scale) if precision == "fp16" else None


class WindowLoss(nn.Module):
    """model + sampled softmax as one module, so DDP's forward hooks see the whole step (trainer/elastic/)."""

    def __init__(self, model: TwoTower):
        super().__init__()
        self.model = model

    def forward(self, inp_BT: torch.Tensor, tgt_BT: torch.Tensor, m_BT: torch.Tensor, *, item_prob_R: torch.Tensor,
                n_items: int, n_random: int, temperature: float, generator: torch.Generator | None,
                in_batch: bool, logq: bool, pairwise_weight: float) -> torch.Tensor:
        # = model.user_states(inp_BT)[m_BT], but only the target positions are projected and normalised, in fp32:
        # under fp16 autocast F.normalize's eps underflows, so the all-zero pad positions would give 0/0 = NaN
        # (and NaN gradients through the mask), and cosine / 0.05 wants more than bf16's 8 mantissa bits anyway.
        hidden_MD = self.model.hidden_states(inp_BT)[m_BT]
        user_MD = F.normalize(self.model.user_proj(hidden_MD).float(), dim=-1)
        return sampled_softmax_loss(self.model, user_MD, tgt_BT[m_BT], item_prob_R=item_prob_R,
                                    n_items=n_items, n_random=n_random, temperature=temperature,
                                    generator=generator, in_batch=in_batch, logq=logq,
                                    pairwise_weight=pairwise_weight)


def train_step(loss_module: nn.Module, model: TwoTower, opt: torch.optim.Optimizer, inp_BT: torch.Tensor,
               tgt_BT: torch.Tensor, m_BT: torch.Tensor, *, item_prob_R: torch.Tensor, n_items: int, cfg: TrainConfig,
               generator: torch.Generator | None, scaler: torch.amp.GradScaler | None = None, weight: float = 1.0,
               before_bias_update: Callable[[TwoTower], None] | None = None, ema_decay: float = 0.0) -> float:
    """One optimiser step; returns the (unweighted) loss. `loss_module` is WindowLoss(model) or DDP around it;
    `weight` scales the loss before backward (DDP: this rank's share of the global batch's targets);
    `before_bias_update` may all-reduce the expert loads first (DDP); ema_decay > 0: then the weight average
    (trainer/ema.py; the same on every DDP rank, as the weights are)."""
    with autocast(cfg.precision, model_device(model).type):
        loss = loss_module(inp_BT, tgt_BT, m_BT, item_prob_R=item_prob_R, n_items=n_items,
                           n_random=cfg.n_random_negatives, temperature=cfg.model.temperature, generator=generator,
                           in_batch=cfg.in_batch_negatives, logq=cfg.logq_correction,
                           pairwise_weight=cfg.pairwise_weight)
    opt.zero_grad(set_to_none=True)
    scaled = loss * weight if weight != 1.0 else loss
    if scaler is not None:
        scaler.scale(scaled).backward()
        scaler.step(opt)  # skipped (and the scale halved) when a gradient overflowed
        scaler.update()
    else:
        scaled.backward()
        opt.step()
    ema.update(opt, ema_decay)
    if before_bias_update is not None:
        before_bias_update(model)
    model.update_expert_bias()
    return float(loss.detach())


def train_windows(model: TwoTower, opt: torch.optim.Optimizer, inputs_WT: np.ndarray, targets_WT: np.ndarray,
                  mask_WT: np.ndarray, *, item_prob_R: torch.Tensor, n_items: int, cfg: TrainConfig,
                  epochs: int, generator: torch.Generator,
                  progress: Callable[[str], None] | None = None,
                  scaler: torch.amp.GradScaler | None = None) -> list[float]:
    """Train on the windows for `epochs` in this process; returns the mean loss of each epoch.

    Precision follows cfg.precision on the model's device; fp16 uses `scaler` (a fresh one when None)."""
    model.train()
    device = model_device(model)
    if scaler is None:
        scaler = make_grad_scaler(cfg.precision, device.type, cfg.fp16_init_scale)
    loss_module = WindowLoss(model)
    item_prob_R = item_prob_R.to(device)
    W = inputs_WT.shape[0]
    steps_per_epoch = -(-W // cfg.batch_size)
    ema_decay = ema.decay_for(cfg.ema_epochs, steps_per_epoch)
    losses = []
    last_report = time.monotonic()
    for epoch in range(epochs):
        order = torch.randperm(W, generator=generator).numpy()
        total, steps = 0.0, 0
        for s in range(0, W, cfg.batch_size):
            b = order[s:s + cfg.batch_size]
            m_BT = torch.from_numpy(mask_WT[b])
            if not bool(m_BT.any()):
                continue
            inp_BT = torch.from_numpy(inputs_WT[b]).to(device)
            tgt_BT = torch.from_numpy(targets_WT[b]).to(device)
            total += train_step(loss_module, model, opt, inp_BT, tgt_BT, m_BT.to(device), item_prob_R=item_prob_R,
                                n_items=n_items, cfg=cfg, generator=generator, scaler=scaler, ema_decay=ema_decay)
            steps += 1
            if progress and time.monotonic() - last_report > 30:  # long epochs show progress
                last_report = time.monotonic()
                progress(f"epoch {epoch + 1}/{epochs}: step {steps}/{steps_per_epoch}, loss {total / steps:.4f}")
        losses.append(total / max(steps, 1))
        if progress:
            progress(f"epoch {epoch + 1}/{epochs}: loss {losses[-1]:.4f} over {W} windows")
    model.eval()
    return losses
