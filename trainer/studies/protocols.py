"""Offline evaluation protocols: splits and sampled negatives.

- `sasrec` (Kang & McAuley, ICDM 2018, and kang205/SASRec util.py): per user with >= 3 actions the
  last item is the test target and the second-to-last the validation target; the model trains on
  the rest (users with < 3 actions train only). Validation ranks the target among 100 negatives
  for the history seq[:-2]; test for the history seq[:-1] (the validation item is input, never a
  training target). Negatives are drawn uniformly with replacement from items not excluded
  (`neg_exclude`): "sequence" = not in the user's whole sequence (never the target itself), or
  "train" = not in the user's training items only, exactly as util.py does (so the target, or the
  validation item, can then be drawn as a negative with probability ~100/n_items).
- `full`: the same split ranked against every item, the user's history items excluded (the target
  keeps its score even if it is also in the history).
- `time`: a global time split (data with timestamps): t_val / t_test are the (1 - val_frac -
  test_frac) / (1 - test_frac) quantiles of all event times. The model trains on events before
  t_val only. Every event in [t_val, t_test) is a validation target and every event at or after
  t_test a test target, each with the user's whole earlier sequence as history (later events are
  input, never trained on). Full ranking. (Only first-event-per-user targets would leave ml-100k
  with ~90 test users: most of its users are active in a short window.)

Metrics (trainer/evaluate.py's `expected_metrics`, through trainer/studies/ranking.py) break ties
uniformly at random in expectation: a target tied with e other items is equally likely at each of the
e + 1 positions (matters for popularity, whose scores tie a lot; model scores do not).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from trainer.data.sequences import SequenceData

PROTOCOLS = ("sasrec", "full", "time")
NEG_EXCLUDE = ("sequence", "train")


@dataclass(kw_only=True, slots=True)
class EvalSet:
    """One evaluation round: a history and one target per evaluated user."""
    users: np.ndarray            # (B,) user indices into SequenceData.items
    histories: list[np.ndarray]  # B histories (item ids, oldest first) fed to the user tower
    targets: np.ndarray          # (B,) target item ids

    def __len__(self) -> int:
        return len(self.targets)


@dataclass(kw_only=True, slots=True)
class Split:
    protocol_family: str        # "loo" (sasrec + full) or "time"
    train: list[np.ndarray]     # per user: the items the model may learn from (oldest first)
    val: EvalSet                # used for tuning and early stopping
    test: EvalSet               # reported only; never used to choose anything
    n_items: int
    notes: dict                 # split facts for the results file (cut times, counts)


def leave_one_out(data: SequenceData) -> Split:
    """SASRec's data_partition: users with < 3 actions go to training only."""
    train, vu, vh, vt, tu, th, tt = [], [], [], [], [], [], []
    for u, seq in enumerate(data.items):
        if len(seq) < 3:
            train.append(seq)
            continue
        train.append(seq[:-2])
        vu.append(u), vh.append(seq[:-2]), vt.append(seq[-2])
        tu.append(u), th.append(seq[:-1]), tt.append(seq[-1])
    val = EvalSet(users=np.asarray(vu, np.int64), histories=vh, targets=np.asarray(vt, np.int64))
    test = EvalSet(users=np.asarray(tu, np.int64), histories=th, targets=np.asarray(tt, np.int64))
    return Split(protocol_family="loo", train=train, val=val, test=test, n_items=data.n_items,
                 notes={"eval_users": len(tu), "train_only_users": data.n_users - len(tu),
                        "train_actions": int(sum(len(s) for s in train))})


def time_split(data: SequenceData, *, val_frac: float = 0.1, test_frac: float = 0.1) -> Split:
    if data.times is None:
        raise ValueError(f"protocol 'time' needs timestamps; data set {data.name!r} has none")
    if not (0 < val_frac < 1 and 0 < test_frac < 1 and val_frac + test_frac < 1):
        raise ValueError(f"val_frac={val_frac}, test_frac={test_frac}: each in (0, 1), sum < 1")
    all_t = np.sort(np.concatenate(data.times))
    t_val = int(all_t[int(len(all_t) * (1 - val_frac - test_frac))])
    t_test = int(all_t[int(len(all_t) * (1 - test_frac))])
    train, vu, vh, vt, tu, th, tt = [], [], [], [], [], [], []
    for u, (seq, ts) in enumerate(zip(data.items, data.times)):
        n_val, n_test = int(np.searchsorted(ts, t_val)), int(np.searchsorted(ts, t_test))  # events before cuts
        train.append(seq[:n_val])
        for j in range(max(n_val, 1), n_test):  # val targets: events in [t_val, t_test) with a history
            vu.append(u), vh.append(seq[:j]), vt.append(seq[j])
        for j in range(max(n_test, 1), len(seq)):  # test targets: events at or after t_test
            tu.append(u), th.append(seq[:j]), tt.append(seq[j])
    val = EvalSet(users=np.asarray(vu, np.int64), histories=vh, targets=np.asarray(vt, np.int64))
    test = EvalSet(users=np.asarray(tu, np.int64), histories=th, targets=np.asarray(tt, np.int64))
    return Split(protocol_family="time", train=train, val=val, test=test, n_items=data.n_items,
                 notes={"t_val": t_val, "t_test": t_test, "val_targets": len(vt), "test_targets": len(tt),
                        "val_users": len(set(vu)), "test_users": len(set(tu)),
                        "train_actions": int(sum(len(s) for s in train))})


def make_split(data: SequenceData, protocol: str) -> Split:
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    return time_split(data) if protocol == "time" else leave_one_out(data)


def sample_negatives(rng: np.random.Generator, n_items: int, exclude: np.ndarray, n: int = 100) -> np.ndarray:
    """n item ids drawn uniformly with replacement from 1..n_items minus `exclude` (as SASRec's rejection loop)."""
    excl = np.unique(exclude)
    if np.count_nonzero((excl >= 1) & (excl <= n_items)) >= n_items:
        raise ValueError("every item is excluded: no negative can be drawn")
    out = np.empty(0, np.int64)
    while len(out) < n:
        draw = rng.integers(1, n_items + 1, size=2 * (n - len(out)) + 8)
        out = np.concatenate([out, draw[~np.isin(draw, exclude)]])
    return out[:n]


def negatives_for(data: SequenceData, ev: EvalSet, split: Split, *, n: int = 100, exclude: str = "sequence",
                  seed: int = 12345) -> np.ndarray:
    """(B, n) negatives per evaluated user, fixed by `seed` so every run ranks the same candidates."""
    if exclude not in NEG_EXCLUDE:
        raise ValueError(f"neg_exclude must be one of {NEG_EXCLUDE}, got {exclude!r}")
    rng = np.random.default_rng(seed)
    out_BN = np.empty((len(ev), n), np.int64)
    for i, u in enumerate(ev.users):
        excl = data.items[u] if exclude == "sequence" else split.train[u]
        out_BN[i] = sample_negatives(rng, split.n_items, excl, n)
    return out_BN

