"""Cold start on MovieLens-100k: how well are items that no event has touched retrieved from their features?

Protocol (`cold` part):
- 20 % of the items (uniformly, `split_seed`) are held out: every event on them is removed from training.
  The warm items are renumbered to rows 1..n_warm and the held-out ones to n_warm+1..n, so training (and its
  uniform negatives) sees only the warm catalogue, as a live system would before the new items arrived.
- Both models train on the warm events with trainer/studies' leave-one-out split and early stopping on its
  validation targets (warm items only, full ranking): (a) the id-only TwoTower (`train_offline`, as
  `livetower eval` trains it), (b) `FeatureTwoTower` (trainer/features.py: id + feature item tower, the same
  user tower and loss).
- Cold targets: every event on a held-out item, with the user's earlier events on warm items as history
  (at least `min_history`; held-out items are unknown to the user tower's id table, as an unknown id is to
  the server). Ranked over ALL n items, the history excluded (trainer/studies/ranking.py). Scorers: the feature
  model (held-out items feature-only, warm items id + features), the same with every item feature-only,
  the id-only model (held-out items have fresh, never-trained rows: a served engine would not even hold
  them), popularity within the user's most-watched genre (genre members first, by training count), the genre
  alone (genre members first, ties random), and popularity.
- The same models are also scored on the warm split's own test targets (warm items only).

`warm` part: the standard ml-100k full-ranking protocol (trainer/studies: leave-one-out, every item ranked)
for the id-only model vs the feature model (every item with a training event has an id row), so a regression
from the features shows.

`python -m trainer.studies.coldstart --part cold` (or warm, or all); `--models id` or `--models features` trains
one of the two (each part's baselines are computed either way); `--debug` is the test size.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from contracts.catalog import CatalogRecord
from contracts.catalog_files import read_ml100k_items
from trainer.config import TrainConfig
from trainer.data.sequences import SequenceData, load_ml100k_sequences
from trainer.examples import stack_windows
from contracts.engine_format.item_features import FeatureConfig, featurize
from trainer.features import FeatureTwoTower
from trainer.model import TwoTower
from trainer.studies.offline import PRESETS
from trainer.studies.offline_train import OfflineTrainConfig, _Validation, offline_step_loss, train_offline
from trainer.studies.protocols import EvalSet, leave_one_out
from trainer.studies.ranking import Counts, evaluate_model_on, evaluate_popularity_on, popularity_counts
from trainer.training import make_grad_scaler, train_epochs
from trainer.user_features import windows_of_users
from trainer.vocab import table_rows_for

PARTS = ("cold", "warm")
MODELS = ("id", "features")  # the id-only TwoTower, the FeatureTwoTower
MODEL_NAMES = {"id": "id_only_model", "features": "feature_model"}  # their names in the results
DEFAULT_DATA = Path("../shared/data/ml-100k")
GENRE = "genre"  # the categorical feature the genre baselines read


@dataclass(kw_only=True, slots=True)
class ColdStartConfig:
    train: OfflineTrainConfig = field(default_factory=lambda: PRESETS["default"]())  # model, loss, epochs
    features: FeatureConfig = field(default_factory=lambda: FeatureConfig(numeric=("release_year",)))
    holdout_frac: float = 0.2   # share of items held out of training entirely (cold part)
    split_seed: int = 0         # which items are held out
    max_users: int = 0          # 0 = every user; else only the first this many (the debug size)
    min_history: int = 1        # a cold target needs at least this many earlier warm items
    ks: tuple[int, ...] = (10, 20)
    models: tuple[str, ...] = MODELS  # which models to train (one per command keeps a full-length run short)

    def __post_init__(self) -> None:
        if not 0.0 < self.holdout_frac < 1.0:
            raise ValueError(f"ColdStartConfig.holdout_frac must be in (0, 1), got {self.holdout_frac}")
        if self.max_users < 0 or self.min_history < 0:
            raise ValueError("ColdStartConfig.max_users and min_history must be >= 0")
        if not self.models or any(m not in MODELS for m in self.models) or len(set(self.models)) < len(self.models):
            raise ValueError(f"ColdStartConfig.models must be distinct names from {MODELS}, got {self.models}")
        if self.features.dim != self.train.train.model.dim:
            raise ValueError(f"ColdStartConfig.features.dim={self.features.dim} must equal the model's dim "
                             f"{self.train.train.model.dim}")

    @classmethod
    def debug(cls) -> ColdStartConfig:
        """The test size: 120 users, the tiny tower, 2 epochs, small hashed vocabularies."""
        train = OfflineTrainConfig(train=TrainConfig.tiny_debug(precision="fp32"), epochs=2, patience=0)
        feats = FeatureConfig(dim=train.train.model.dim, cat_buckets=512, text_buckets=4096,
                              numeric=("release_year",))
        return cls(train=train, features=feats, max_users=120)


def load_ml100k(data_dir: Path, max_users: int = 0) -> tuple[SequenceData, list[CatalogRecord | None]]:
    """(sequences, records) where records[i] is item i's catalogue record (None at 0 and for gaps)."""
    data = load_ml100k_sequences(Path(data_dir) / "u.data")
    if max_users:
        data = SequenceData(name=data.name, items=data.items[:max_users], times=data.times[:max_users],
                            n_items=data.n_items)
    records: list[CatalogRecord | None] = [None] * (data.n_items + 1)
    for r in read_ml100k_items(Path(data_dir) / "u.item"):
        i = int(r.id[1:])
        if i <= data.n_items:
            records[i] = r
    return data, records


