"""Offline training for quality studies: length-bucketed batches, a choice of loss, and early
stopping on the VALIDATION set only (the best validation state is restored; test is never seen).
The epochs are the sidecar's epoch loop (trainer/training.py: train_epochs) with this module's loss
and an on-epoch-end validation.

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
from trainer.training import StepLoss, make_grad_scaler, make_optimizer, train_epochs
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


def offline_step_loss(model: TwoTower, cfg: OfflineTrainConfig, item_prob_R: torch.Tensor, n_items: int,
                      log_scale: torch.Tensor | None) -> StepLoss:
    """offline_loss as train_epochs' StepLoss; log_scale: the learned log(1 / temperature), or None."""
    def loss(inp_BL: torch.Tensor, tgt_BL: torch.Tensor, m_BL: torch.Tensor, gen: torch.Generator,
             users_B: torch.Tensor | None = None) -> torch.Tensor:
        states_BLD = model.user_states(inp_BL, users_B)
        temp = None if log_scale is None else torch.exp(-log_scale.clamp(max=-math.log(MIN_TEMPERATURE)))
        return offline_loss(model, states_BLD[m_BL], tgt_BL[m_BL], cfg, item_prob_R, n_items, gen, temp)
    return loss


@dataclass(slots=True)
class _Validation:
    """train_epochs' on_epoch_end for train_offline: log the epoch, validate the averaged weights every
    eval_every epochs (and at the last), keep the best state, decay the learning rate after a validation that
    is not the best, and stop after `patience` of those in a row."""
    cfg: OfflineTrainConfig
    model: TwoTower
    opt: torch.optim.Optimizer
    validate: Callable[[TwoTower], float] | None
    progress: Callable[[str], None]
    log: dict
    log_scale: torch.Tensor | None
    best_state: dict | None = None
    best_val: float = -math.inf
    stale: int = 0
    val_seconds: float = 0.0
    t_epoch: float = field(default_factory=time.perf_counter)

    def __call__(self, epoch: int, losses: list[float], _window_epochs_N: np.ndarray) -> bool:
        cfg, log = self.cfg, self.log
        log["epoch_loss"].append(losses[-1])
        log["epochs_run"] = epoch
        msg = f"epoch {epoch}/{cfg.epochs}: loss {losses[-1]:.4f} ({time.perf_counter() - self.t_epoch:.0f} s)"
        if self.log_scale is not None:
            t = math.exp(-min(float(self.log_scale.detach()), -math.log(MIN_TEMPERATURE)))
            log.setdefault("temperature", []).append(round(t, 5))
            msg += f", temperature {log['temperature'][-1]:.4f}"
        if self.validate is not None and (epoch % cfg.eval_every == 0 or epoch == cfg.epochs):
            msg += self._validate(epoch)
        self.progress(msg)
        self.t_epoch = time.perf_counter()
        if cfg.patience and self.stale >= cfg.patience:
            self.progress(f"early stop: no better validation for {self.stale} checks; best epoch {log['best_epoch']}")
            return True
        return False

    def _validate(self, epoch: int) -> str:
        t_val = time.perf_counter()
        with ema.swapped_in(self.model, self.opt):  # validate (and keep as best) the averaged weights, if any
            v = self.validate(self.model)
            if v > self.best_val:
                self.best_state = copy.deepcopy(self.model.state_dict())
        self.val_seconds += time.perf_counter() - t_val
        self.log["val_curve"].append([epoch, v])
        msg = f", val {v:.4f}"
        if v > self.best_val:
            self.best_val, self.stale, self.log["best_epoch"] = v, 0, epoch
        else:
            self.stale += 1
            if self.cfg.lr_decay < 1.0:
                for g in self.opt.param_groups:
                    g["lr"] *= self.cfg.lr_decay
                msg += f", lr -> {self.opt.param_groups[0]['lr']:.2e}"
        return msg


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
    log = {"windows": len(windows), "targets": int(mask_WT.sum()), "epochs_run": 0, "epoch_loss": [],
           "val_curve": [], "best_epoch": 0, "best_val": None}
    t0 = time.perf_counter()
    progress(f"training on {len(windows)} windows ({int(mask_WT.sum())} targets), up to {cfg.epochs} epochs")
    val = _Validation(cfg=cfg, model=model, opt=opt, validate=validate, progress=progress, log=log,
                      log_scale=log_scale)
    train_epochs(model, opt, offline_step_loss(model, cfg, item_prob_R, n_items, log_scale), inputs_WT, targets_WT,
                 mask_WT, cfg=tc, epochs=cfg.epochs, seed=tc.seed, scaler=make_grad_scaler(tc.precision),
                 lengths_W=lengths_W if cfg.bucket else None, on_epoch_end=val)
    log["val_seconds"] = val.val_seconds  # validation during training, not counted in train_seconds
    log["train_seconds"] = time.perf_counter() - t0 - val.val_seconds
    if val.best_state is not None:  # validated with the averaged weights, if any
        model.load_state_dict(val.best_state)
        log["best_val"] = val.best_val
    else:
        model = ema.averaged(model, opt)  # the last averaged weights (the model itself without an average)
        log["best_epoch"] = log["epochs_run"]
    model.eval()
    return model, log
