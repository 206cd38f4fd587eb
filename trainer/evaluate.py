"""Ranking metrics over all items: Recall@k and NDCG@k for the model and for popularity.

The one implementation of rank-based metrics in the project (the sidecar's round gate, the benches and
trainer/studies all go through `expected_metrics`). One target per row (next item). For each row,
`rank_counts` counts the candidates scored strictly above the target (`greater`) and exactly like it
(`equal`, the target itself not counted); the metrics are their expectation when tied items are put in
a uniformly random order: the 0-based rank is uniform on greater..greater+equal. (Counting ties in the
target's favour, rank = greater, overstates popularity a lot: its counts tie often. Model scores rarely
tie, so for the model the two agree.) With `seen`, a user's already-seen items are excluded from the
ranking (the target itself never is).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from trainer.model import TwoTower


def expected_metrics(greater_B: np.ndarray, equal_B: np.ndarray, ks: tuple[int, ...],
                     hit_name: str = "recall") -> dict[str, float]:
    """Recall (HR)@k and NDCG@k per k, averaged over rows, with ties broken uniformly at random in expectation.

    greater_B: candidates scored strictly above the target; equal_B: candidates tied with it (the target
    itself not counted). Rank r (0-based) is uniform on greater..greater+equal, so
    recall@k = E[r < k] and ndcg@k = E[[r < k] / log2(r + 2)] (one relevant item: IDCG = 1).
    hit_name: "hr" for the sampled protocol (one target: HR@k = Recall@k), "recall" otherwise.
    Keys: f"{hit_name}@{k}" and f"ndcg@{k}"; all 0.0 for no rows.
    """
    g = np.asarray(greater_B, np.float64)
    e = np.asarray(equal_B, np.float64)
    if g.shape != e.shape:
        raise ValueError(f"greater_B {g.shape} and equal_B {e.shape} must have the same shape")
    out = {}
    for k in ks:
        hit = np.zeros_like(g)
        gain = np.zeros_like(g)
        for r in range(k):  # P(rank == r) = 1/(e+1) when g <= r <= g+e
            p_B = ((g <= r) & (r <= g + e)) / (e + 1)
            hit += p_B
            gain += p_B / np.log2(r + 2)
        n = len(g)
        out[f"{hit_name}@{k}"] = float(hit.mean()) if n else 0.0
        out[f"ndcg@{k}"] = float(gain.mean()) if n else 0.0
    return out


def tie_counts(cand_BK: torch.Tensor, target_B1: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(greater_B, equal_B): per row, the candidate scores strictly above / equal to the target's score."""
    return ((cand_BK > target_B1).sum(1).numpy().astype(np.int64),
            (cand_BK == target_B1).sum(1).numpy().astype(np.int64))


def _uncount_excluded(gt_B: np.ndarray, eq_B: np.ndarray, row_scores, t_B: np.ndarray, tgt_B: np.ndarray,
                      excluded_cols, N: int) -> tuple[np.ndarray, np.ndarray]:
    """Remove row i's excluded columns (never the target's) from its greater/equal counts, in place.
    row_scores(i) -> the (N,) scores of row i as a numpy array."""
    if excluded_cols is not None:
        for i, cols in enumerate(excluded_cols):
            if len(cols):
                c = np.unique(np.asarray(cols, np.int64) % N)  # % N: a column given as -1 is the last one
                s_C = row_scores(i)[c[c != tgt_B[i] % N]]
                gt_B[i] -= int((s_C > t_B[i]).sum())
                eq_B[i] -= int((s_C == t_B[i]).sum())
    return gt_B, np.maximum(eq_B, 0)  # (a NaN target equals nothing, not even itself)


