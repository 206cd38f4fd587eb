"""Two-tower recommender: item tower = projected embedding row, user tower = DeepSeek-V3 stack.

gpt-fast/nanoGPT style: plain math, one file. Shape suffixes: B batch, T history length, D dim,
H heads, N tokens (B*T), E routed experts, F expert hidden, G expert groups, R rope dim.

The user tower is our own re-implementation of transformers' `DeepseekV3Model` (MLA + MoE), with
parameter names mirroring HF so that an HF state_dict (minus `embed_tokens`) loads strictly into
`TwoTower.stack`. The MoE is dense-masked (every expert on every token, combined with a dense
(N, E) weight matrix) so there is no data-dependent control flow and `torch.export` works.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.model_config import INIT_STD, ModelConfig

PAD_ROW = 0  # row 0 of the item table is padding; histories are LEFT-padded with 0 (newest item last)
MASK_VALUE = -1e9  # additive attention bias of a masked key: large and finite (never -inf: no NaN)


class RMSNorm(nn.Module):  # = DeepseekV3RMSNorm
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def apply_rope(x: Tensor, cos_TR2: Tensor, sin_TR2: Tensor, interleave: bool) -> Tensor:
    # x: (B, H, T, R). Interleaved: pairs (x0,x1),(x2,x3)..; else halves. Output is HF's layout:
    # [rotated firsts, rotated seconds] in both cases (HF's interleave variant de-interleaves too).
    x1, x2 = (x[..., 0::2], x[..., 1::2]) if interleave else x.chunk(2, dim=-1)
    return torch.cat([x1 * cos_TR2 - x2 * sin_TR2, x2 * cos_TR2 + x1 * sin_TR2], dim=-1)


class MLP(nn.Module):  # = DeepseekV3MLP (SwiGLU)
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor, valid_BT: Tensor | None = None) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Attention(nn.Module):  # = DeepseekV3Attention (multi-head latent attention)
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        H, D = cfg.n_heads, cfg.dim
        self.qk_head_dim = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(D, H * self.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(D, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank)  # HF: default eps, not rms_norm_eps
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, H * self.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank)  # HF: default eps
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, H * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.o_proj = nn.Linear(H * cfg.v_head_dim, D, bias=False)
        self.scale = self.qk_head_dim ** -0.5

    def forward(self, x_BTD: Tensor, cos_TR2: Tensor, sin_TR2: Tensor, bias_B1TT: Tensor,
                last_only: bool = False) -> Tensor:
        """bias_B1TT: fp32 additive attention bias, 0 where a query may read a key (causal_bias, pad keys).
        last_only: queries from the last position only (keys/values from all) -> (B, 1, D)."""
        c = self.cfg
        B, T, _ = x_BTD.shape
        xq_BSD = x_BTD[:, -1:] if last_only else x_BTD  # S = 1 or T query positions
        S = xq_BSD.shape[1]
        if c.q_lora_rank is None:
            q = self.q_proj(xq_BSD)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(xq_BSD)))
        q_BHTK = q.view(B, S, c.n_heads, self.qk_head_dim).transpose(1, 2)
        q_nope, q_rot = q_BHTK.split([c.qk_nope_head_dim, c.qk_rope_head_dim], dim=-1)

        kv_nope_BTL, k_rot_BTR = self.kv_a_proj_with_mqa(x_BTD).split([c.kv_lora_rank, c.qk_rope_head_dim], dim=-1)
        kv_BTHX = self.kv_b_proj(self.kv_a_layernorm(kv_nope_BTL)).view(B, T, c.n_heads, -1)
        k_nope, v_BHTV = kv_BTHX.transpose(1, 2).split([c.qk_nope_head_dim, c.v_head_dim], dim=-1)

        q_rot = apply_rope(q_rot, cos_TR2[-S:], sin_TR2[-S:], c.rope_interleave)
        k_rot_B1TR = apply_rope(k_rot_BTR.unsqueeze(1), cos_TR2, sin_TR2, c.rope_interleave)  # one shared rope key
        q_BHTK = torch.cat([q_nope, q_rot], dim=-1)
        k_BHTK = torch.cat([k_nope, k_rot_B1TR.expand(-1, c.n_heads, -1, -1)], dim=-1)

        # + an fp32 bias: fp32 scores even under fp16 autocast (which could not hold -1e9)
        att_BHTT = (q_BHTK @ k_BHTK.transpose(-2, -1)) * self.scale + bias_B1TT[:, :, -S:]
        att_BHTT = F.softmax(att_BHTT, dim=-1, dtype=torch.float32).to(q_BHTK.dtype)
        att_BHTT = F.dropout(att_BHTT, p=c.dropout, training=self.training)
        y_BTHV = (att_BHTT @ v_BHTV).transpose(1, 2).reshape(B, S, -1)
        return self.o_proj(y_BTHV)


class Router(nn.Module):  # = DeepseekV3TopkRouter; parameter `weight`, buffer `e_score_correction_bias`
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.zeros(cfg.n_routed_experts, cfg.dim))
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts))  # fp32, persistent

    def forward(self, x_ND: Tensor) -> tuple[Tensor, Tensor]:
        """-> (dense combine weights (N, E) fp32, top-k selection indicator (N, E) fp32)."""
        c, N = self.cfg, x_ND.shape[0]
        E, G = c.n_routed_experts, c.n_group
        scores_NE = F.linear(x_ND.float(), self.weight.float()).sigmoid()
        choice_NE = scores_NE + self.e_score_correction_bias  # bias only affects selection, not weights
        group_NG = choice_NE.view(N, G, E // G).topk(2, dim=-1)[0].sum(dim=-1)
        group_idx = group_NG.topk(c.topk_group, dim=-1, sorted=False)[1]
        group_mask_NG = torch.zeros_like(group_NG).scatter(1, group_idx, 1.0)
        score_mask_NE = group_mask_NG.unsqueeze(-1).expand(N, G, E // G).reshape(N, E)
        choice_NE = choice_NE.masked_fill(score_mask_NE == 0, float("-inf"))
        topk_idx_NK = choice_NE.topk(c.n_experts_per_token, dim=-1, sorted=False)[1]
        topk_w_NK = scores_NE.gather(1, topk_idx_NK)
        if c.norm_topk_prob:
            topk_w_NK = topk_w_NK / (topk_w_NK.sum(dim=-1, keepdim=True) + 1e-20)
        topk_w_NK = topk_w_NK * c.routed_scaling_factor
        w_NE = torch.zeros_like(scores_NE).scatter(1, topk_idx_NK, topk_w_NK)
        sel_NE = torch.zeros_like(scores_NE).scatter(1, topk_idx_NK, 1.0)
        return w_NE, sel_NE


class Experts(nn.Module):  # = DeepseekV3Experts v5 layout: gate_up_proj (E, 2F, D) [gate; up], down_proj (E, D, F)
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, F_, D = cfg.n_routed_experts, cfg.moe_dim, cfg.dim
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * F_, D))
        self.down_proj = nn.Parameter(torch.empty(E, D, F_))

    def forward(self, x_ND: Tensor, w_NE: Tensor) -> Tensor:
        # dense-masked: every expert on every token, then a weighted sum with zeros off the top-k
        gate_NEF, up_NEF = torch.einsum("nd,efd->nef", x_ND, self.gate_up_proj).chunk(2, dim=-1)
        y_NED = torch.einsum("nef,edf->ned", F.silu(gate_NEF) * up_NEF, self.down_proj)
        return torch.einsum("ne,ned->nd", w_NE.to(y_NED.dtype), y_NED)


class MoE(nn.Module):  # = DeepseekV3MoE
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.experts = Experts(cfg)
        self.gate = Router(cfg)
        self.shared_experts = MLP(cfg.dim, cfg.moe_dim * cfg.n_shared_experts)
        self.last_load: Tensor | None = None  # (E,) tokens per expert in the last training forward; not a buffer

    def forward(self, x_BTD: Tensor, valid_BT: Tensor | None = None) -> Tensor:
        B, T, D = x_BTD.shape
        x_ND = x_BTD.reshape(B * T, D)
        w_NE, sel_NE = self.gate(x_ND)
        if self.training:  # record expert loads (pad tokens excluded) for update_expert_bias
            valid_N1 = torch.ones_like(sel_NE[:, :1]) if valid_BT is None else valid_BT.reshape(-1, 1).to(sel_NE)
            self.last_load = (sel_NE * valid_N1).sum(0).detach()
        y_ND = self.experts(x_ND, w_NE)
        return y_ND.view(B, T, D) + self.shared_experts(x_BTD)


class DecoderLayer(nn.Module):  # = DeepseekV3DecoderLayer (pre-norm)
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MoE(cfg) if layer_idx >= cfg.first_k_dense else MLP(cfg.dim, cfg.ffn_dim)
        self.input_layernorm = RMSNorm(cfg.dim, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.rms_norm_eps)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x_BTD, cos_TR2, sin_TR2, bias_B1TT, valid_BT, last_only: bool = False):
        """last_only: only the last position's output (B, 1, D); attention still reads every position."""
        att = self.self_attn(self.input_layernorm(x_BTD), cos_TR2, sin_TR2, bias_B1TT, last_only)
        if last_only:
            x_BTD = x_BTD[:, -1:]
            valid_BT = None if valid_BT is None else valid_BT[:, -1:]
        x_BTD = x_BTD + self.drop(att)
        return x_BTD + self.drop(self.mlp(self.post_attention_layernorm(x_BTD), valid_BT))