def train_feature_model(model: TwoTower, train_seqs: list[np.ndarray], n_items: int, cfg: OfflineTrainConfig,
                        *, validate: Callable, progress: Callable[[str], None],
                        user_rows: np.ndarray | None = None) -> tuple[TwoTower, dict]:
    """train_offline's loop (same windows, loss, epochs, weight average, early stopping) on a given model.
    train_offline builds its own TwoTower; this is its body with the model passed in (no learned temperature).
    user_rows: train_seqs' index -> the model's user-feature row (a model with user features), else None."""
    tc = cfg.train
    windows, users = windows_of_users(((u, list(seq), len(seq)) for u, seq in enumerate(train_seqs) if len(seq) >= 2),
                                      tc.model.max_history)
    inputs_WT, targets_WT, mask_WT = stack_windows(windows)
    users_W = None if user_rows is None else user_rows[np.asarray(users, np.int64)]
    counts_R = np.bincount(np.concatenate(train_seqs), minlength=n_items + 1)
    item_prob_R = torch.from_numpy(counts_R / max(counts_R.sum(), 1)).float()
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay, fused=cfg.fused_adam)
    log = {"windows": len(windows), "targets": int(mask_WT.sum()), "epochs_run": 0, "epoch_loss": [],
           "val_curve": [], "best_epoch": 0, "best_val": None}
    progress(f"training on {len(windows)} windows ({int(mask_WT.sum())} targets), up to {cfg.epochs} epochs")
    t0 = time.perf_counter()
    val = _Validation(cfg=cfg, model=model, opt=opt, validate=validate, progress=progress, log=log, log_scale=None)
    train_epochs(model, opt, offline_step_loss(model, cfg, item_prob_R, n_items, None), inputs_WT, targets_WT,
                 mask_WT, cfg=tc, epochs=cfg.epochs, seed=tc.seed, scaler=make_grad_scaler(tc.precision),
                 lengths_W=(inputs_WT != 0).sum(1) if cfg.bucket else None, users_W=users_W, on_epoch_end=val)
    log["val_seconds"] = val.val_seconds
    log["train_seconds"] = time.perf_counter() - t0 - val.val_seconds
    if val.best_state is not None:
        model.load_state_dict(val.best_state)
        log["best_val"] = val.best_val
    model.eval()
    return model, log


def make_feature_model(cfg: ColdStartConfig, records_by_row: list[CatalogRecord | None],
                       has_id_rows: np.ndarray) -> FeatureTwoTower:
    """A FeatureTwoTower over table_rows_for(len - 1) rows; has_id_rows: the rows (>= 1) with an id embedding."""
    n_rows = table_rows_for(len(records_by_row) - 1)
    feats = featurize(list(records_by_row) + [None] * (n_rows - len(records_by_row)), cfg.features)
    has_id_R = torch.zeros(n_rows)
    has_id_R[torch.from_numpy(np.asarray(has_id_rows, np.int64))] = 1.0
    torch.manual_seed(cfg.train.train.seed)
    return FeatureTwoTower(cfg.train.train.model, n_rows, cfg.features, feats, has_id_R)


@contextlib.contextmanager
def features_only(model: FeatureTwoTower):
    """Every item scored from its features alone while inside."""
    saved = model.has_id_R.clone()
    model.has_id_R.zero_()
    try:
        yield model
    finally:
        model.has_id_R.copy_(saved)


