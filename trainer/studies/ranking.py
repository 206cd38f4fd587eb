"""Scores an EvalSet with a model or with popularity and turns them into protocol metrics.

The counting and the metrics are trainer/evaluate.py's (`rank_counts`, `expected_metrics`: ties broken
uniformly at random in expectation), the same the sidecar's round gate uses.

Item ids are the data set's (1..N). A model's row for item i is rows_of_item[i] (identity when the
model was trained here; the sidecar Trainer's vocabulary otherwise; 0 = unknown item: the pad
row, whose normalised embedding is 0, so it scores 0).
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from trainer.evaluate import expected_metrics, rank_counts, tie_counts
from trainer.model import TwoTower
from trainer.studies.protocols import EvalSet


def _batches_by_length(histories: list[np.ndarray], T: int, batch: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """-> (index_B, hist_BL) with hist left-padded and cropped to the longest history in the batch (L <= T)."""
    lens = np.minimum([len(h) for h in histories], T)
    order = np.argsort(lens, kind="stable")
    for s in range(0, len(order), batch):
        idx_B = order[s:s + batch]
        L = max(int(lens[idx_B].max()), 1)
        hist_BL = np.zeros((len(idx_B), L), np.int64)
        for j, i in enumerate(idx_B):
            h = histories[i][-L:]
            if len(h):
                hist_BL[j, L - len(h):] = h
        yield idx_B, hist_BL


class Counts:
    """Accumulates greater/equal counts per evaluated user for the full and the sampled ranking."""

    def __init__(self, n: int, sampled: bool) -> None:
        self.full_gt, self.full_eq = np.zeros(n, np.int64), np.zeros(n, np.int64)
        self.smp_gt = np.zeros(n, np.int64) if sampled else None
        self.smp_eq = np.zeros(n, np.int64) if sampled else None

    def add(self, idx_B: np.ndarray, scores_BN: torch.Tensor, targets_B: np.ndarray, histories: list[np.ndarray],
            negatives_BK: np.ndarray | None) -> None:
        """scores_BN: (B, N) scores of items 1..N (column j = item j + 1)."""
        if negatives_BK is not None:
            t_B1 = scores_BN.gather(1, torch.from_numpy(targets_B - 1)[:, None])
            neg_BK = scores_BN.gather(1, torch.from_numpy(negatives_BK - 1))
            self.smp_gt[idx_B], self.smp_eq[idx_B] = tie_counts(neg_BK, t_B1)
        # the user's history is excluded, the target never is (nor is it its own competitor)
        self.full_gt[idx_B], self.full_eq[idx_B] = rank_counts(scores_BN, targets_B - 1,
                                                              [np.asarray(h, np.int64) - 1 for h in histories])

    def metrics(self, ks: tuple[int, ...]) -> dict[str, dict[str, float]]:
        out = {"full": expected_metrics(self.full_gt, self.full_eq, ks)}
        if self.smp_gt is not None:
            out["sampled"] = expected_metrics(self.smp_gt, self.smp_eq, ks, hit_name="hr")
        return out


@torch.no_grad()
def evaluate_model_on(model: TwoTower, ev: EvalSet, n_items: int, *, negatives_BK: np.ndarray | None = None,
                      ks: tuple[int, ...] = (10, 20), rows_of_item: np.ndarray | None = None,
                      batch: int = 256, user_rows: np.ndarray | None = None) -> dict[str, dict[str, float]]:
    """{"full": {recall@k, ndcg@k}, "sampled": {hr@k, ndcg@k}} (sampled only with negatives). user_rows: ev.users
    -> the model's user-feature rows (a model with user features; None: the history alone)."""
    model.eval()
    rows = np.arange(n_items + 1) if rows_of_item is None else rows_of_item  # item id -> model row
    items_ND = model.encode_items(torch.from_numpy(rows[1:]))
    T = model.cfg.max_history
    counts = Counts(len(ev), negatives_BK is not None)
    for idx_B, hist_BL in _batches_by_length(ev.histories, T, batch):
        users_B = None if user_rows is None else torch.from_numpy(user_rows[ev.users[idx_B]])
        u_BD = model.encode_users(torch.from_numpy(rows[hist_BL]), users_B)
        scores_BN = (u_BD @ items_ND.T).float()
        counts.add(idx_B, scores_BN, ev.targets[idx_B], [ev.histories[i] for i in idx_B],
                   None if negatives_BK is None else negatives_BK[idx_B])
    return counts.metrics(ks)


def popularity_counts(train: list[np.ndarray], n_items: int) -> np.ndarray:
    """(N + 1,) training interactions per item id (index 0 unused)."""
    return np.bincount(np.concatenate(train) if train else np.zeros(0, np.int64), minlength=n_items + 1)


def evaluate_popularity_on(counts_N1: np.ndarray, ev: EvalSet, *, negatives_BK: np.ndarray | None = None,
                           ks: tuple[int, ...] = (10, 20), batch: int = 512) -> dict[str, dict[str, float]]:
    """The same metrics for score = training interaction count (ties broken at random in expectation)."""
    pop_N = torch.from_numpy(counts_N1[1:].astype(np.float64))
    counts = Counts(len(ev), negatives_BK is not None)
    for s in range(0, len(ev), batch):
        idx_B = np.arange(s, min(s + batch, len(ev)))
        scores_BN = pop_N[None, :].expand(len(idx_B), -1)
        counts.add(idx_B, scores_BN, ev.targets[idx_B], [ev.histories[i] for i in idx_B],
                   None if negatives_BK is None else negatives_BK[idx_B])
    return counts.metrics(ks)
