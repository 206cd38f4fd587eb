"""Optimisation over next-item windows: precision (bf16 / fp16 + GradScaler / fp32), the optimiser step, the
expert-bias update, and the one epoch loop (`train_epochs`) that the sidecar (`train_windows`), the DDP workers
(trainer/elastic/worker.py) and the offline harness (trainer/studies/offline_train.py) all run.

The plan of an epoch depends only on (seed, epoch): a permutation of the windows drawn from a generator seeded
by both, cut into global batches of cfg.batch_size (offline: bucketed by length first). Rank r of W trains
batch[r::W] of every global batch, so ranks train disjoint shards of the same permutation, the global batches do
not depend on W, and a run resumed at start_epoch trains exactly the epochs it has left.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trainer import ema
from trainer.config import TrainConfig
from trainer.loss import sampled_softmax_loss
from trainer.model import TwoTower, fuse_user_features


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


# (inp_BT, tgt_BT, m_BT, generator, users_B) -> the batch's loss; called under autocast. generator: the random
# negatives'; users_B: each window's user row for the model's user features (trainer/user_features.py), or None.
StepLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Generator, torch.Tensor | None], torch.Tensor]


class WindowLoss(nn.Module):
    """model + sampled softmax as one module, so DDP's forward hooks see the whole step (trainer/elastic/)."""

    def __init__(self, model: TwoTower):
        super().__init__()
        self.model = model

    def forward(self, inp_BT: torch.Tensor, tgt_BT: torch.Tensor, m_BT: torch.Tensor, *, item_prob_R: torch.Tensor,
                n_items: int, n_random: int, temperature: float, generator: torch.Generator | None,
                in_batch: bool, logq: bool, pairwise_weight: float, users_B: torch.Tensor | None = None) -> torch.Tensor:
        # = model.user_states(inp_BT)[m_BT], but only the target positions are projected and normalised, in fp32:
        # under fp16 autocast F.normalize's eps underflows, so the all-zero pad positions would give 0/0 = NaN
        # (and NaN gradients through the mask), and cosine / 0.05 wants more than bf16's 8 mantissa bits anyway.
        hidden_MD = self.model.hidden_states(inp_BT)[m_BT]
        user_MD = F.normalize(self.model.user_proj(hidden_MD).float(), dim=-1)
        if (f_BD := self.model.user_feature_vectors(users_B)) is not None:  # each target's user, fused
            user_MD = fuse_user_features(user_MD, f_BD.float().unsqueeze(1).expand(-1, m_BT.shape[1], -1)[m_BT])
        return sampled_softmax_loss(self.model, user_MD, tgt_BT[m_BT], item_prob_R=item_prob_R,
                                    n_items=n_items, n_random=n_random, temperature=temperature,
                                    generator=generator, in_batch=in_batch, logq=logq,
                                    pairwise_weight=pairwise_weight)


def window_loss(loss_module: nn.Module, cfg: TrainConfig, item_prob_R: torch.Tensor, n_items: int) -> StepLoss:
    """The sidecar's loss (sampled softmax with cfg's negatives) as a StepLoss. loss_module is WindowLoss(model)
    or DDP around it: the call must go through DDP for its gradient all-reduce."""
    item_prob_R = item_prob_R.to(next(loss_module.parameters()).device)

    def loss(inp_BT: torch.Tensor, tgt_BT: torch.Tensor, m_BT: torch.Tensor, gen: torch.Generator,
             users_B: torch.Tensor | None = None) -> torch.Tensor:
        return loss_module(inp_BT, tgt_BT, m_BT, users_B=users_B, item_prob_R=item_prob_R, n_items=n_items,
                           n_random=cfg.n_random_negatives, temperature=cfg.model.temperature, generator=gen,
                           in_batch=cfg.in_batch_negatives, logq=cfg.logq_correction,
                           pairwise_weight=cfg.pairwise_weight)
    return loss


def train_step(loss_fn: StepLoss, model: nn.Module, opt: torch.optim.Optimizer, inp_BT: torch.Tensor,
               tgt_BT: torch.Tensor, m_BT: torch.Tensor, *, precision: str, generator: torch.Generator | None,
               scaler: torch.amp.GradScaler | None = None, weight: float = 1.0,
               before_bias_update: Callable[[nn.Module], None] | None = None, ema_decay: float = 0.0,
               users_B: torch.Tensor | None = None) -> float:
    """One optimiser step; returns the (unweighted) loss. `weight` scales the loss before backward (DDP: this
    rank's share of the global batch's targets); `before_bias_update` may all-reduce the expert loads first
    (DDP); ema_decay > 0: then the weight average (trainer/ema.py; the same on every DDP rank, as the weights are)."""
    with autocast(precision, model_device(model).type):
        loss = loss_fn(inp_BT, tgt_BT, m_BT, generator, users_B)
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


# ---- the plan: which windows each step of an epoch trains, the same on every rank ----

BUCKET_BATCHES = 50  # length bucketing sorts the permutation by length within chunks of this many batches


