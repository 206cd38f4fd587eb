"""User features on MovieLens-100k: does the user tower gain from u.user's age, gender, occupation and region?

Two models, trained alike (trainer/studies/coldstart.py's loop: the same windows, loss, epochs, weight average
and early stopping, the same seed): the history-only TwoTower, and the same with user features
(trainer/user_features.py: a feature encoder over the user's record, fused late with the history vector).
Every item is ranked (full ranking, the history excluded).

- `warm`: leave-one-out on every user (trainer/studies/protocols.py), reported overall and by history length
  (short histories are where a profile should matter).
- `new`: `holdout_frac` of the users (split_seed) are held out of training entirely, as users who arrive after
  the model was trained. Their targets are their 2nd..(max_new_targets+1)-th items, each from the items before
  it: a new user's first few recommendations. Both models run on the same histories; the feature model also
  reads the user's record (which it never trained on).

`python -m trainer.studies.user_features [--part warm|new|all] [--debug]`; results in
bench-results/user_features/<part>.json.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from contracts.catalog import CatalogRecord
from contracts.catalog_files import read_ml100k_users
from trainer.config import TrainConfig
from trainer.data.sequences import SequenceData, load_ml100k_sequences
from trainer.model import TwoTower
from trainer.studies.coldstart import _val_fn, run_parts, study_args, train_feature_model
from trainer.studies.offline import PRESETS
from trainer.studies.offline_train import OfflineTrainConfig
from trainer.studies.protocols import EvalSet, leave_one_out
from trainer.studies.ranking import evaluate_model_on
from trainer.user_features import attach_user_features, user_feature_config
from trainer.vocab import table_rows_for

PARTS = ("warm", "new")
LENGTH_BUCKETS = ((1, 5), (6, 20), (21, 10**9))  # history lengths (inclusive) reported separately


@dataclass(kw_only=True, slots=True)
class UserFeatureStudyConfig:
    train: OfflineTrainConfig = field(default_factory=lambda: PRESETS["default"]())  # model, loss, epochs
    cat_buckets: int = 1 << 12    # hashed (feature, value) rows of the user encoder (ml-100k: ~900 values)
    holdout_frac: float = 0.2     # `new`: share of users held out of training
    split_seed: int = 0           # `new`: which users
    max_new_targets: int = 5      # `new`: targets per held-out user (their 2nd.. items)
    max_users: int = 0            # 0 = every user; else the first this many (the debug size)
    ks: tuple[int, ...] = (10, 20)

    def __post_init__(self) -> None:
        if not 0.0 < self.holdout_frac < 1.0:
            raise ValueError(f"UserFeatureStudyConfig.holdout_frac must be in (0, 1), got {self.holdout_frac}")
        if self.max_new_targets < 1 or self.max_users < 0:
            raise ValueError("UserFeatureStudyConfig.max_new_targets must be >= 1 and max_users >= 0")

    @classmethod
    def debug(cls) -> UserFeatureStudyConfig:
        """The test size: 150 users, the tiny tower, 2 epochs."""
        return cls(train=OfflineTrainConfig(train=TrainConfig.tiny_debug(precision="fp32"), epochs=2, patience=0),
                   cat_buckets=256, max_users=150)


def load_ml100k_users(data_dir: Path, max_users: int = 0) -> tuple[SequenceData, list[CatalogRecord | None]]:
    """(sequences, records): records[u] is sequence u's user record (ml-100k numbers its users 1..943 in order)."""
    data = load_ml100k_sequences(Path(data_dir) / "u.data")
    if max_users:
        data = SequenceData(name=data.name, items=data.items[:max_users], times=data.times[:max_users],
                            n_items=data.n_items)
    by_id = {r.id: r for r in read_ml100k_users(Path(data_dir) / "u.user")}
    return data, [by_id.get(f"u{u + 1}") for u in range(data.n_users)]


def _train_both(cfg: UserFeatureStudyConfig, train_seqs: list[np.ndarray], n_items: int, val: EvalSet,
                records: list[CatalogRecord | None], progress: Callable[[str], None]):
    """Yield (name, model, user_rows or None, log): the history-only model, then the user-feature one."""
    tc = cfg.train.train
    user_rows = np.arange(1, len(records) + 1, dtype=np.int64)  # sequence u -> table row u + 1
    for name in ("history_only", "user_features"):
        progress(f"training the {name} model")
        torch.manual_seed(tc.seed)
        model = TwoTower(tc.model, table_rows_for(n_items))
        rows = None
        if name == "user_features":
            fcfg = user_feature_config([r for r in records if r is not None], tc.model.out_dim,
                                       cat_buckets=cfg.cat_buckets)
            attach_user_features(model, fcfg, records)
            rows = user_rows
        model, log = train_feature_model(model, train_seqs, n_items, cfg.train, validate=_val_fn(val, n_items, rows),
                                         progress=progress, user_rows=rows)
        yield name, model, rows, log