def rank_counts(scores_BN: torch.Tensor, target_col_B: np.ndarray,
                excluded_cols: Sequence[Sequence[int] | np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(greater_B, equal_B) of each row's target column among all N columns of scores_BN.

    The target's own column is never a competitor; row i's `excluded_cols[i]` (0-based columns, e.g. the
    user's seen items) are left out of the ranking, except the target itself, which keeps its score."""
    tgt_B = np.asarray(target_col_B, np.int64)
    t_B1 = scores_BN.gather(1, torch.from_numpy(tgt_B)[:, None])
    gt_B, eq_B = tie_counts(scores_BN, t_B1)
    eq_B -= 1  # the target itself
    return _uncount_excluded(gt_B, eq_B, lambda i: scores_BN[i].numpy(), t_B1[:, 0].numpy(), tgt_B, excluded_cols,
                             scores_BN.shape[1])


def _seen_cols(seen_rows: list[list[int]] | None, s: int, e: int) -> list[np.ndarray] | None:
    """Rows (1-based, 0 = pad) seen by users s..e-1 -> 0-based columns of the item score matrix."""
    if seen_rows is None:
        return None
    return [np.asarray(rows, np.int64) - 1 for rows in seen_rows[s:e]]


@torch.no_grad()
def model_rank_counts(model: TwoTower, histories_BT: np.ndarray, target_rows_B: np.ndarray, n_items: int, *,
                      seen_rows: list[list[int]] | None = None, batch: int = 256,
                      users_B: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(greater_B, equal_B) of each target row among item rows 1..n_items (the pad row is never ranked).
    users_B: each history's user row, for a model with user features (None: the history alone)."""
    model.eval()
    items_ND = model.encode_items(torch.arange(1, n_items + 1))
    gt, eq = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for s in range(0, len(target_rows_B), batch):
        u_BD = model.encode_users(torch.from_numpy(histories_BT[s:s + batch]),
                                  None if users_B is None else torch.from_numpy(users_B[s:s + batch]))
        scores_BN = u_BD @ items_ND.T
        g, e = rank_counts(scores_BN, target_rows_B[s:s + batch] - 1, _seen_cols(seen_rows, s, s + batch))
        gt.append(g), eq.append(e)
    return np.concatenate(gt), np.concatenate(eq)


def evaluate_model(model: TwoTower, histories_BT: np.ndarray, target_rows_B: np.ndarray, n_items: int, *,
                   seen_rows: list[list[int]] | None = None, ks: tuple[int, ...] = (10,),
                   batch: int = 256, users_B: np.ndarray | None = None) -> dict[str, float]:
    """{recall@k, ndcg@k} for each k: the model's ranking of each target row among item rows 1..n_items."""
    return expected_metrics(*model_rank_counts(model, histories_BT, target_rows_B, n_items, seen_rows=seen_rows,
                                               batch=batch, users_B=users_B), ks)


def popularity_rank_counts(counts_R: np.ndarray, target_rows_B: np.ndarray, n_items: int, *,
                           seen_rows: list[list[int]] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(greater_B, equal_B) of each target row among rows 1..n_items scored by counts_R (index 0 = pad): what
    rank_counts gives on the (B, n_items) matrix of counts, from one sorted copy instead (every row scores alike)."""
    pop_N = np.asarray(counts_R[1:n_items + 1], np.float64)
    srt_N = np.sort(pop_N)
    tgt_B = np.asarray(target_rows_B, np.int64) - 1
    t_B = pop_N[tgt_B] if len(tgt_B) else np.zeros(0)
    lo_B, hi_B = np.searchsorted(srt_N, t_B, "left"), np.searchsorted(srt_N, t_B, "right")
    gt_B, eq_B = (len(pop_N) - hi_B).astype(np.int64), (hi_B - lo_B - 1).astype(np.int64)  # the target: not its tie
    return _uncount_excluded(gt_B, eq_B, lambda i: pop_N, t_B, tgt_B, _seen_cols(seen_rows, 0, len(tgt_B)),
                             len(pop_N))


def evaluate_popularity(counts_R: np.ndarray, target_rows_B: np.ndarray, n_items: int, *,
                        seen_rows: list[list[int]] | None = None, ks: tuple[int, ...] = (10,)) -> dict[str, float]:
    """counts_R: interaction count per row (index 0 = pad) from the training data only."""
    return expected_metrics(*popularity_rank_counts(counts_R, target_rows_B, n_items, seen_rows=seen_rows), ks)