def round_seed(generator: torch.Generator) -> int:
    """A train_epochs seed drawn from a caller's long-lived generator (the sidecar's, one per call)."""
    return int(torch.randint(0, 2**31 - 1, (1,), generator=generator))


def global_batches(order_N: np.ndarray, batch_size: int) -> list[np.ndarray]:
    return [order_N[s:s + batch_size] for s in range(0, len(order_N), batch_size)]


def epoch_batches(n_windows: int, batch_size: int, seed: int, epoch: int,
                  lengths_W: np.ndarray | None = None) -> list[np.ndarray]:
    """The global batches of epoch `epoch`: a permutation seeded by (seed, epoch) cut into batch_size pieces.
    With lengths_W (history length per window) the permutation is sorted by length within chunks of
    BUCKET_BATCHES batches (less padding per batch) and the batches are then shuffled by the same generator."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order_N = torch.randperm(n_windows, generator=g).numpy()
    if lengths_W is None:
        return global_batches(order_N, batch_size)
    chunk = BUCKET_BATCHES * batch_size
    if n_windows:
        order_N = np.concatenate([c[np.argsort(lengths_W[c], kind="stable")]
                                  for c in np.split(order_N, range(chunk, n_windows, chunk))])
    batches = global_batches(order_N, batch_size)
    return [batches[i] for i in torch.randperm(len(batches), generator=g).numpy()]


def rank_generator(seed: int, epoch: int, rank: int) -> torch.Generator:
    """The RNG of a rank's random negatives in an epoch."""
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 4099 + rank + 1)


def local_share(batch_B: np.ndarray, mask_WT: np.ndarray, rank: int, world: int) -> tuple[np.ndarray, float]:
    """(window indices this rank trains, loss weight world * M_r / M). A rank whose share has no target trains a
    stand-in window of the batch with weight 0, so that it still joins the gradient all-reduce."""
    mine = batch_B[rank::world]
    m_r = int(mask_WT[mine].sum()) if len(mine) else 0
    m_all = int(mask_WT[batch_B].sum())
    if m_r == 0:
        first = next(i for i in batch_B if mask_WT[i].any())
        return np.asarray([first]), 0.0
    return mine, world * m_r / m_all


@dataclass(frozen=True, slots=True)
class Shard:
    """The part of every global batch this process trains: rank of world. world > 1 needs all_reduce (an
    in-place sum over the ranks, e.g. torch.distributed.all_reduce) and a DDP loss_fn."""
    rank: int = 0
    world: int = 1
    all_reduce: Callable[[torch.Tensor], object] | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world:
            raise ValueError(f"Shard.rank must be in [0, world={self.world}), got {self.rank}")
        if self.world > 1 and self.all_reduce is None:
            raise ValueError("Shard.all_reduce is required when world > 1")


def sum_expert_loads(model: nn.Module, all_reduce: Callable[[torch.Tensor], object]) -> None:
    """All-reduce (sum) every MoE layer's recorded load, so each replica makes the same bias update."""
    moes = [m for m in model.moe_layers() if m.last_load is not None]
    if not moes:
        return
    flat = torch.cat([m.last_load.float() for m in moes])
    all_reduce(flat)
    for m, part in zip(moes, flat.split([m.last_load.numel() for m in moes])):
        m.last_load = part.to(m.last_load.dtype)


def _expert_load_hook(shard: Shard, stand_in: bool) -> Callable[[nn.Module], None] | None:
    """Before the router-bias update: a stand-in's loads are zeroed (they must not count), and with world > 1 the
    loads are summed over the ranks, so every replica keeps the same router bias."""
    if not stand_in and shard.world == 1:
        return None

    def hook(model: nn.Module) -> None:
        if stand_in:
            for moe in model.moe_layers():
                if moe.last_load is not None:
                    moe.last_load = torch.zeros_like(moe.last_load)
        if shard.world > 1:
            sum_expert_loads(model, shard.all_reduce)
    return hook


# ---- the epoch loop ----

@dataclass(kw_only=True, slots=True)
class EpochLoopResult:
    losses: list[float]            # mean global-step loss per epoch trained here (start_epoch..)
    window_epochs_N: np.ndarray    # epochs each window was trained in, summed over ranks (this call only)
    steps: int                     # optimiser steps this rank took
    t_first_step: float            # time.time() before the first step
    t_end: float


