import math

import numpy as np
import pytest
import torch

from trainer.evaluate import _metrics_from_ranks, evaluate_model, evaluate_popularity
from trainer.model import ModelConfig, TwoTower

N = 30


def pop_counts():
    """counts per row (row 0 = pad): row r has count 100 - r, so row r has rank r - 1 (row 1 is best)."""
    c = np.zeros(N + 1, np.int64)
    c[1:] = 100 - np.arange(1, N + 1)
    c[0] = 10_000  # pad row must be ignored
    return c


def test_metrics_from_ranks_by_hand():
    m = _metrics_from_ranks(np.array([0, 5, 20]), ks=(1, 10, 30))
    assert m["recall@1"] == pytest.approx(1 / 3)
    assert m["recall@10"] == pytest.approx(2 / 3)
    assert m["recall@30"] == pytest.approx(1.0)
    assert m["ndcg@10"] == pytest.approx((1 + 1 / math.log2(7)) / 3)
    assert m["ndcg@30"] == pytest.approx((1 + 1 / math.log2(7) + 1 / math.log2(22)) / 3)
    assert _metrics_from_ranks(np.zeros(0), ks=(10,)) == {"recall@10": 0.0, "ndcg@10": 0.0}


def test_popularity_known_ranks():
    targets = np.array([1, 6, 21])  # ranks 0, 5, 20
    m = evaluate_popularity(pop_counts(), targets, N, ks=(10, 25))
    assert m["recall@10"] == pytest.approx(2 / 3)
    assert m["ndcg@10"] == pytest.approx((1 / math.log2(2) + 1 / math.log2(7)) / 3)
    assert m["recall@25"] == pytest.approx(1.0)
    assert m["ndcg@25"] == pytest.approx((1 + 1 / math.log2(7) + 1 / math.log2(22)) / 3)
    assert set(m) == {"recall@10", "ndcg@10", "recall@25", "ndcg@25"}


def test_popularity_ties_favour_target():
    c = np.zeros(N + 1, np.int64)
    c[1:] = 5
    c[3] = 9
    m = evaluate_popularity(c, np.array([7]), N, ks=(1, 2))
    assert m["recall@1"] == 0.0 and m["recall@2"] == 1.0  # rank 1: only row 3 is strictly higher
    assert m["ndcg@2"] == pytest.approx(1 / math.log2(3))


def test_popularity_seen_exclusion_moves_rank_up():
    targets = np.array([21])  # rank 20
    assert evaluate_popularity(pop_counts(), targets, N)["recall@10"] == 0.0
    seen = [list(range(1, 15))]  # 14 of the 20 better items already seen -> rank 6
    m = evaluate_popularity(pop_counts(), targets, N, seen_rows=seen)
    assert m["recall@10"] == 1.0
    assert m["ndcg@10"] == pytest.approx(1 / math.log2(8))
    # seen items below the target change nothing
    m2 = evaluate_popularity(pop_counts(), targets, N, seen_rows=[[25, 26, 30]])
    assert m2["recall@10"] == 0.0


def test_popularity_target_in_seen_still_ranked():
    targets = np.array([4, 2])
    seen = [[1, 2, 3, 4], []]
    m = evaluate_popularity(pop_counts(), targets, N, seen_rows=seen, ks=(1,))
    # row 0: 1,2,3 excluded, target 4 (also seen) ranks 0; row 1: rank 1
    assert m["recall@1"] == 0.5
    assert m["ndcg@1"] == 0.5


def test_popularity_only_first_n_items_ranked():
    c = pop_counts()
    c = np.concatenate([c, [1000, 1000]])  # rows beyond n_items (e.g. unused capacity) are ignored
    assert evaluate_popularity(c, np.array([1]), N, ks=(1,))["recall@1"] == 1.0


# ---- model

def model_and_data(B=7, T=5, seed=0):
    torch.manual_seed(seed)
    model = TwoTower(ModelConfig.tiny_debug(), num_rows=N + 1)
    rng = np.random.default_rng(seed)
    hist = rng.integers(1, N + 1, size=(B, T)).astype(np.int64)
    hist[0, :3] = 0  # a left-padded history
    targets = rng.integers(1, N + 1, size=B).astype(np.int64)
    with torch.no_grad():
        scores = (model.encode_users(torch.from_numpy(hist)) @ model.encode_items(torch.arange(1, N + 1)).T).numpy()
    return model, hist, targets, scores


def reference_ranks(scores, targets, seen=None):
    ranks = []
    for i, t in enumerate(targets):
        s = scores[i].copy()
        ts = s[t - 1]
        if seen and seen[i]:
            s[np.asarray(seen[i]) - 1] = -np.inf
        ranks.append(int((s > ts).sum()))
    return np.array(ranks)


def test_model_matches_reference_ranks():
    model, hist, targets, scores = model_and_data()
    ranks = reference_ranks(scores, targets)
    assert len(set(ranks.tolist())) > 1  # a non-trivial case
    got = evaluate_model(model, hist, targets, N, ks=(1, 5, 10))
    want = _metrics_from_ranks(ranks, (1, 5, 10))
    assert got == pytest.approx(want)
    # batching does not change the result
    assert evaluate_model(model, hist, targets, N, ks=(1, 5, 10), batch=3) == pytest.approx(want)


def test_model_target_ranked_first_gives_perfect_metrics():
    model, hist, _, scores = model_and_data()
    best = scores.argmax(1) + 1
    assert evaluate_model(model, hist, best, N, ks=(1,)) == {"recall@1": 1.0, "ndcg@1": 1.0}
    worst = scores.argmin(1) + 1
    assert evaluate_model(model, hist, worst, N, ks=(N - 1,))["recall@29"] == 0.0
    assert evaluate_model(model, hist, worst, N, ks=(N,))["recall@30"] == 1.0


def test_model_seen_exclusion_and_target_in_seen():
    model, hist, targets, scores = model_and_data()
    seen = []
    for i, t in enumerate(targets):
        higher = (np.flatnonzero(scores[i] > scores[i, t - 1]) + 1).tolist()
        seen.append(higher + [int(t)])  # every better item plus the target itself
    m = evaluate_model(model, hist, targets, N, seen_rows=seen, ks=(1,))
    assert m == {"recall@1": 1.0, "ndcg@1": 1.0}
    partial = [s[:2] for s in seen]
    got = evaluate_model(model, hist, targets, N, seen_rows=partial, ks=(1, 3, 10))
    assert got == pytest.approx(_metrics_from_ranks(reference_ranks(scores, targets, partial), (1, 3, 10)))


def test_model_leaves_eval_mode_and_no_grad():
    model, hist, targets, _ = model_and_data()
    model.train()
    evaluate_model(model, hist, targets, N)
    assert not model.training
    assert all(p.grad is None for p in model.parameters())


def test_model_empty_input():
    model, hist, _, _ = model_and_data()
    assert evaluate_model(model, hist[:0], np.zeros(0, np.int64), N) == {"recall@10": 0.0, "ndcg@10": 0.0}
