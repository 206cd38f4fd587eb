"""Exact retrieval: L2-normalise + dot product + top-k over an item matrix.

`topk_cosine_reference` is the plain-torch reference and the CPU serving path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MAX_K = 1000


def check_topk_args(queries_BD: torch.Tensor, items_ND: torch.Tensor, k: int) -> None:
    if queries_BD.dim() != 2 or items_ND.dim() != 2:
        raise ValueError(f"queries must be (B, D) and items (N, D); got {tuple(queries_BD.shape)} and "
                         f"{tuple(items_ND.shape)}")
    if queries_BD.shape[1] != items_ND.shape[1]:
        raise ValueError(f"queries have D={queries_BD.shape[1]} but items have D={items_ND.shape[1]}")
    if not 1 <= k <= MAX_K:
        raise ValueError(f"k is {k}; it must be in 1..{MAX_K}")


def topk_cosine_reference(queries_BD: torch.Tensor, items_ND: torch.Tensor, k: int, *,
                          items_normalized: bool = False,
                          exclude_BN: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k items by cosine similarity for each query.

    exclude_BN: optional bool mask of items never to return for that query.
    Returns (scores_BK, indices_BK), best first, K = min(k, N). Where fewer than K items are
    allowed, the tail has score -inf: callers drop it.
    """
    check_topk_args(queries_BD, items_ND, k)
    q_BD = F.normalize(queries_BD.float(), dim=-1)
    it_ND = items_ND if items_normalized else F.normalize(items_ND.float(), dim=-1)
    scores_BN = q_BD @ it_ND.to(q_BD.dtype).T  # (B, N)
    if exclude_BN is not None:
        scores_BN = scores_BN.masked_fill(exclude_BN, float("-inf"))
    kk = min(k, items_ND.shape[0])
    return torch.topk(scores_BN, kk, dim=-1, largest=True, sorted=True)
