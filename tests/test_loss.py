import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from trainer.loss import MASK_LOGIT, sampled_softmax_loss
from trainer.model import TwoTower
from trainer.model_config import ModelConfig

N_ITEMS = 20


def make_model(n_items=N_ITEMS, seed=0, **changes):
    torch.manual_seed(seed)
    return TwoTower(dataclasses.replace(ModelConfig.tiny_debug(), **changes), num_rows=n_items + 1)


def uniform_prob(n_items):
    p = torch.full((n_items + 1,), 1.0 / n_items)
    p[0] = 0
    return p


def random_users(M, D, seed=1):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(M, D, generator=g), dim=-1)


def loss(model, user, pos, *, n_items=N_ITEMS, n_random=8, temperature=0.05, seed=3, prob=None):
    return sampled_softmax_loss(model, user, pos, item_prob_R=uniform_prob(n_items) if prob is None else prob,
                                n_items=n_items, n_random=n_random, temperature=temperature,
                                generator=torch.Generator().manual_seed(seed))


def test_finite_and_positive():
    model = make_model()
    pos = torch.tensor([1, 5, 5, 9, 20])
    val = loss(model, random_users(5, 32), pos)
    assert val.ndim == 0 and torch.isfinite(val) and val.item() > 0


def test_matches_reference_computation():
    model = make_model()
    pos = torch.tensor([3, 7, 3, 12])
    user = random_users(4, 32)
    prob = torch.rand(N_ITEMS + 1, generator=torch.Generator().manual_seed(5))
    prob[0] = 0
    prob = prob / prob.sum()
    got = loss(model, user, pos, prob=prob, n_random=6, temperature=0.1, seed=11)

    rand = torch.randint(1, N_ITEMS + 1, (6,), generator=torch.Generator().manual_seed(11))
    uniq = [3, 7, 12]
    cands = uniq + rand.tolist()
    with torch.no_grad():
        items = model.encode_items(torch.tensor(cands))
    total = 0.0
    for m in range(4):
        logits = []
        for c, row in enumerate(cands):
            s = float(user[m] @ items[c]) / 0.1
            if c < 3:
                s -= math.log(float(prob[row]) * 4)
            else:
                s -= math.log(6 / N_ITEMS)
                if row == int(pos[m]):
                    s = MASK_LOGIT
            logits.append(s)
        t = uniq.index(int(pos[m]))
        total += -(logits[t] - math.log(sum(math.exp(x - max(logits)) for x in logits)) - max(logits))
    assert abs(got.item() - total / 4) < 1e-4