def genre_matrix(records_by_row: list[CatalogRecord | None]) -> tuple[np.ndarray, list[str]]:
    """(rows, G) 0/1: each row's values of the genre feature."""
    names = sorted({g for r in records_by_row if r is not None for g in r.categorical.get(GENRE, ())})
    col = {g: j for j, g in enumerate(names)}
    out = np.zeros((len(records_by_row), len(names)), np.float64)
    for i, r in enumerate(records_by_row):
        for g in () if r is None else r.categorical.get(GENRE, ()):
            out[i, col[g]] = 1.0
    return out, names


def evaluate_genre(ev: EvalSet, genres_RG: np.ndarray, counts_R: np.ndarray, ks: tuple[int, ...],
                   by_popularity: bool) -> dict[str, float]:
    """Items of the user's most-watched genre (over the history; ties: first genre) first, then the rest;
    within each group by training count (by_popularity) or all tied (ties broken at random in expectation)."""
    n = genres_RG.shape[0] - 1
    counts = Counts(len(ev), sampled=False)
    pop_N = counts_R[1:].astype(np.float64)
    pop_N = pop_N / (pop_N.max() + 1.0) if by_popularity else np.zeros(n)
    for s in range(0, len(ev), 512):
        idx_B = np.arange(s, min(s + 512, len(ev)))
        top_B = np.array([int(genres_RG[ev.histories[i]].sum(0).argmax()) for i in idx_B])
        scores_BN = torch.from_numpy(genres_RG[1:, top_B].T + pop_N[None, :])
        counts.add(idx_B, scores_BN, ev.targets[idx_B], [ev.histories[i] for i in idx_B], None)
    return counts.metrics(ks)["full"]


def _full(m: dict) -> dict[str, float]:
    return {k: round(v, 5) for k, v in m["full"].items()}


def _val_fn(ev: EvalSet, n_items: int, user_rows: np.ndarray | None = None) -> Callable:
    return lambda model: evaluate_model_on(model, ev, n_items, ks=(10,), user_rows=user_rows)["full"]["ndcg@10"]


def run_cold(data: SequenceData, records: list[CatalogRecord | None], cfg: ColdStartConfig,
             progress: Callable[[str], None]) -> dict:
    n, t0 = data.n_items, time.perf_counter()
    perm = np.random.default_rng(cfg.split_seed).permutation(np.arange(1, n + 1))
    is_cold = np.zeros(n + 1, bool)
    is_cold[perm[:round(cfg.holdout_frac * n)]] = True
    warm_ids, cold_ids = np.flatnonzero(~is_cold[1:]) + 1, np.flatnonzero(is_cold[1:]) + 1
    n_warm = len(warm_ids)
    row_of = np.zeros(n + 1, np.int64)
    row_of[warm_ids], row_of[cold_ids] = np.arange(1, n_warm + 1), np.arange(n_warm + 1, n + 1)
    records_by_row: list[CatalogRecord | None] = [None] * (n + 1)
    for i in range(1, n + 1):
        records_by_row[row_of[i]] = records[i]
    warm = SequenceData(name="ml100k-warm-items", items=[row_of[s[~is_cold[s]]] for s in data.items], n_items=n_warm)
    split = leave_one_out(warm)
    hu, hh, ht = [], [], []
    for u, seq in enumerate(data.items):
        rows, cold_j = row_of[seq], is_cold[seq]
        for j in np.flatnonzero(cold_j):
            hist = rows[:j][~cold_j[:j]]
            if len(hist) >= max(cfg.min_history, 1):
                hu.append(u), hh.append(hist), ht.append(rows[j])
    cold_ev = EvalSet(users=np.asarray(hu, np.int64), histories=hh, targets=np.asarray(ht, np.int64))
    cold_events = int(sum(is_cold[s].sum() for s in data.items))
    notes = {"items": n, "warm_items": n_warm, "held_out_items": len(cold_ids),
             "held_out_items_with_events": int(len(np.unique(cold_ev.targets))),
             "events": data.n_actions, "held_out_events": cold_events, "cold_targets": len(cold_ev),
             "cold_target_users": int(len(np.unique(cold_ev.users))), "warm_split": split.notes}
    progress(f"cold split: {notes}")

    ks = cfg.ks
    counts_R = popularity_counts(split.train, n)
    genres_RG, genre_names = genre_matrix(records_by_row)
    cold = {
        "popularity_in_top_genre": {k: round(v, 5) for k, v in
                                    evaluate_genre(cold_ev, genres_RG, counts_R, ks, by_popularity=True).items()},
        "top_genre_only": {k: round(v, 5) for k, v in
                           evaluate_genre(cold_ev, genres_RG, counts_R, ks, by_popularity=False).items()},
        "popularity": _full(evaluate_popularity_on(counts_R, cold_ev, ks=ks)),
    }
    warm_test = {"popularity": _full(evaluate_popularity_on(popularity_counts(split.train, n_warm), split.test,
                                                            ks=ks))}
    logs = {}
    for name, model, log in _train_models(cfg, split, n_warm, records_by_row, np.arange(1, n_warm + 1), progress):
        progress(f"scoring {len(cold_ev)} cold targets over all {n} items")
        if isinstance(model, FeatureTwoTower):
            with features_only(model):
                cold[f"{name}_all_items_feature_only"] = _full(evaluate_model_on(model, cold_ev, n, ks=ks))
                warm_test[f"{name}_all_items_feature_only"] = _full(evaluate_model_on(model, split.test, n_warm,
                                                                                      ks=ks))
        else:
            model.grow(table_rows_for(n))  # (a no-op here: the warm table already has a row for every id)
        cold[name] = _full(evaluate_model_on(model, cold_ev, n, ks=ks))
        warm_test[name] = _full(evaluate_model_on(model, split.test, n_warm, ks=ks))
        logs[name] = log
    return {"split": notes, "genres": genre_names, "cold_targets": cold, "warm_test_of_warm_items": warm_test,
            "train": logs, "seconds": round(time.perf_counter() - t0, 1)}


