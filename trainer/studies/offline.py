"""Offline evaluation on a named protocol (see trainer/studies/protocols.py): split, train with early
stopping on validation, then report validation and test metrics for the model and for popularity.

`sasrec` and `full` share the leave-one-out split, so one training can report both; `time` has
its own split. The test set is scored once, after training, with the best-validation model.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import numpy as np

from trainer.config import TrainConfig
from trainer.data.sequences import SequenceData
from trainer.model_config import LEGACY_VALUES, ModelConfig
from trainer.studies.offline_train import OfflineTrainConfig, train_offline
from trainer.studies.protocols import PROTOCOLS, EvalSet, make_split, negatives_for
from trainer.studies.ranking import evaluate_model_on, evaluate_popularity_on, popularity_counts

VAL_NEG_SEED, TEST_NEG_SEED, VAL_SUBSAMPLE_SEED = 1, 2, 3


def _preset_default(**_) -> OfflineTrainConfig:
    """The sidecar's TrainConfig and loss (docs/quality.md run 59: run 29's tower, the best Games validation
    config within the serving budget, with the weight average and the pairwise term), except fp32: on the
    short length-cropped batches here one step (64 x 12) took 69 ms in fp32 vs 88 ms under bf16 autocast on
    this 1-thread CPU (at 64 x 50: 0.56 vs 0.47 s). Up to 60 epochs, patience 6 (as run 29)."""
    return OfflineTrainConfig(train=TrainConfig(precision="fp32"), epochs=60, patience=6)


def _legacy_train(**model_changes) -> TrainConfig:
    """The sidecar's TrainConfig before issue 9's results (runs 1-21): two MoE layers, user/item projections,
    RoPE only, temperature 0.05; in-batch + 256 uniform negatives with log-Q, lr 3e-3, batch 64, 2 epochs/round."""
    model = ModelConfig(n_layers=2, first_k_dense=0, temperature=0.05, dropout=0.0, **LEGACY_VALUES)
    return TrainConfig(model=dataclasses.replace(model, **model_changes), precision="fp32", batch_size=64, lr=3e-3,
                       n_random_negatives=256, in_batch_negatives=True, logq_correction=True, epochs_per_round=2,
                       ema_epochs=0.0, pairwise_weight=0.0)


def _preset_legacy(**_) -> OfflineTrainConfig:
    """The pre-issue-9 sidecar config (`--preset default` in jsonl lines 1-21), 20 epochs, patience 3."""
    return OfflineTrainConfig(train=_legacy_train())


def _preset_tuned(**_) -> OfflineTrainConfig:
    """Best validation config of the legacy family (docs/quality.md run 6): the legacy config with 2048
    uniform negatives (instead of 256) and dropout 0.3 (instead of 0). Starting point of runs 7-31."""
    return OfflineTrainConfig(train=_legacy_train(dropout=0.3).replace(n_random_negatives=2048))


def _preset_tiny(**_) -> OfflineTrainConfig:
    return OfflineTrainConfig(train=TrainConfig.tiny_debug(precision="fp32"), epochs=2, patience=0)


PRESETS: dict[str, Callable[..., OfflineTrainConfig]] = {
    "default": _preset_default, "legacy": _preset_legacy, "tuned": _preset_tuned, "tiny": _preset_tiny}


def _subset(ev: EvalSet, idx: np.ndarray) -> EvalSet:
    return EvalSet(users=ev.users[idx], histories=[ev.histories[i] for i in idx], targets=ev.targets[idx])


def _flat(m: dict[str, dict[str, float]], protocols: list[str]) -> dict[str, float]:
    """{"full": {...}, "sampled": {...}} -> {"sasrec_hr@10": .., "full_recall@10": ..} for the protocols asked."""
    out = {}
    for p in protocols:
        part = m["sampled"] if p == "sasrec" else m["full"]
        out.update({f"{p}_{k}": round(v, 5) for k, v in part.items()})
    return out


def run_eval(data: SequenceData, protocols: list[str], cfg: OfflineTrainConfig, *, n_negatives: int = 100,
             neg_exclude: str = "sequence", ks: tuple[int, ...] = (10, 20),
             progress: Callable[[str], None] = print) -> dict:
    if not protocols or any(p not in PROTOCOLS for p in protocols):
        raise ValueError(f"protocols must be a non-empty list from {PROTOCOLS}, got {protocols}")
    families = {"time" if p == "time" else "loo" for p in protocols}
    if len(families) != 1:
        raise ValueError(f"protocols {protocols}: 'time' has its own split; run it separately from sasrec/full")
    split = make_split(data, protocols[0])
    sampled = "sasrec" in protocols
    progress(f"{data.name}: {data.summary()} | split {split.notes}")
    t0 = time.perf_counter()
    val_neg = negatives_for(data, split.val, split, n=n_negatives, exclude=neg_exclude, seed=VAL_NEG_SEED) \
        if sampled else None
    test_neg = negatives_for(data, split.test, split, n=n_negatives, exclude=neg_exclude, seed=TEST_NEG_SEED) \
        if sampled else None
    progress(f"negatives drawn in {time.perf_counter() - t0:.1f} s")

    # Early stopping looks at (a deterministic subsample of) the validation set only.
    pick = np.random.default_rng(VAL_SUBSAMPLE_SEED).permutation(len(split.val))
    if cfg.max_val_users:
        pick = np.sort(pick[:cfg.max_val_users])
    val_small = _subset(split.val, pick)
    val_small_neg = None if val_neg is None else val_neg[pick]
    primary = protocols[0]

    def validate(model) -> float:
        m = evaluate_model_on(model, val_small, split.n_items, negatives_BK=val_small_neg, ks=(10,))
        return (m["sampled"] if primary == "sasrec" else m["full"])["ndcg@10"]

    model, log = train_offline(split.train, split.n_items, cfg, validate=validate, progress=progress)
    t1 = time.perf_counter()
    res_model = {name: _flat(evaluate_model_on(model, ev, split.n_items, negatives_BK=neg, ks=ks), protocols)
                 for name, ev, neg in (("val", split.val, val_neg), ("test", split.test, test_neg))}
    counts = popularity_counts(split.train, split.n_items)
    res_pop = {name: _flat(evaluate_popularity_on(counts, ev, negatives_BK=neg, ks=ks), protocols)
               for name, ev, neg in (("val", split.val, val_neg), ("test", split.test, test_neg))}
    alt = None
    if sampled:  # the same test users with negatives drawn under the other exclusion rule, for comparison
        other = "train" if neg_exclude == "sequence" else "sequence"
        neg = negatives_for(data, split.test, split, n=n_negatives, exclude=other, seed=TEST_NEG_SEED + 10)
        alt = {"exclude": other,
               "model": _flat(evaluate_model_on(model, split.test, split.n_items, negatives_BK=neg, ks=ks), ["sasrec"]),
               "popularity": _flat(evaluate_popularity_on(counts, split.test, negatives_BK=neg, ks=ks), ["sasrec"])}
    return {
        "dataset": data.summary(), "protocols": protocols, "split": split.notes, "test_other_negatives": alt,
        "negatives": {"n": n_negatives, "exclude": neg_exclude} if sampled else None,
        "validation_metric": f"{primary} ndcg@10 on {len(val_small)} validation users",
        "config": cfg.to_dict(), "train": log, "eval_seconds": round(time.perf_counter() - t1, 1),
        "model": res_model, "popularity": res_pop,
    }


def format_table(result: dict) -> str:
    """Plain-text table: one row per (split, scorer), one column per metric."""
    cols = list(result["model"]["test"])
    lines = [f"{'':14}" + "".join(f"{c:>18}" for c in cols)]
    for split in ("val", "test"):
        for who in ("model", "popularity"):
            row = result[who][split]
            lines.append(f"{split + ' ' + who:14}" + "".join(f"{row[c]:>18.4f}" for c in cols))
    if alt := result.get("test_other_negatives"):
        lines.append(f"test, negatives excluding the user's {alt['exclude']} items only: model "
                     f"HR@10 {alt['model']['sasrec_hr@10']:.4f} NDCG@10 {alt['model']['sasrec_ndcg@10']:.4f}, "
                     f"popularity HR@10 {alt['popularity']['sasrec_hr@10']:.4f} "
                     f"NDCG@10 {alt['popularity']['sasrec_ndcg@10']:.4f}")
    t = result["train"]
    lines.append(f"train {t['train_seconds']:.0f} s, {t['epochs_run']} epochs run, best validation epoch "
                 f"{t['best_epoch']}")
    return "\n".join(lines)