@pytest.mark.parametrize("logq", [False, True])
def test_uniform_only_negatives_match_reference(logq):
    """in_batch=False: each row against its own positive and the shared uniform draws only (other rows'
    positives are not candidates); logq=True shifts every negative by log(R / n_items)."""
    model = make_model()
    pos = torch.tensor([3, 7, 3, 12])
    user = random_users(4, 32)
    got = sampled_softmax_loss(model, user, pos, item_prob_R=uniform_prob(N_ITEMS), n_items=N_ITEMS, n_random=6,
                               temperature=0.1, generator=torch.Generator().manual_seed(11), in_batch=False, logq=logq)
    rand = torch.randint(1, N_ITEMS + 1, (6,), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        total = 0.0
        for m in range(4):
            logits = [float(user[m] @ model.encode_items(pos[m:m + 1])[0]) / 0.1]
            for row in rand.tolist():
                s = float(user[m] @ model.encode_items(torch.tensor([row]))[0]) / 0.1
                s -= math.log(6 / N_ITEMS) if logq else 0.0
                logits.append(MASK_LOGIT if row == int(pos[m]) else s)
            top = max(logits)
            total += -(logits[0] - top - math.log(sum(math.exp(x - top) for x in logits)))
    assert abs(got.item() - total / 4) < 1e-4


@pytest.mark.parametrize("in_batch,logq", [(False, False), (False, True), (True, True)])
def test_pairwise_term_is_mean_bpr_over_uniform_negatives(in_batch, logq):
    """pairwise_weight w adds w * mean softplus(s_neg - s_pos) over every (row, uniform draw) pair that is not
    the row's own positive, on raw cosine / temperature scores (log-Q never enters it)."""
    model = make_model()
    pos = torch.tensor([3, 7, 3, 12])
    user = random_users(4, 32)
    kw = dict(item_prob_R=uniform_prob(N_ITEMS), n_items=N_ITEMS, n_random=6, temperature=0.1,
              in_batch=in_batch, logq=logq)
    base = sampled_softmax_loss(model, user, pos, generator=torch.Generator().manual_seed(11), **kw)
    got = sampled_softmax_loss(model, user, pos, generator=torch.Generator().manual_seed(11), pairwise_weight=2.5, **kw)
    rand = torch.randint(1, N_ITEMS + 1, (6,), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        pairs = []
        for m in range(4):
            s_pos = float(user[m] @ model.encode_items(pos[m:m + 1])[0]) / 0.1
            for row in rand.tolist():
                if row != int(pos[m]):
                    s_neg = float(user[m] @ model.encode_items(torch.tensor([row]))[0]) / 0.1
                    pairs.append(math.log1p(math.exp(s_neg - s_pos)))
    assert abs((got - base).item() - 2.5 * sum(pairs) / len(pairs)) < 1e-4


def test_in_batch_without_logq_is_plain_softmax_over_candidates():
    model = make_model()
    pos = torch.tensor([3, 7, 12])
    user = random_users(3, 32)
    kw = dict(n_items=N_ITEMS, n_random=5, temperature=0.1)
    prob = torch.rand(N_ITEMS + 1, generator=torch.Generator().manual_seed(5))
    a = sampled_softmax_loss(model, user, pos, item_prob_R=prob, generator=torch.Generator().manual_seed(2),
                             logq=False, **kw)
    b = sampled_softmax_loss(model, user, pos, item_prob_R=prob * 0 + 1, generator=torch.Generator().manual_seed(2),
                             logq=False, **kw)
    c = sampled_softmax_loss(model, user, pos, item_prob_R=prob, generator=torch.Generator().manual_seed(2), **kw)
    assert a.item() == b.item()  # without log-Q the stream frequencies play no part
    assert a.item() != c.item()


def test_accidental_hits_are_masked():
    # one item: every random draw equals the positive, so only the positive's own logit survives
    model = make_model(n_items=1)
    user = random_users(3, 32)
    val = loss(model, user, torch.tensor([1, 1, 1]), n_items=1, n_random=16)
    assert val.item() == 0.0
    # two items: draws of the other row's positive stay as negatives, so the loss is strictly positive
    model2 = make_model(n_items=2)
    val2 = loss(model2, random_users(2, 32), torch.tensor([1, 2]), n_items=2, n_random=16)
    assert torch.isfinite(val2) and val2.item() > 0


def test_no_random_negatives():
    model = make_model()
    val = loss(model, random_users(3, 32), torch.tensor([2, 4, 6]), n_random=0)
    assert torch.isfinite(val) and val.item() > 0
    # a batch with a single positive and no negatives: nothing to contrast, loss 0
    one = loss(model, random_users(1, 32), torch.tensor([4]), n_random=0)
    assert abs(one.item()) < 1e-6


@pytest.mark.parametrize("tower_proj", [False, True])
def test_gradient_flows_to_items_and_users(tower_proj):
    model = make_model(tower_proj=tower_proj)
    hist = torch.tensor([[0, 0, 3, 4], [1, 2, 3, 5]])
    user_BTD = model.user_states(hist)
    user = user_BTD[:, -1]
    user.retain_grad()
    pos = torch.tensor([6, 7])
    loss(model, user, pos, n_random=4).backward()
    g = model.item_embedding.weight.grad
    assert g is not None
    assert g[6].abs().sum() > 0 and g[7].abs().sum() > 0  # positives / in-batch negatives
    assert g[3].abs().sum() > 0  # through the user tower's history
    assert g[0].abs().sum() == 0  # padding row never learns
    assert user.grad is not None and user.grad.abs().sum() > 0
    if tower_proj:
        assert model.user_proj.weight.grad.abs().sum() > 0
        assert model.item_proj.weight.grad.abs().sum() > 0


def test_lower_loss_when_user_matches_target():
    model = make_model()
    pos = torch.tensor([2, 8, 13, 17])
    with torch.no_grad():
        aligned = model.encode_items(pos)
    good = loss(model, aligned, pos, n_random=10)
    bad = loss(model, random_users(4, 32), pos, n_random=10)
    assert good.item() < bad.item()
    assert good.item() < 0.5 * bad.item()


def test_full_softmax_on_valid_positions_equals_naive_padded_ce():
    """The fused, chunked full CE over the gathered non-pad positions = F.cross_entropy over every item
    computed on the whole padded (B, T) output with pad targets ignored: loss and every gradient."""
    from trainer.loss import full_softmax_loss

    model = make_model()
    hist = torch.tensor([[0, 0, 3, 4, 9], [1, 2, 3, 5, 7], [0, 0, 0, 0, 11]])
    tgt = torch.tensor([[0, 0, 4, 9, 2], [2, 3, 5, 7, 20], [0, 0, 0, 0, 13]])
    mask = tgt != 0

    def grads():
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    def naive():
        states = model.user_states(hist)  # (B, T, D), pad positions included
        items = model.encode_items(torch.arange(1, N_ITEMS + 1))
        logits = (states @ items.T) / 0.07  # (B, T, N)
        return F.cross_entropy(logits.reshape(-1, N_ITEMS), (tgt - 1).reshape(-1), ignore_index=-1)

    model.zero_grad()
    ref = naive()
    ref.backward()
    ref_g = grads()
    for chunk in (1, 2, 64):
        model.zero_grad()
        states = model.user_states(hist)[mask]
        items = model.encode_items(torch.arange(1, N_ITEMS + 1))
        got = full_softmax_loss(states, items, tgt[mask] - 1, temperature=0.07, chunk=chunk)
        got.backward()
        assert abs(got.item() - ref.item()) < 1e-5
        for a, b in zip(grads(), ref_g):
            assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)
    model.zero_grad()  # bf16 matmuls: close, not exact
    states = model.user_states(hist)[mask]
    got = full_softmax_loss(states, model.encode_items(torch.arange(1, N_ITEMS + 1)), tgt[mask] - 1,
                            temperature=0.07, bf16_matmul=True)
    got.backward()
    assert abs(got.item() - ref.item()) < 2e-2 * ref.item()
    for a, b in zip(grads(), ref_g):
        assert (a - b).norm() <= 0.05 * b.norm() + 1e-8


def test_full_softmax_scales_with_upstream_gradient_and_empty_batch():
    from trainer.loss import full_softmax_loss

    user = random_users(4, 8).requires_grad_()
    items = random_users(10, 8, seed=2).requires_grad_()
    (3.0 * full_softmax_loss(user, items, torch.tensor([0, 3, 3, 9]), temperature=0.1)).backward()
    u2, i2 = user.detach().clone().requires_grad_(), items.detach().clone().requires_grad_()
    (3.0 * F.cross_entropy(u2 @ i2.T / 0.1, torch.tensor([0, 3, 3, 9]))).backward()
    assert torch.allclose(user.grad, u2.grad, atol=1e-6) and torch.allclose(items.grad, i2.grad, atol=1e-6)
    empty = full_softmax_loss(user[:0], items, torch.zeros(0, dtype=torch.long), temperature=0.1)
    assert empty.item() == 0.0


def test_full_softmax_exact_when_target_probability_underflows():
    from trainer.loss import full_softmax_loss

    user, items = random_users(6, 8), random_users(30, 8, seed=4)
    tgt = (user @ items.T).argmin(1)  # the least similar item: p(target) ~ exp(-2 / 0.005) underflows
    ref = F.cross_entropy(user @ items.T / 0.005, tgt)
    assert ref.item() > 100
    got = full_softmax_loss(user, items, tgt, temperature=0.005)
    assert abs(got.item() - ref.item()) < 1e-3 * ref.item()


def test_full_softmax_learned_temperature_gradient():
    from trainer.loss import full_softmax_loss

    user, items, tgt = random_users(5, 8), random_users(12, 8, seed=6), torch.tensor([0, 4, 4, 7, 11])
    t1 = torch.tensor(0.2, requires_grad=True)
    full_softmax_loss(user, items, tgt, temperature=t1).backward()
    t2 = torch.tensor(0.2, requires_grad=True)
    F.cross_entropy(user @ items.T / t2, tgt).backward()
    assert torch.allclose(t1.grad, t2.grad, atol=1e-5, rtol=1e-4)
