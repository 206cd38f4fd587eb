import dataclasses
import json

import pytest
import torch

from trainer.model import PAD_ROW, TwoTower
from trainer.model_config import ModelConfig

transformers = pytest.importorskip("transformers")


def _hf_model(cfg: ModelConfig, seed: int):
    hc = transformers.DeepseekV3Config(
        **cfg.to_hf_kwargs(), vocab_size=16, attn_implementation="eager", experts_implementation="eager"
    )
    torch.manual_seed(seed)
    hf = transformers.DeepseekV3Model(hc).eval()
    with torch.no_grad():  # make every weight matter (default init std 0.02 hides mistakes), random routing bias
        for name, p in hf.named_parameters():
            if name.endswith("layernorm.weight") or name == "norm.weight":
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
        for name, b in hf.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.3 * torch.randn_like(b))
    return hf


# The decoder stack against transformers' DeepseekV3Model. The tower entry point is checked on raw inputs too,
# so these configs feed the item embeddings to the stack as they are (no sqrt(dim) scale, no learned positions).
RAW_INPUTS = dict(emb_scale=False, abs_positions=False)
PARITY_CONFIGS = [
    ModelConfig(**RAW_INPUTS),
    ModelConfig(q_lora_rank=24, n_group=2, topk_group=1, first_k_dense=1, routed_scaling_factor=2.5, **RAW_INPUTS),
    ModelConfig(n_layers=2, first_k_dense=0, rope_interleave=False, norm_topk_prob=False, n_shared_experts=2,
                n_routed_experts=8, n_group=4, topk_group=2, n_experts_per_token=3, **RAW_INPUTS),
]