def _train_models(cfg: ColdStartConfig, split, n_items: int, records_by_row: list[CatalogRecord | None],
                  has_id_rows: np.ndarray, progress: Callable[[str], None]):
    """Yield (name, trained model, training log) for each model of cfg.models, one at a time."""
    for k, which in enumerate(cfg.models, 1):
        progress(f"[{k}/{len(cfg.models)}] {which} model")
        if which == "id":
            model, log = train_offline(split.train, n_items, cfg.train, validate=_val_fn(split.val, n_items),
                                       progress=progress)
        else:
            model, log = train_feature_model(make_feature_model(cfg, records_by_row, has_id_rows), split.train,
                                             n_items, cfg.train, validate=_val_fn(split.val, n_items),
                                             progress=progress)
        yield MODEL_NAMES[which], model, log


def run_warm(data: SequenceData, records: list[CatalogRecord | None], cfg: ColdStartConfig,
             progress: Callable[[str], None]) -> dict:
    n, t0 = data.n_items, time.perf_counter()
    split = leave_one_out(data)
    progress(f"warm split (leave-one-out, full ranking): {split.notes}")
    ks, counts_R = cfg.ks, popularity_counts(split.train, n)
    trained = np.flatnonzero(counts_R[1:]) + 1  # items with a training event have an id row
    out, logs = {}, {}
    for name, model, log in _train_models(cfg, split, n, records, trained, progress):
        out[name] = {"val": _full(evaluate_model_on(model, split.val, n, ks=ks)),
                     "test": _full(evaluate_model_on(model, split.test, n, ks=ks))}
        logs[name] = log
    out["popularity"] = {s: _full(evaluate_popularity_on(counts_R, ev, ks=ks))
                         for s, ev in (("val", split.val), ("test", split.test))}
    return {"split": split.notes, "metrics": out, "train": logs, "seconds": round(time.perf_counter() - t0, 1)}


def format_table(result: dict) -> str:
    lines = []
    if "cold" in result:
        c = result["cold"]
        cols = list(c["cold_targets"]["popularity"])
        lines.append(f"cold: {c['split']['cold_targets']} targets on {c['split']['held_out_items']} held-out items, "
                     f"ranked over all {c['split']['items']} items")
        lines.append(f"{'':40}" + "".join(f"{k:>12}" for k in cols))
        for name, m in c["cold_targets"].items():
            lines.append(f"{name:40}" + "".join(f"{m[k]:>12.4f}" for k in cols))
        lines.append(f"warm test of the same models ({c['split']['warm_split']['eval_users']} users, warm items):")
        for name, m in c["warm_test_of_warm_items"].items():
            lines.append(f"{name:40}" + "".join(f"{m[k]:>12.4f}" for k in cols))
    if "warm" in result:
        w = result["warm"]["metrics"]
        cols = list(w["popularity"]["test"])
        lines.append("warm: ml-100k leave-one-out, full ranking")
        lines.append(f"{'':40}" + "".join(f"{k:>12}" for k in cols))
        for name, m in w.items():
            for s in ("val", "test"):
                lines.append(f"{s + ' ' + name:40}" + "".join(f"{m[s][k]:>12.4f}" for k in cols))
    for part in ("cold", "warm"):
        if part in result:
            t = result[part]["train"]
            lines.append(f"{part} training: " + ", ".join(
                f"{k} {v['train_seconds']:.0f} s, {v['epochs_run']} epochs (best {v['best_epoch']})"
                for k, v in t.items()))
    return "\n".join(lines)


