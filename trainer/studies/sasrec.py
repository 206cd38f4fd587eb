"""A plain SASRec (Kang & McAuley 2018, "Self-Attentive Sequential Recommendation") user tower, as a
reference architecture for the quality studies: `livetower eval --arch sasrec` trains it with the
same batches, loss, early stopping and evaluation as the DeepSeek tower, so the two can be compared
on one split with one budget. It is never served (no export path).

Layout as the SASRec reference code: item embedding (scaled by sqrt(d)) + learned absolute
positions, dropout, then per block: LayerNorm'd query attends causally over the sequence (one
residual), LayerNorm, point-wise ReLU feed-forward (residual), padding positions zeroed after each
block; a final LayerNorm. One change: padding keys are masked out of attention. Scores are cosine, like the served model (the loss divides by the
temperature). Width, depth, heads, dropout and history length come from ModelConfig; its MoE and
MLA fields are ignored.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from trainer.model import PAD_ROW
from trainer.model_config import ModelConfig


class SASRecBlock(nn.Module):
    def __init__(self, dim: int, n_heads: int, dropout: float):
        super().__init__()
        self.attn_norm = nn.LayerNorm(dim, eps=1e-8)
        self.attn = nn.MultiheadAttention(dim, n_heads, dropout=dropout, batch_first=True)
        self.ffn_norm = nn.LayerNorm(dim, eps=1e-8)
        self.ffn_in = nn.Linear(dim, dim)
        self.ffn_out = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x_BTD: Tensor, blocked: Tensor, keep_BT1: Tensor) -> Tensor:
        q_BTD = self.attn_norm(x_BTD)
        a_BTD, _ = self.attn(q_BTD, x_BTD, x_BTD, attn_mask=blocked, need_weights=False)
        x_BTD = self.ffn_norm(q_BTD + a_BTD)  # the reference adds attention to the normalised query
        h_BTD = self.dropout(self.ffn_out(self.dropout(F.relu(self.ffn_in(x_BTD)))))
        return (x_BTD + h_BTD) * keep_BT1


class SASRec(nn.Module):
    """encode_items / user_states / encode_users as TwoTower (unit vectors); training only."""

    def __init__(self, cfg: ModelConfig, num_rows: int):
        super().__init__()
        if cfg.dim % cfg.n_heads:
            raise ValueError(f"ModelConfig.dim ({cfg.dim}) must be a multiple of n_heads ({cfg.n_heads}) for SASRec")
        self.cfg = cfg
        self.item_embedding = nn.Embedding(num_rows, cfg.dim, padding_idx=PAD_ROW)
        self.pos_embedding = nn.Embedding(cfg.max_history, cfg.dim)  # row max_history - 1 = newest item
        self.emb_dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(SASRecBlock(cfg.dim, cfg.n_heads, cfg.dropout) for _ in range(cfg.n_layers))
        self.final_norm = nn.LayerNorm(cfg.dim, eps=1e-8)
        for p in self.parameters():  # the reference initialises every matrix Xavier-normal
            if p.dim() > 1:
                nn.init.xavier_normal_(p)
        with torch.no_grad():
            self.item_embedding.weight[PAD_ROW].zero_()

    @property
    def num_rows(self) -> int:
        return self.item_embedding.num_embeddings

    def encode_items(self, rows_N: Tensor) -> Tensor:
        return F.normalize(self.item_embedding(rows_N), dim=-1)  # (N, D)

    def hidden_states(self, history_BT: Tensor) -> Tensor:
        """(B, T) left-padded rows -> (B, T, D); position t sees items 0..t only."""
        T = history_BT.shape[1]
        keep_BT1 = (history_BT != PAD_ROW).unsqueeze(-1).to(self.item_embedding.weight.dtype)
        pos_T = torch.arange(T, device=history_BT.device) + self.cfg.max_history - T
        x_BTD = self.item_embedding(history_BT) * self.cfg.dim ** 0.5 + self.pos_embedding(pos_T)
        x_BTD = self.emb_dropout(x_BTD) * keep_BT1
        # True = may not attend: later positions, and padding (the reference attends to its padding keys, so
        # its outputs depend on how far a history is padded; the pipeline crops padding per batch). Each
        # position may attend to itself, so a padding query never has an empty row.
        eye_TT = torch.eye(T, dtype=torch.bool, device=history_BT.device)
        blocked_BTT = torch.ones(T, T, dtype=torch.bool, device=history_BT.device).triu(1) \
            | ((history_BT == PAD_ROW).unsqueeze(1) & ~eye_TT)
        blocked = blocked_BTT.repeat_interleave(self.cfg.n_heads, dim=0)  # (B * heads, T, T)
        for block in self.blocks:
            x_BTD = block(x_BTD, blocked, keep_BT1)
        return self.final_norm(x_BTD)

    def user_states(self, history_BT: Tensor, users_B: Tensor | None = None) -> Tensor:
        """users_B must be None: this baseline has no user features (the pipeline passes its argument through)."""
        if users_B is not None:
            raise ValueError("users_B: SASRec has no user features; pass None")
        return F.normalize(self.hidden_states(history_BT), dim=-1)  # (B, T, D)

    def encode_users(self, history_BT: Tensor, users_B: Tensor | None = None) -> Tensor:
        return self.user_states(history_BT, users_B)[:, -1]  # (B, D): the newest position

    def update_expert_bias(self) -> None:
        """No experts: nothing to balance (the trainer calls this after every step)."""