class DeepseekV3Stack(nn.Module):
    """DeepseekV3Model without embed_tokens: inputs_embeds (B, T, D) -> last_hidden_state (B, T, D)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.rms_norm_eps)
        R = cfg.qk_rope_head_dim
        inv_freq_R2 = 1.0 / (cfg.rope_theta ** (torch.arange(0, R, 2, dtype=torch.float) / R))
        self.register_buffer("inv_freq", inv_freq_R2, persistent=False)  # not in HF state_dict either
        # A constant, not built per call: compiled, a mask's construction (aranges, compares, casts) is inlined
        # into the softmax loops, where it cost a quarter of the served tower (docs/serving.md, 2026-12-06 tower)
        self.register_buffer("causal_bias", causal_bias(cfg.max_history), persistent=False)

    def forward(self, x_BTD: Tensor, valid_BT: Tensor | None = None, last_only: bool = False) -> Tensor:
        """valid_BT: bool, False at pad positions (keys masked, not counted in expert loads); None = all valid.
        last_only: return only the last position (B, 1, D); the final layer then computes its queries and
        FFN for that position alone (serving needs nothing else), roughly halving its cost."""
        B, T, _ = x_BTD.shape
        pos_T = torch.arange(T, device=x_BTD.device, dtype=torch.float)  # relative RoPE: left pad is harmless
        freqs_TR2 = pos_T[:, None] * self.inv_freq.float()[None, :]
        cos_TR2, sin_TR2 = freqs_TR2.cos().to(x_BTD.dtype), freqs_TR2.sin().to(x_BTD.dtype)
        causal_TT = (self.causal_bias[:T, :T] if T <= self.causal_bias.shape[0]
                     else causal_bias(T).to(x_BTD.device))
        # Causal, and no pad key. A pad query (its past keys all pads) reads its past pads evenly: finite, and
        # read by nothing (later layers mask it as a key; the user vector is the last, newest position)
        bias_B1TT = (causal_TT[None, None] if valid_BT is None else
                     causal_TT + torch.where(valid_BT, 0.0, MASK_VALUE)[:, None, None, :])
        n = len(self.layers)
        for i, layer in enumerate(self.layers):
            x_BTD = layer(x_BTD, cos_TR2, sin_TR2, bias_B1TT, valid_BT, last_only and i == n - 1)
        if last_only and n == 0:
            x_BTD = x_BTD[:, -1:]
        return self.norm(x_BTD)


def causal_bias(T: int) -> Tensor:
    """(T, T) fp32 additive attention bias: 0 on and below the diagonal, 2 * MASK_VALUE above it (a future key
    always weighs less than a past pad key, at MASK_VALUE: a query of pads reads past pads only, as causality says)."""
    return torch.zeros(T, T).masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), 2 * MASK_VALUE)


def _init_weights(m: nn.Module) -> None:  # as HF DeepseekV3PreTrainedModel._init_weights
    if isinstance(m, (nn.Linear, nn.Embedding)):
        nn.init.normal_(m.weight, std=INIT_STD)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, Router):
        nn.init.normal_(m.weight, std=INIT_STD)
        nn.init.zeros_(m.e_score_correction_bias)
    elif isinstance(m, Experts):
        nn.init.normal_(m.gate_up_proj, std=INIT_STD)
        nn.init.normal_(m.down_proj, std=INIT_STD)


def fuse_user_features(user_BD: Tensor, feat_BD: Tensor) -> Tensor:
    """A user's vector with side features: the normalised history vector plus the user's feature vector,
    renormalised. Late fusion, so the compiled history tower stays as it is and the feature vector (which changes
    only when the user's record does) is computed once per record, not per request. feat 0 = the history alone."""
    return F.normalize(user_BD + feat_BD, dim=-1)


class TwoTower(nn.Module):
    def __init__(self, cfg: ModelConfig, num_rows: int):
        super().__init__()
        # Optional user side features (trainer/user_features.py): a module mapping user rows (B,) -> (B, out_dim)
        # feature vectors (row 0: none -> 0), attached after construction; None = the history alone.
        self.user_features: nn.Module | None = None
        if num_rows < 2:
            raise ValueError(f"num_rows={num_rows}: need the pad row plus at least one item")
        self.cfg = cfg
        self.item_embedding = nn.Embedding(num_rows, cfg.dim, padding_idx=PAD_ROW)  # shared by both towers
        if cfg.abs_positions:  # row max_history - 1 = the newest item's position
            self.pos_embedding = nn.Embedding(cfg.max_history, cfg.dim)
        self.stack = DeepseekV3Stack(cfg)
        self.user_proj = nn.Linear(cfg.dim, cfg.out_dim, bias=False) if cfg.tower_proj else nn.Identity()
        self.item_proj = nn.Linear(cfg.dim, cfg.out_dim, bias=False) if cfg.tower_proj else nn.Identity()
        self.apply(_init_weights)
        with torch.no_grad():
            self.item_embedding.weight[PAD_ROW].zero_()

    @property
    def num_rows(self) -> int:
        return self.item_embedding.num_embeddings

    def encode_items(self, rows_N: Tensor) -> Tensor:
        return F.normalize(self.item_proj(self.item_embedding(rows_N)), dim=-1)  # (N, out_dim)

    def embed_history(self, history_BT: Tensor) -> Tensor:
        """(B, T) left-padded rows (T <= max_history) -> (B, T, D) stack input: item rows [+ positions, pads 0]."""
        x_BTD = self.item_embedding(history_BT)
        if self.cfg.emb_scale:
            x_BTD = x_BTD * self.cfg.dim ** 0.5
        if self.cfg.abs_positions:  # the newest item (last column) gets position row max_history - 1
            pos_T = torch.arange(history_BT.shape[1], device=x_BTD.device) + self.cfg.max_history - x_BTD.shape[1]
            x_BTD = (x_BTD + self.pos_embedding(pos_T)) * (history_BT != PAD_ROW).unsqueeze(-1).to(x_BTD.dtype)
        if self.cfg.emb_dropout > 0:
            x_BTD = F.dropout(x_BTD, p=self.cfg.emb_dropout, training=self.training)
        return x_BTD

    def hidden_states(self, history_BT: Tensor) -> Tensor:
        """(B, T) left-padded rows -> (B, T, D) DeepSeek stack output (before user_proj)."""
        return self.stack(self.embed_history(history_BT), history_BT != PAD_ROW)

    def user_feature_vectors(self, users_B: Tensor | None) -> Tensor | None:
        """(B, out_dim) feature vectors of user rows, or None (no user features, or no users given)."""
        return None if users_B is None or self.user_features is None else self.user_features(users_B)

    def user_states(self, history_BT: Tensor, users_B: Tensor | None = None) -> Tensor:
        u_BTD = F.normalize(self.user_proj(self.hidden_states(history_BT)), dim=-1)  # (B, T, out_dim)
        f_BD = self.user_feature_vectors(users_B)
        return u_BTD if f_BD is None else fuse_user_features(u_BTD, f_BD.unsqueeze(1).to(u_BTD.dtype))

    def encode_users(self, history_BT: Tensor, users_B: Tensor | None = None) -> Tensor:
        # newest item is last (left padding); only that position is computed in the final layer
        h_BD = self.stack(self.embed_history(history_BT), history_BT != PAD_ROW, last_only=True)[:, -1]
        u_BD = F.normalize(self.user_proj(h_BD), dim=-1)  # (B, out_dim)
        f_BD = self.user_feature_vectors(users_B)
        return u_BD if f_BD is None else fuse_user_features(u_BD, f_BD.to(u_BD.dtype))

    def row_buffers(self) -> list[Tensor]:
        """Per-table-row buffers that move with the rows when they are renumbered (none here)."""
        return []

    @torch.no_grad()
    def grow(self, num_rows: int) -> None:
        """Enlarge the item table (new module/Parameter: rebuild optimizers afterwards). No-op if not larger."""
        old = self.item_embedding
        if num_rows <= old.num_embeddings:
            return
        new = nn.Embedding(num_rows, old.embedding_dim, padding_idx=PAD_ROW,
                           device=old.weight.device, dtype=old.weight.dtype)
        nn.init.normal_(new.weight, std=INIT_STD)
        new.weight[: old.num_embeddings] = old.weight
        new.weight.requires_grad_(old.weight.requires_grad)
        self.item_embedding = new

    def moe_layers(self) -> list[nn.Module]:
        return [layer.mlp for layer in self.stack.layers if isinstance(layer.mlp, MoE)]

    @torch.no_grad()
    def update_expert_bias(self) -> None:
        """Aux-loss-free balancing: bias += rate * sign(mean_load - load), from the last training forward's
        loads. Each recorded load is consumed (cleared) so a repeated call without a new forward is a no-op."""
        for moe in self.moe_layers():
            load_E = moe.last_load
            if load_E is None:
                continue
            bias_E = moe.gate.e_score_correction_bias
            bias_E += self.cfg.bias_update_rate * torch.sign(load_E.mean() - load_E).to(bias_E)
            moe.last_load = None
