"""Sampled softmax with in-batch and uniform random negatives and log-Q correction.

Candidates = the unique positive items of the batch (in-batch negatives for every other row) plus
R uniformly drawn items. Each candidate's logit is corrected by subtracting log of its expected
count in the candidate set (Yi et al. 2019): in-batch items by their stream frequency,
uniform ones by R / n_items. A random candidate equal to the row's positive is masked.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from trainer.model import TwoTower

MASK_LOGIT = -1e9


def sampled_softmax_loss(model: TwoTower, user_MD: torch.Tensor, pos_rows_M: torch.Tensor, *,
                         item_prob_R: torch.Tensor, n_items: int, n_random: int, temperature: float,
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """user_MD: L2-normalised user states, one per target; pos_rows_M: target rows (>= 1);
    item_prob_R: per-row sampling probability of an item as a positive (stream frequency)."""
    M = pos_rows_M.shape[0]
    uniq_U, pos_idx_M = torch.unique(pos_rows_M, return_inverse=True)
    # Drawn on the CPU (the generator is a CPU one: reproducible on any device), then moved.
    rand_R = torch.randint(1, n_items + 1, (n_random,), generator=generator).to(pos_rows_M.device)
    cand_C = torch.cat([uniq_U, rand_R])
    cand_CD = model.encode_items(cand_C)
    logits_MC = (user_MD @ cand_CD.T).float() / temperature
    logq_C = torch.cat([
        torch.log((item_prob_R[uniq_U] * M).clamp_min(1e-12)),
        torch.full((n_random,), math.log(max(n_random, 1) / n_items), device=pos_rows_M.device),
    ])
    logits_MC = logits_MC - logq_C
    hit_MR = rand_R[None, :] == pos_rows_M[:, None]  # accidental hits of the positive
    logits_MC[:, uniq_U.shape[0]:] = logits_MC[:, uniq_U.shape[0]:].masked_fill(hit_MR, MASK_LOGIT)
    return F.cross_entropy(logits_MC, pos_idx_M)