def study_args(prog: str, doc: str, parts: tuple[str, ...], *, data: str, debug: str,
               out: str) -> argparse.ArgumentParser:
    """The flags the ml-100k studies share (this one and trainer/studies/user_features.py)."""
    p = argparse.ArgumentParser(prog=prog, description=doc.split("\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help=f"the ml-100k directory ({data})")
    p.add_argument("--part", choices=(*parts, "all"), default="all")
    p.add_argument("--debug", action="store_true", help=f"the test size: {debug}, tiny tower, 2 epochs")
    p.add_argument("--epochs", type=int, help="maximum epochs per model (default: the preset's)")
    p.add_argument("--train-seed", type=int, help="training seed (init, shuffles, negatives; default 0)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--out", type=Path, help=f"JSON result file (default {out})")
    return p


def main(argv: list[str] | None = None) -> int:
    p = study_args("python -m trainer.studies.coldstart", __doc__, PARTS, data="u.data, u.item", debug="120 users",
                   out="bench-results/coldstart/<part>.json")
    p.add_argument("--patience", type=int, help="validations without improvement before stopping")
    p.add_argument("--holdout", type=float, help="share of items held out (default 0.2)")
    p.add_argument("--id-dropout", type=float, help="FeatureConfig.id_dropout (default 0.5)")
    p.add_argument("--seed", type=int, help="split seed (which items are held out; default 0)")
    p.add_argument("--models", default=",".join(MODELS),
                   help=f"comma-separated, from {MODELS}: the models to train (default both)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = ColdStartConfig.debug() if args.debug else ColdStartConfig()
    cfg.train = dataclasses.replace(cfg.train, **{k: v for k, v in (("epochs", args.epochs),
                                                                  ("patience", args.patience)) if v is not None})
    if args.train_seed is not None:
        cfg.train = dataclasses.replace(cfg.train, train=cfg.train.train.replace(seed=args.train_seed))
    if args.id_dropout is not None:
        cfg.features = dataclasses.replace(cfg.features, id_dropout=args.id_dropout)
    cfg = dataclasses.replace(cfg, models=tuple(m.strip() for m in args.models.split(",") if m.strip()),
                              **{k: v for k, v in (("holdout_frac", args.holdout), ("split_seed", args.seed))
                                 if v is not None})
    t_start = time.perf_counter()

    def progress(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.0f} s] {msg}", file=sys.stderr, flush=True)

    data, records = load_ml100k(args.data, cfg.max_users)
    result: dict = {"command": "python -m trainer.studies.coldstart " + " ".join(sys.argv[1:] if argv is None
                                                                                 else argv),
                    "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "threads": args.threads,
                    "config": {"train": cfg.train.to_dict(), "features": dataclasses.asdict(cfg.features),
                               "holdout_frac": cfg.holdout_frac, "split_seed": cfg.split_seed,
                               "max_users": cfg.max_users, "min_history": cfg.min_history, "models": cfg.models}}
    tag = "" if cfg.models == MODELS else "-" + "-".join(cfg.models)
    out = args.out or Path("bench-results/coldstart") / f"{args.part}{tag}{'-debug' if args.debug else ''}.json"
    return run_parts((("cold", run_cold), ("warm", run_warm)), args.part, (data, records, cfg, progress), result,
                     out, format_table, progress)


def run_parts(parts, chosen: str, inputs: tuple, result: dict, out: Path, table: Callable[[dict], str],
              progress: Callable[[str], None]) -> int:
    """A study's main: run each (name, fn(*inputs)) part chosen ("all" or its name) into result[name], write
    result as JSON to out, print table(result)."""
    for part, fn in parts:
        if chosen in (part, "all"):
            progress(f"== {part} part ==")
            result[part] = fn(*inputs)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(table(result))
    progress(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