@pytest.mark.parametrize("cfg", PARITY_CONFIGS, ids=["default", "qlora_groups_dense", "nointerleave"])
def test_parity_with_transformers(cfg):
    hf = _hf_model(cfg, seed=0)
    model = TwoTower(cfg, num_rows=20).eval()
    sd = {k: v for k, v in hf.state_dict().items() if not k.startswith("embed_tokens.")}
    model.stack.load_state_dict(sd, strict=True)
    x_BTD = torch.randn(3, 11, cfg.dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(inputs_embeds=x_BTD).last_hidden_state
        ours = model.stack(x_BTD)
        # also through the tower entry point (no padding: all rows != PAD_ROW)
        model.item_embedding.weight[1:12] = x_BTD[0]
        via_tower = model.hidden_states(torch.arange(1, 12)[None])
    assert ref.abs().max() > 0.1
    assert (ref - ours).abs().max().item() < 1e-5
    assert (ref[:1] - via_tower).abs().max().item() < 1e-5


def test_parity_with_transformers_on_left_padded_inputs():
    """Pads masked as transformers masks them (attention_mask): the additive-bias attention agrees at every real
    position, for a row of pads, a row of two items and a full row."""
    cfg = PARITY_CONFIGS[0]
    hf = _hf_model(cfg, seed=3)
    model = TwoTower(cfg, num_rows=20).eval()
    model.stack.load_state_dict({k: v for k, v in hf.state_dict().items() if not k.startswith("embed_tokens.")})
    x_BTD = torch.randn(3, 9, cfg.dim, generator=torch.Generator().manual_seed(4))
    valid_BT = torch.ones(3, 9, dtype=torch.bool)
    valid_BT[0, :7] = False
    valid_BT[1, :4] = False
    x_BTD = x_BTD * valid_BT[..., None]  # pads embed to zeros, as row PAD_ROW does
    with torch.no_grad():
        ref = hf(inputs_embeds=x_BTD, attention_mask=valid_BT.long()).last_hidden_state
        ours = model.stack(x_BTD, valid_BT)
        last = model.stack(x_BTD, valid_BT, last_only=True)
    assert torch.isfinite(ours).all()
    assert (ref - ours)[valid_BT].abs().max().item() < 1e-5
    assert (ref[:, -1:] - last).abs().max().item() < 1e-5


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = ModelConfig.tiny_debug() if not kw else ModelConfig(**{**ModelConfig.tiny_debug().to_dict(), **kw})
    m = TwoTower(cfg, num_rows=50)
    with torch.no_grad():  # nonzero routing bias so routing differs between tokens in a nontrivial way
        for moe in m.moe_layers():
            moe.gate.e_score_correction_bias.copy_(0.1 * torch.randn(cfg.n_routed_experts))
    return m.eval()


def test_left_padding_invariance():
    m = _model()
    hist = torch.tensor([5, 9, 3, 17, 4])
    outs = []
    for T in (5, 8, 12):
        h = torch.full((1, T), PAD_ROW, dtype=torch.long)
        h[0, T - 5:] = hist
        with torch.no_grad():
            outs.append(m.encode_users(h))
    for o in outs[1:]:
        assert (o - outs[0]).abs().max().item() < 1e-5
    # fully padded history stays finite
    with torch.no_grad():
        assert torch.isfinite(m.user_states(torch.zeros(2, 12, dtype=torch.long))).all()


def test_causality():
    m = _model()
    h = torch.randint(1, 50, (2, 12))
    h2 = h.clone()
    h2[:, 7] = (h[:, 7] % 48) + 1 + (h[:, 7] % 48 + 1 == h[:, 7]).long()
    assert (h2[:, 7] != h[:, 7]).all()
    with torch.no_grad():
        a, b = m.user_states(h), m.user_states(h2)
    assert a.shape == (2, 12, m.cfg.out_dim)
    assert (a[:, :7] - b[:, :7]).abs().max().item() < 1e-6
    assert (a[:, 7:] - b[:, 7:]).abs().max().item() > 1e-4
    assert torch.allclose(a.norm(dim=-1), torch.ones(2, 12), atol=1e-5)
    assert torch.allclose(m.encode_users(h), a[:, -1], atol=1e-6)


def test_update_expert_bias_direction_and_pad_exclusion():
    m = _model(dropout=0.0)
    (moe,) = m.moe_layers()
    with torch.no_grad():  # expert 0 overloaded: huge router bias -> every token picks expert 0
        moe.gate.e_score_correction_bias.copy_(torch.tensor([10.0, 0.0, 0.0, 0.0]))
    m.update_expert_bias()  # nothing recorded yet: no-op
    assert moe.gate.e_score_correction_bias[0].item() == 10.0
    with torch.no_grad():
        m.encode_users(torch.randint(1, 50, (3, 12)))
    m.update_expert_bias()  # eval forward records nothing
    assert moe.gate.e_score_correction_bias[0].item() == 10.0

    h = torch.randint(1, 50, (3, 12))
    h[0, :5] = PAD_ROW
    h[2, :11] = PAD_ROW
    m.train()
    m.user_states(h)
    n_real = int((h != PAD_ROW).sum())
    load = moe.last_load
    assert load.sum().item() == n_real * m.cfg.n_experts_per_token  # pad tokens not counted
    assert load[0].item() == n_real
    before = moe.gate.e_score_correction_bias.clone()
    m.update_expert_bias()
    after = moe.gate.e_score_correction_bias
    rate = m.cfg.bias_update_rate
    assert after[0].item() == pytest.approx(before[0].item() - rate)
    expected = before + rate * torch.sign(load.mean() - load)
    assert torch.allclose(after, expected)
    m.update_expert_bias()  # load consumed: second call is a no-op
    assert torch.allclose(moe.gate.e_score_correction_bias, expected)


def test_grow_keeps_rows_and_outputs():
    m = _model()
    rows = torch.arange(0, 50)
    h = torch.randint(1, 50, (2, 12))
    with torch.no_grad():
        items, users, w = m.encode_items(rows), m.encode_users(h), m.item_embedding.weight.clone()
    m.grow(30)  # smaller: no-op
    assert m.item_embedding.num_embeddings == 50
    m.grow(80)
    assert m.item_embedding.weight.shape == (80, m.cfg.dim)
    assert torch.equal(m.item_embedding.weight[:50], w)
    new_std = m.item_embedding.weight[50:].std().item()
    assert 0.005 < new_std < 0.1
    with torch.no_grad():
        assert torch.allclose(m.encode_items(rows), items, atol=1e-7)
        assert torch.allclose(m.encode_users(h), users, atol=1e-7)
        assert m.encode_items(torch.tensor([79])).shape == (1, m.cfg.out_dim)


class Wrapper(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, history_BT):
        return self.model.encode_users(history_BT)


def test_export_matches_eager():
    m = _model(first_k_dense=0, n_layers=2, q_lora_rank=8)
    T = m.cfg.max_history
    h = torch.randint(1, 50, (4, T))
    h[1, :6] = PAD_ROW
    ep = torch.export.export(
        Wrapper(m).eval(), (h,),
        dynamic_shapes={"history_BT": {0: torch.export.Dim("batch", min=1, max=256)}}, strict=False,
    )
    f = ep.module()
    for B in (1, 7):
        x = torch.randint(1, 50, (B, T))
        x[0, : T // 2] = PAD_ROW
        with torch.no_grad():
            ref = m.encode_users(x)
        assert (f(x) - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("field,value", [
    ("dim", 0), ("n_heads", -1), ("qk_rope_head_dim", 7), ("n_group", 3), ("topk_group", 5),
    ("n_experts_per_token", 9), ("first_k_dense", 5), ("temperature", 0.0), ("dropout", 1.0),
    ("q_lora_rank", 0), ("max_history", 0),
])
def test_bad_config_names_field(field, value):
    with pytest.raises(ValueError, match=field):
        ModelConfig(**{field: value})


def test_config_roundtrip_and_tiny():
    cfg = ModelConfig(q_lora_rank=16, routed_scaling_factor=2.5)
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="bogus"):
        ModelConfig.from_dict({**cfg.to_dict(), "bogus": 1})
    tiny = ModelConfig.tiny_debug()
    assert (tiny.dim, tiny.n_layers, tiny.n_heads, tiny.n_routed_experts, tiny.n_experts_per_token,
            tiny.max_history) == (32, 1, 2, 4, 2, 12)
    with pytest.raises(Exception):
        tiny.dim = 3  # frozen


def test_encode_users_last_only_equals_full_last_position():
    torch.manual_seed(0)
    for cfg in (ModelConfig.tiny_debug(), ModelConfig()):
        model = TwoTower(cfg, 500).eval()
        h = torch.randint(1, 500, (5, cfg.max_history))
        h[1, :3] = 0
        h[2, :-1] = 0  # a single item
        with torch.no_grad():
            full = model.user_states(h)[:, -1]
            fast = model.encode_users(h)
        assert torch.allclose(full, fast, atol=1e-6), (full - fast).abs().max()


def test_abs_positions_and_emb_dropout_options():
    """SASRec-style options: learned positions counted from the newest item keep left-padding (and batch
    crop) invariance, causality, last-only serving and export; emb_dropout acts in training only."""
    torch.manual_seed(0)
    cfg = ModelConfig(abs_positions=True, emb_dropout=0.3, dropout=0.1, max_history=12)
    m = TwoTower(cfg, 50).eval()
    with torch.no_grad():
        m.pos_embedding.weight.normal_(0, 0.5)  # make positions matter
    hist = torch.tensor([5, 9, 3, 17, 4])
    outs = []
    for T in (5, 8, 12):
        h = torch.full((1, T), PAD_ROW, dtype=torch.long)
        h[0, T - 5:] = hist
        with torch.no_grad():
            outs.append(m.encode_users(h))
            assert torch.allclose(m.user_states(h)[:, -1], outs[-1], atol=1e-6)
    for o in outs[1:]:
        assert (o - outs[0]).abs().max().item() < 1e-5
    plain = TwoTower(cfg.__class__(**{**cfg.to_dict(), "abs_positions": False}), 50).eval()
    plain.load_state_dict({k: v for k, v in m.state_dict().items() if k != "pos_embedding.weight"})
    with torch.no_grad():
        assert (plain.encode_users(h) - m.encode_users(h)).abs().max().item() > 1e-4  # positions are used
        h2 = h.clone()
        h2[0, 9] = 33
        a, b = m.user_states(h), m.user_states(h2)
    assert (a[:, :9] - b[:, :9]).abs().max().item() < 1e-6 and (a[:, 9:] - b[:, 9:]).abs().max().item() > 1e-4
    m.train()
    torch.manual_seed(1)
    x1 = m.embed_history(h)
    torch.manual_seed(2)
    assert not torch.equal(x1, m.embed_history(h))  # input dropout in training
    m.eval()
    ep = torch.export.export(Wrapper(m), (torch.randint(1, 50, (3, 12)),), strict=False,
                             dynamic_shapes={"history_BT": {0: torch.export.Dim("batch", min=1, max=64)}})
    x = torch.randint(1, 50, (4, 12))
    x[0, :6] = PAD_ROW
    with torch.no_grad():
        assert (ep.module()(x) - m.encode_users(x)).abs().max().item() < 1e-5
    with pytest.raises(ValueError, match="emb_dropout"):
        ModelConfig(emb_dropout=1.0)


def test_added_fields_leave_legacy_config_dicts_unchanged():
    """Fields added later are left out of to_dict at their legacy value, and filled back in by from_dict, so
    older architecture hashes hold and older checkpoints read the same whatever the defaults are now."""
    from trainer.model_config import LEGACY_VALUES

    legacy = dataclasses.replace(ModelConfig(), **LEGACY_VALUES)
    d = legacy.to_dict()
    assert not set(LEGACY_VALUES) & set(d)
    assert ModelConfig.from_dict(d) == legacy
    d2 = ModelConfig(abs_positions=True, emb_dropout=0.2, tower_proj=False).to_dict()
    assert d2["abs_positions"] is True and d2["emb_dropout"] == 0.2 and d2["tower_proj"] is False
    assert ModelConfig.from_dict(d2) == ModelConfig(abs_positions=True, emb_dropout=0.2, tower_proj=False)
    assert ModelConfig.from_dict(ModelConfig().to_dict()) == ModelConfig()


def test_emb_scale_scales_only_the_history_input():
    torch.manual_seed(0)
    cfg = ModelConfig(max_history=8, emb_scale=False, abs_positions=False)  # positions are added after the scale
    plain = TwoTower(cfg, 40).eval()
    scaled = TwoTower(dataclasses.replace(cfg, emb_scale=True), 40).eval()
    scaled.load_state_dict(plain.state_dict())
    h = torch.tensor([[PAD_ROW, PAD_ROW, 3, 7, 1, 9, 2, 5]])
    with torch.no_grad():
        assert torch.allclose(scaled.embed_history(h), plain.embed_history(h) * cfg.dim ** 0.5)
        assert torch.equal(scaled.encode_items(h[0]), plain.encode_items(h[0]))  # the item tower is unchanged
        assert (scaled.encode_users(h) - plain.encode_users(h)).abs().max().item() > 1e-4
    assert ModelConfig(emb_scale=True).to_dict()["emb_scale"] is True


def test_without_tower_projections_it_trains_and_exports():
    torch.manual_seed(0)
    cfg = ModelConfig(max_history=8, tower_proj=False)
    m = TwoTower(cfg, 40).eval()
    assert not any("proj" in n and n.split(".")[0] in ("user_proj", "item_proj") for n, _ in m.named_parameters())
    rows = torch.arange(1, 40)
    with torch.no_grad():
        assert torch.allclose(m.encode_items(rows), torch.nn.functional.normalize(m.item_embedding(rows), dim=-1))
    x = torch.randint(1, 40, (3, 8))
    ep = torch.export.export(Wrapper(m), (x,), strict=False,
                             dynamic_shapes={"history_BT": {0: torch.export.Dim("batch", min=1, max=64)}})
    with torch.no_grad():
        assert (ep.module()(x) - m.encode_users(x)).abs().max().item() < 1e-5
    assert ModelConfig(tower_proj=False).to_dict()["tower_proj"] is False
    assert "tower_proj" not in ModelConfig(tower_proj=True).to_dict()
    with pytest.raises(ValueError, match="tower_proj"):
        ModelConfig(tower_proj=False, out_dim=32)