def _metrics(model: TwoTower, ev: EvalSet, n_items: int, rows: np.ndarray | None, ks) -> dict:
    out = {"all": _full(evaluate_model_on(model, ev, n_items, ks=ks, user_rows=rows)), "targets": len(ev)}
    lens = np.array([len(h) for h in ev.histories])
    for lo, hi in LENGTH_BUCKETS:
        idx = np.flatnonzero((lens >= lo) & (lens <= hi))
        if len(idx):
            sub = EvalSet(users=ev.users[idx], histories=[ev.histories[i] for i in idx], targets=ev.targets[idx])
            out[f"history_{lo}-{hi if hi < 10**9 else ''}".rstrip("-")] = {
                **_full(evaluate_model_on(model, sub, n_items, ks=ks, user_rows=rows)), "targets": len(idx)}
    return out


def _full(m: dict) -> dict[str, float]:
    return {k: round(v, 5) for k, v in m["full"].items()}


def run_warm(data: SequenceData, records, cfg: UserFeatureStudyConfig, progress) -> dict:
    t0, split = time.perf_counter(), leave_one_out(data)
    out, logs = {}, {}
    for name, model, rows, log in _train_both(cfg, split.train, data.n_items, split.val, records, progress):
        out[name] = {"val": _metrics(model, split.val, data.n_items, rows, cfg.ks),
                     "test": _metrics(model, split.test, data.n_items, rows, cfg.ks)}
        logs[name] = log
    return {"split": split.notes, "metrics": out, "train": logs, "seconds": round(time.perf_counter() - t0, 1)}


def run_new(data: SequenceData, records, cfg: UserFeatureStudyConfig, progress) -> dict:
    t0 = time.perf_counter()
    perm = np.random.default_rng(cfg.split_seed).permutation(data.n_users)
    held = np.zeros(data.n_users, bool)
    held[perm[:round(cfg.holdout_frac * data.n_users)]] = True
    # Held-out users keep their place (and record row) with an empty training sequence.
    kept = SequenceData(name="ml100k-kept-users", items=[s if not held[u] else s[:0] for u, s in
                                                        enumerate(data.items)], n_items=data.n_items)
    split = leave_one_out(kept)
    nu, nh, nt = [], [], []
    for u in np.flatnonzero(held):
        seq = data.items[u]
        for j in range(1, min(len(seq), cfg.max_new_targets + 1)):
            nu.append(u), nh.append(seq[:j]), nt.append(seq[j])
    new_ev = EvalSet(users=np.asarray(nu, np.int64), histories=nh, targets=np.asarray(nt, np.int64))
    notes = {"users": data.n_users, "held_out_users": int(held.sum()), "new_user_targets": len(new_ev),
             "kept_split": split.notes}
    progress(f"new-user split: {notes}")
    out, logs = {}, {}
    for name, model, rows, log in _train_both(cfg, split.train, data.n_items, split.val, records, progress):
        out[name] = {"new_users": _metrics(model, new_ev, data.n_items, rows, cfg.ks),
                     "kept_users_test": _metrics(model, split.test, data.n_items, rows, cfg.ks)}
        logs[name] = log
    return {"split": notes, "metrics": out, "train": logs, "seconds": round(time.perf_counter() - t0, 1)}


def format_table(result: dict) -> str:
    lines = []
    for part in PARTS:
        if part not in result:
            continue
        m = result[part]["metrics"]
        for ev_name in next(iter(m.values())):
            for bucket in m["history_only"][ev_name]:
                if bucket == "targets":
                    continue
                rows = [(name, m[name][ev_name][bucket]) for name in m]
                n = rows[0][1]["targets"] if bucket != "all" else m["history_only"][ev_name]["targets"]
                cols = [k for k in rows[0][1] if k != "targets"]
                lines.append(f"{part} / {ev_name} / {bucket} ({n} targets): " + "; ".join(
                    f"{name} " + " ".join(f"{k} {v[k]:.4f}" for k in cols) for name, v in rows))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = study_args("python -m trainer.studies.user_features", __doc__, PARTS, data="u.data, u.user",
                      debug="150 users", out="bench-results/user_features/<part>.json").parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = UserFeatureStudyConfig.debug() if args.debug else UserFeatureStudyConfig()
    if args.epochs is not None:
        cfg.train = dataclasses.replace(cfg.train, epochs=args.epochs)
    if args.train_seed is not None:
        cfg.train = dataclasses.replace(cfg.train, train=cfg.train.train.replace(seed=args.train_seed))
    t_start = time.perf_counter()

    def progress(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.0f} s] {msg}", file=sys.stderr, flush=True)

    data, records = load_ml100k_users(args.data, cfg.max_users)
    result: dict = {"command": "python -m trainer.studies.user_features " + " ".join(sys.argv[1:] if argv is None
                                                                                     else argv),
                    "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "threads": args.threads,
                    "config": {"train": cfg.train.to_dict(), "cat_buckets": cfg.cat_buckets,
                               "holdout_frac": cfg.holdout_frac, "split_seed": cfg.split_seed,
                               "max_new_targets": cfg.max_new_targets, "max_users": cfg.max_users}}
    out = args.out or Path("bench-results/user_features") / f"{args.part}{'-debug' if args.debug else ''}.json"
    return run_parts((("warm", run_warm), ("new", run_new)), args.part, (data, records, cfg, progress), result, out,
                     format_table, progress)


if __name__ == "__main__":
    sys.exit(main())