def train_epochs(model: nn.Module, opt: torch.optim.Optimizer, loss_fn: StepLoss, inputs_WT: np.ndarray,
                 targets_WT: np.ndarray, mask_WT: np.ndarray, *, cfg: TrainConfig, epochs: int, seed: int,
                 start_epoch: int = 0, shard: Shard = Shard(), scaler: torch.amp.GradScaler | None = None,
                 lengths_W: np.ndarray | None = None, users_W: np.ndarray | None = None,
                 before_step: Callable[[int], None] | None = None,
                 after_step: Callable[[int], None] | None = None,
                 on_epoch_end: Callable[[int, list[float], np.ndarray], bool | None] | None = None,
                 progress: Callable[[str], None] | None = None) -> EpochLoopResult:
    """Train epochs start_epoch..epochs-1 of the (seed, epoch) plan as shard.rank of shard.world.

    Precision follows cfg.precision on the model's device (fp16: pass `scaler`); cfg.ema_epochs sets the weight
    average's decay from the epoch's steps. lengths_W: bucket the batches by length and crop their all-pad left
    columns (offline). users_W: each window's user row, for a model with user features (else None).
    before_step(g) / after_step(g): around global step g (after_step only when a step was
    taken; the gradients are still there). on_epoch_end(epochs done, losses, window_epochs_N) runs on every rank,
    the model in eval mode; returning True stops the loop there."""
    device = model_device(model)
    rank, world = shard.rank, shard.world
    n_windows = inputs_WT.shape[0]
    counts_N = np.zeros(n_windows, np.int64)
    losses: list[float] = []
    steps, t_first, last_report = 0, 0.0, time.monotonic()
    for epoch in range(start_epoch, epochs):
        model.train()
        batches = epoch_batches(n_windows, cfg.batch_size, seed, epoch, lengths_W)
        ema_decay = ema.decay_for(cfg.ema_epochs, len(batches))
        gen = rank_generator(seed, epoch, rank)
        weighted_loss, local_loss, n_steps = 0.0, 0.0, 0
        epoch_counts_N = np.zeros(n_windows, np.int64)
        for s, batch_B in enumerate(batches):
            g_step = epoch * len(batches) + s
            if before_step is not None:
                before_step(g_step)
            epoch_counts_N[batch_B[rank::world]] += 1  # this rank's share is done (a share without targets too)
            if not mask_WT[batch_B].any():
                continue  # nothing to learn in the whole batch: every rank skips it alike
            mine, weight = local_share(batch_B, mask_WT, rank, world)
            # Left-padded windows: the first T - L columns of a batch whose longest history is L are all pad.
            cols = slice(None) if lengths_W is None else slice(-max(int(lengths_W[mine].max()), 1), None)
            if not t_first:
                t_first = time.time()
            loss = train_step(loss_fn, model, opt, torch.from_numpy(inputs_WT[mine, cols]).to(device),
                              torch.from_numpy(targets_WT[mine, cols]).to(device),
                              torch.from_numpy(mask_WT[mine, cols]).to(device), precision=cfg.precision,
                              generator=gen, scaler=scaler, weight=weight if world > 1 else 1.0,
                              before_bias_update=_expert_load_hook(shard, weight == 0.0), ema_decay=ema_decay,
                              users_B=None if users_W is None else torch.from_numpy(users_W[mine]).to(device))
            if after_step is not None:
                after_step(g_step)
            weighted_loss += loss * weight / world if world > 1 else loss
            local_loss += loss
            n_steps += 1
            steps += 1
            if progress and time.monotonic() - last_report > 30:  # long epochs show progress
                last_report = time.monotonic()
                progress(f"epoch {epoch + 1}/{epochs}: step {s + 1}/{len(batches)}, "
                         f"{'rank-local ' if world > 1 else ''}loss {local_loss / n_steps:.4f}")
        if world > 1:
            t = torch.tensor([weighted_loss], dtype=torch.float64, device=device)  # NCCL wants device tensors
            shard.all_reduce(t)
            weighted_loss = float(t)
            c = torch.from_numpy(epoch_counts_N).to(device)
            shard.all_reduce(c)
            epoch_counts_N = c.cpu().numpy()
        counts_N += epoch_counts_N
        losses.append(weighted_loss / max(n_steps, 1))
        model.eval()
        if progress:
            progress(f"epoch {epoch + 1}/{epochs}: loss {losses[-1]:.4f} over {n_windows} windows on {world} "
                     f"worker(s)")
        if on_epoch_end is not None and on_epoch_end(epoch + 1, losses, counts_N):
            break
    model.eval()
    return EpochLoopResult(losses=losses, window_epochs_N=counts_N, steps=steps, t_first_step=t_first or time.time(),
                           t_end=time.time())


def train_windows(model: TwoTower, opt: torch.optim.Optimizer, inputs_WT: np.ndarray, targets_WT: np.ndarray,
                  mask_WT: np.ndarray, *, item_prob_R: torch.Tensor, n_items: int, cfg: TrainConfig,
                  epochs: int, generator: torch.Generator,
                  progress: Callable[[str], None] | None = None,
                  scaler: torch.amp.GradScaler | None = None,
                  after_step: Callable[[int], None] | None = None,
                  users_W: np.ndarray | None = None) -> list[float]:
    """train_epochs in this process with the sidecar's loss, on a seed drawn from `generator`; returns the mean
    loss of each epoch. fp16 uses `scaler` (a fresh one when None); after_step and users_W as train_epochs'."""
    if scaler is None:
        scaler = make_grad_scaler(cfg.precision, model_device(model).type, cfg.fp16_init_scale)
    res = train_epochs(model, opt, window_loss(WindowLoss(model), cfg, item_prob_R, n_items), inputs_WT,
                       targets_WT, mask_WT, cfg=cfg, epochs=epochs, seed=round_seed(generator), scaler=scaler,
                       progress=progress, after_step=after_step, users_W=users_W)
    return res.losses
