"""The user tower's architecture as a typed, validated config (trainer/model.py builds the model from it),
with its mapping to transformers' DeepseekV3Config and its JSON form in checkpoints and engine manifests."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

INIT_STD = 0.02  # HF initializer_range
# ModelConfig fields added after the first checkpoints and engines were written, with the value every config
# had before the field existed. to_dict leaves a field out at that value and from_dict fills it back in, so
# those configs (and the architecture hashes of their engines) read the same whatever the defaults are now.
LEGACY_VALUES = {"abs_positions": False, "emb_dropout": 0.0, "emb_scale": False, "tower_proj": True}


@dataclass(kw_only=True, frozen=True, slots=True)
class ModelConfig:
    """The user tower's architecture. Defaults: docs/quality.md run 29 (MLA attention, a dense first layer then
    MoE, no tower projections, SASRec-style inputs and dropout): the best Games validation config within the
    serving budget (a third layer, run 31, gains 0.003 validation NDCG@10 for +40 % P99 at 500 QPS)."""

    dim: int = 64  # transformer hidden size (= item embedding size)
    out_dim: int = 64  # size of the shared two-tower embedding space
    n_layers: int = 2  # number of decoder layers in the user tower
    n_heads: int = 4  # attention heads
    q_lora_rank: int | None = None  # None: plain q_proj; else low-rank q (q_a_proj -> RMSNorm -> q_b_proj)
    kv_lora_rank: int = 32  # rank of the compressed KV latent
    qk_nope_head_dim: int = 16  # per-head q/k dims without RoPE
    qk_rope_head_dim: int = 8  # per-head q/k dims with (decoupled, shared-key) RoPE; must be even
    v_head_dim: int = 16  # per-head value dim
    ffn_dim: int = 128  # intermediate size of dense (first_k_dense) layers
    moe_dim: int = 32  # intermediate size of each expert
    n_routed_experts: int = 8  # routed experts per MoE layer
    n_shared_experts: int = 1  # shared experts (fused into one MLP of width moe_dim * n_shared_experts)
    n_experts_per_token: int = 2  # top-k routed experts per token
    n_group: int = 1  # expert groups for group-limited routing
    topk_group: int = 1  # groups each token may route into
    routed_scaling_factor: float = 1.0  # multiplier on the routed expert weights
    norm_topk_prob: bool = True  # renormalise the top-k sigmoid scores to sum to 1
    first_k_dense: int = 1  # the first k layers use a dense MLP instead of MoE (as DeepSeek-V3's first layers)
    rope_theta: float = 10000.0  # RoPE base
    rope_interleave: bool = True  # DeepSeek interleaved-pair RoPE layout (as HF rope_interleave)
    rms_norm_eps: float = 1e-6  # eps of the layer RMSNorms (q_a/kv_a norms use 1e-6, as HF)
    max_history: int = 50  # T: history length the serving tower takes (left-padded with row 0)
    temperature: float = 0.1  # score = cosine / temperature in the training loss
    dropout: float = 0.5  # attention/residual dropout, training only
    bias_update_rate: float = 1e-3  # step of the aux-loss-free expert-bias update
    abs_positions: bool = True  # add a learned absolute position embedding to the history (as SASRec), counted
                                 # from the newest item (row max_history - 1); RoPE stays. False = RoPE only
    emb_dropout: float = 0.5  # dropout on the history's input embeddings (as SASRec), training only
    tower_proj: bool = False  # user_proj / item_proj: linear maps of the stack output and of the item embeddings
                             # into the shared space; False = identity (needs out_dim == dim), as SASRec, which
                             # scores the stack output against the raw item embeddings
    emb_scale: bool = True  # multiply the history's item embeddings by sqrt(dim) before the stack (as SASRec
                             # and the original Transformer); the item tower's embeddings are not scaled

    def __post_init__(self) -> None:
        def need(ok: bool, field: str, why: str) -> None:
            if not ok:
                raise ValueError(f"ModelConfig.{field}={getattr(self, field)!r}: {why}")

        for f in ("dim", "out_dim", "n_layers", "n_heads", "kv_lora_rank", "qk_nope_head_dim",
                  "qk_rope_head_dim", "v_head_dim", "ffn_dim", "moe_dim", "n_routed_experts",
                  "n_experts_per_token", "n_group", "topk_group", "max_history"):
            v = getattr(self, f)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= 1, f, "must be an int >= 1")
        need(self.q_lora_rank is None or (isinstance(self.q_lora_rank, int) and self.q_lora_rank >= 1),
             "q_lora_rank", "must be None or an int >= 1")
        need(isinstance(self.n_shared_experts, int) and self.n_shared_experts >= 0, "n_shared_experts",
             "must be an int >= 0")
        need(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim", "must be even")
        need(self.n_routed_experts % self.n_group == 0, "n_group", "must divide n_routed_experts")
        need(self.n_routed_experts // self.n_group >= 2, "n_group",
             "each group needs >= 2 experts (group score = sum of its top-2)")
        need(self.topk_group <= self.n_group, "topk_group", "must be <= n_group")
        need(self.n_experts_per_token <= self.topk_group * (self.n_routed_experts // self.n_group),
             "n_experts_per_token", "must be <= experts in the topk_group selected groups")
        need(isinstance(self.first_k_dense, int) and 0 <= self.first_k_dense <= self.n_layers,
             "first_k_dense", "must be in [0, n_layers]")
        need(self.routed_scaling_factor > 0, "routed_scaling_factor", "must be > 0")
        need(self.rope_theta > 0, "rope_theta", "must be > 0")
        need(self.rms_norm_eps > 0, "rms_norm_eps", "must be > 0")
        need(self.temperature > 0, "temperature", "must be > 0")
        need(0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)")
        need(0.0 <= self.emb_dropout < 1.0, "emb_dropout", "must be in [0, 1)")
        for f in ("abs_positions", "tower_proj", "emb_scale"):
            need(isinstance(getattr(self, f), bool), f, "must be a bool")
        need(self.tower_proj or self.out_dim == self.dim, "tower_proj", "False needs out_dim == dim")
        need(self.bias_update_rate >= 0, "bias_update_rate", "must be >= 0")

    @classmethod
    def tiny_debug(cls) -> ModelConfig:
        """The served architecture, small: one MoE layer (no dense one) and no dropout, so tests train fast."""
        return cls(dim=32, out_dim=32, n_layers=1, n_heads=2, kv_lora_rank=16, qk_nope_head_dim=8,
                   qk_rope_head_dim=4, v_head_dim=8, ffn_dim=64, moe_dim=16, n_routed_experts=4,
                   n_shared_experts=1, n_experts_per_token=2, max_history=12, first_k_dense=0, dropout=0.0,
                   emb_dropout=0.0)

    def to_hf_kwargs(self) -> dict:
        """kwargs for transformers.DeepseekV3Config giving the same architecture (add vocab_size etc.)."""
        return dict(
            hidden_size=self.dim, intermediate_size=self.ffn_dim, moe_intermediate_size=self.moe_dim,
            num_hidden_layers=self.n_layers, num_attention_heads=self.n_heads,
            num_key_value_heads=self.n_heads, n_shared_experts=self.n_shared_experts,
            n_routed_experts=self.n_routed_experts, routed_scaling_factor=self.routed_scaling_factor,
            kv_lora_rank=self.kv_lora_rank, q_lora_rank=self.q_lora_rank,
            qk_rope_head_dim=self.qk_rope_head_dim, v_head_dim=self.v_head_dim,
            qk_nope_head_dim=self.qk_nope_head_dim, n_group=self.n_group, topk_group=self.topk_group,
            num_experts_per_tok=self.n_experts_per_token, first_k_dense_replace=self.first_k_dense,
            norm_topk_prob=self.norm_topk_prob, hidden_act="silu",
            max_position_embeddings=max(self.max_history, 1), initializer_range=INIT_STD,
            rms_norm_eps=self.rms_norm_eps, rope_interleave=self.rope_interleave,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
            attention_bias=False, attention_dropout=self.dropout, tie_word_embeddings=False,
        )

    def to_dict(self) -> dict:
        """Every field, except the later-added ones at their legacy value (LEGACY_VALUES): configs (and so
        the architecture hashes of engines) from before those fields existed stay the same."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in LEGACY_VALUES or getattr(self, f.name) != LEGACY_VALUES[f.name]}

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"ModelConfig: unknown field(s) {sorted(unknown)}")
        return cls(**{**LEGACY_VALUES, **d})
