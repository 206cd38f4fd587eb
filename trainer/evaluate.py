"""Ranking metrics over all items: Recall@k and NDCG@k for the model and for popularity.

One target per row (next item). Rank = number of allowed items scoring strictly higher than the
target, so ties favour the target (optimistic, as is usual). With `seen`, a user's
already-seen items are excluded from the ranking (the target itself never is).
"""

from __future__ import annotations

import numpy as np
import torch

from trainer.model import TwoTower


def _metrics_from_ranks(ranks: np.ndarray, ks: tuple[int, ...]) -> dict[str, float]:
    out = {}
    for k in ks:
        hit = ranks < k
        out[f"recall@{k}"] = float(hit.mean()) if len(ranks) else 0.0
        out[f"ndcg@{k}"] = float((hit / np.log2(ranks + 2)).mean()) if len(ranks) else 0.0
    return out


@torch.no_grad()
def evaluate_model(model: TwoTower, histories_BT: np.ndarray, target_rows_B: np.ndarray, n_items: int, *,
                   seen_rows: list[list[int]] | None = None, ks: tuple[int, ...] = (10,),
                   batch: int = 256) -> dict[str, float]:
    model.eval()
    items_ND = model.encode_items(torch.arange(1, n_items + 1))
    ranks = []
    for s in range(0, len(target_rows_B), batch):
        u_BD = model.encode_users(torch.from_numpy(histories_BT[s:s + batch]))
        scores_BN = u_BD @ items_ND.T
        tgt_B1 = torch.from_numpy(target_rows_B[s:s + batch] - 1)[:, None]
        t_scores_B1 = scores_BN.gather(1, tgt_B1)  # the target keeps its score even if seen before
        if seen_rows is not None:
            for i, rows in enumerate(seen_rows[s:s + batch]):
                if rows:
                    scores_BN[i, np.asarray(rows) - 1] = float("-inf")
        ranks.append((scores_BN > t_scores_B1).sum(1).numpy())
    return _metrics_from_ranks(np.concatenate(ranks) if ranks else np.zeros(0), ks)


def evaluate_popularity(counts_R: np.ndarray, target_rows_B: np.ndarray, n_items: int, *,
                        seen_rows: list[list[int]] | None = None, ks: tuple[int, ...] = (10,)) -> dict[str, float]:
    """counts_R: interaction count per row (index 0 = pad) from the training data only."""
    pop_N = torch.from_numpy(counts_R[1:n_items + 1].astype(np.float64))
    ranks = []
    for i, t in enumerate(target_rows_B):
        s_N = pop_N.clone()
        t_score = s_N[t - 1].item()
        if seen_rows is not None and seen_rows[i]:
            s_N[np.asarray(seen_rows[i]) - 1] = float("-inf")
        ranks.append(int((s_N > t_score).sum()))
    return _metrics_from_ranks(np.asarray(ranks), ks)
