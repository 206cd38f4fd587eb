"""Offline training for quality studies: length-bucketed batches, a choice of loss, and early
stopping on the VALIDATION set only (the best validation state is restored; test is never seen).

Losses (score s = cosine / temperature):
- "sampled_softmax": the sidecar's loss (trainer/loss.py), with the TrainConfig's choice of negatives:
  `n_random_negatives` shared uniform ones, plus the batch's positives if `in_batch_negatives`, log-Q
  corrected if `logq_correction`.
- "full_softmax": cross-entropy over every item (no sampling).
- "bce": SASRec's loss: per target, one uniform random negative, binary cross-entropy.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from trainer import ema
from trainer.config import TrainConfig
from trainer.examples import stack_windows, windows_for_new
from trainer.loss import full_softmax_loss, sampled_softmax_loss
from trainer.model import TwoTower
from trainer.training import autocast, make_optimizer
from trainer.vocab import table_rows_for

LOSSES = ("sampled_softmax", "full_softmax", "bce")
ARCHS = ("deepseek", "sasrec")  # the served DeepSeek tower (trainer/model.py) | plain SASRec (trainer/studies/sasrec.py)
MIN_TEMPERATURE = 0.01  # a learned temperature is clamped here (as CLIP's logit scale <= 100)


@dataclass(kw_only=True, slots=True)
class OfflineTrainConfig:
    train: TrainConfig = field(default_factory=TrainConfig)  # model, batch_size, lr, weight_decay, negatives, seed
    arch: str = "deepseek"      # one of ARCHS: "sasrec" trains the reference architecture on the same pipeline
    epochs: int = 20            # maximum passes over the training windows
    loss: str = "sampled_softmax"  # one of LOSSES
    eval_every: int = 1         # validate every this many epochs
    patience: int = 3           # stop after this many validations without a better one (0 = never stop early)
    max_val_users: int = 5000   # validation users scored during training (deterministic subsample; 0 = all)
    bucket: bool = True         # batch windows of similar length and crop the padding (same result, faster)
    fused_adam: bool = True     # torch's fused AdamW kernel (the same update; 2.5 vs 19 ms per step here); False =
                                # the sidecar's make_optimizer (for-loop AdamW)
    learn_temperature: bool = False  # train the temperature too: log(1/T), initialised at model.temperature, no
                                     # weight decay, T kept >= MIN_TEMPERATURE; its value per epoch is logged
    lr_decay: float = 1.0       # multiply the learning rate by this after every validation that is not the best
                                # so far (1 = constant learning rate)
    logits_bf16: bool = True    # full_softmax: the (targets x items) matmuls in bf16 (fp32 accumulation and
                                # softmax; ~2x faster on one AMX CPU thread, gradients within ~0.3%); False = fp32

    def __post_init__(self) -> None:
        for name in ("epochs", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"OfflineTrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("patience", "max_val_users"):
            if getattr(self, name) < 0:
                raise ValueError(f"OfflineTrainConfig.{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 < self.lr_decay <= 1.0:
            raise ValueError(f"OfflineTrainConfig.lr_decay must be in (0, 1], got {self.lr_decay}")
        if self.arch not in ARCHS:
            raise ValueError(f"OfflineTrainConfig.arch must be one of {ARCHS}, got {self.arch!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"OfflineTrainConfig.loss must be one of {LOSSES}, got {self.loss!r}")

    def to_dict(self) -> dict:
        d = {f: getattr(self, f) for f in self.__slots__ if f != "train"}
        t = self.train
        d.update(model=t.model.to_dict(), batch_size=t.batch_size, lr=t.lr, weight_decay=t.weight_decay,
                 n_random_negatives=t.n_random_negatives, precision=t.precision, seed=t.seed,
                 logq=t.logq_correction, in_batch=t.in_batch_negatives)
        for name in ("pairwise_weight", "ema_epochs"):  # recorded only when used: earlier runs' configs read the same
            if getattr(t, name):
                d[name] = getattr(t, name)
        return d


def batch_order(lengths_W: np.ndarray, batch: int, rng: np.random.Generator, bucket: bool) -> list[np.ndarray]:
    """Shuffled batches; with bucket, windows are sorted by length within chunks of 50 batches."""
    order = rng.permutation(len(lengths_W))
    if bucket:
        chunk = 50 * batch
        order = np.concatenate([c[np.argsort(lengths_W[c], kind="stable")]
                                for c in np.split(order, range(chunk, len(order), chunk))]) if len(order) else order
    batches = [order[s:s + batch] for s in range(0, len(order), batch)]
    return [batches[i] for i in rng.permutation(len(batches))]


def offline_loss(model: TwoTower, user_MD: torch.Tensor, pos_M: torch.Tensor, cfg: OfflineTrainConfig,
                 item_prob_R: torch.Tensor, n_items: int, gen: torch.Generator,
                 temperature: torch.Tensor | None = None) -> torch.Tensor:
    """user_MD: normalised user states (one per target); pos_M: target rows (>= 1); temperature: a learned
    (0-dim, with grad) temperature, or None for the model config's."""
    tc = cfg.train
    temp = cfg.train.model.temperature if temperature is None else temperature
    if cfg.loss == "full_softmax":  # user_MD holds the valid (non-pad) target positions only
        items_ND = model.encode_items(torch.arange(1, n_items + 1, device=pos_M.device))  # once per step
        return full_softmax_loss(user_MD.float(), items_ND.float(), pos_M - 1, temperature=temp,
                                 bf16_matmul=cfg.logits_bf16)
    if cfg.loss == "bce":
        neg_M = torch.randint(1, n_items + 1, pos_M.shape, generator=gen)
        pos_s = (user_MD * model.encode_items(pos_M)).sum(-1).float() / temp
        neg_s = (user_MD * model.encode_items(neg_M)).sum(-1).float() / temp
        return F.softplus(-pos_s).mean() + F.softplus(neg_s).mean()
    return sampled_softmax_loss(model, user_MD, pos_M, item_prob_R=item_prob_R, n_items=n_items,
                                n_random=tc.n_random_negatives, temperature=temp, generator=gen,
                                in_batch=tc.in_batch_negatives, logq=tc.logq_correction,
                                pairwise_weight=tc.pairwise_weight)


def train_offline(train_seqs: list[np.ndarray], n_items: int, cfg: OfflineTrainConfig, *,
                  validate: Callable[[TwoTower], float] | None = None,
                  progress: Callable[[str], None] = print) -> tuple[TwoTower, dict]:
    """Train on every next-item target inside train_seqs (item ids = rows). validate(model) -> score to
    maximise (validation set only). Returns the model at its best validation and a training log."""
    tc = cfg.train
    T = tc.model.max_history
    windows = [w for seq in train_seqs if len(seq) >= 2 for w in windows_for_new(list(seq), len(seq), T)]
    inputs_WT, targets_WT, mask_WT = stack_windows(windows)
    lengths_W = (inputs_WT != 0).sum(1)
    counts_R = np.bincount(np.concatenate([s for s in train_seqs]), minlength=n_items + 1)
    item_prob_R = torch.from_numpy(counts_R / max(counts_R.sum(), 1)).float()
    torch.manual_seed(tc.seed)
    if cfg.arch == "sasrec":
        from trainer.studies.sasrec import SASRec

        model = SASRec(tc.model, table_rows_for(n_items))
    else:
        model = TwoTower(tc.model, table_rows_for(n_items))
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay, fused=True) \
        if cfg.fused_adam else make_optimizer(model, tc)
    log_scale = None  # learned log(1 / temperature)
    if cfg.learn_temperature:
        log_scale = torch.nn.Parameter(torch.tensor(-math.log(tc.model.temperature)))
        opt.add_param_group({"params": [log_scale], "weight_decay": 0.0})
    gen = torch.Generator().manual_seed(tc.seed)
    rng = np.random.default_rng(tc.seed)
    log = {"windows": len(windows), "targets": int(mask_WT.sum()), "epochs_run": 0, "epoch_loss": [],
           "val_curve": [], "best_epoch": 0, "best_val": None}
    best_state, best_val, stale, val_s = None, -math.inf, 0, 0.0
    t0 = time.perf_counter()
    progress(f"training on {len(windows)} windows ({int(mask_WT.sum())} targets), up to {cfg.epochs} epochs")
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        total, steps, t_ep = 0.0, 0, time.perf_counter()
        batches = batch_order(lengths_W, tc.batch_size, rng, cfg.bucket)
        ema_decay = ema.decay_for(tc.ema_epochs, len(batches))
        for b in batches:
            L = max(int(lengths_W[b].max()), 1) if cfg.bucket else T  # crop the all-pad left columns
            inp_BL = torch.from_numpy(inputs_WT[b, -L:])
            tgt_BL = torch.from_numpy(targets_WT[b, -L:])
            m_BL = torch.from_numpy(mask_WT[b, -L:])
            if not bool(m_BL.any()):
                continue
            with autocast(tc.precision):
                states_BLD = model.user_states(inp_BL)
                temp = None if log_scale is None else torch.exp(-log_scale.clamp(max=-math.log(MIN_TEMPERATURE)))
                loss = offline_loss(model, states_BLD[m_BL], tgt_BL[m_BL], cfg, item_prob_R, n_items, gen, temp)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            ema.update(opt, ema_decay)
            model.update_expert_bias()
            total += float(loss.detach())
            steps += 1
        model.eval()
        log["epoch_loss"].append(total / max(steps, 1))
        log["epochs_run"] = epoch
        msg = f"epoch {epoch}/{cfg.epochs}: loss {total / max(steps, 1):.4f} ({time.perf_counter() - t_ep:.0f} s)"
        if log_scale is not None:
            log.setdefault("temperature", []).append(round(math.exp(-min(float(log_scale.detach()), -math.log(MIN_TEMPERATURE))), 5))
            msg += f", temperature {log['temperature'][-1]:.4f}"
        if validate is not None and (epoch % cfg.eval_every == 0 or epoch == cfg.epochs):
            t_val = time.perf_counter()
            with ema.swapped_in(model, opt):  # validate (and keep as best) the averaged weights, if any
                v = validate(model)
                if v > best_val:
                    best_state = copy.deepcopy(model.state_dict())
            val_s += time.perf_counter() - t_val
            log["val_curve"].append([epoch, v])
            msg += f", val {v:.4f}"
            if v > best_val:
                best_val, stale, log["best_epoch"] = v, 0, epoch
            else:
                stale += 1
                if cfg.lr_decay < 1.0:
                    for g in opt.param_groups:
                        g["lr"] *= cfg.lr_decay
                    msg += f", lr -> {opt.param_groups[0]['lr']:.2e}"
        progress(msg)
        if cfg.patience and stale >= cfg.patience:
            progress(f"early stop: no better validation for {stale} checks; best epoch {log['best_epoch']}")
            break
    log["val_seconds"] = val_s  # validation during training, not counted in train_seconds
    log["train_seconds"] = time.perf_counter() - t0 - val_s
    if best_state is not None:  # validated with the averaged weights, if any
        model.load_state_dict(best_state)
        log["best_val"] = best_val
    else:
        model = ema.averaged(model, opt)  # the last averaged weights (the model itself without an average)
        log["best_epoch"] = log["epochs_run"]
    model.eval()
    return model, log
