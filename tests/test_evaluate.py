import itertools
import math

import numpy as np
import pytest
import torch

from trainer.evaluate import (evaluate_model, evaluate_popularity, expected_metrics, model_rank_counts,
                              popularity_rank_counts, rank_counts)
from trainer.model import TwoTower
from trainer.model_config import ModelConfig

N = 30


def pop_counts():
    """counts per row (row 0 = pad): row r has count 100 - r, so row r has rank r - 1 (row 1 is best)."""
    c = np.zeros(N + 1, np.int64)
    c[1:] = 100 - np.arange(1, N + 1)
    c[0] = 10_000  # pad row must be ignored
    return c


def ranks_metrics(ranks, ks):
    """Metrics of untied ranks (0-based), by the textbook formula."""
    ranks = np.asarray(ranks)
    out = {}
    for k in ks:
        out[f"recall@{k}"] = float((ranks < k).mean()) if len(ranks) else 0.0
        out[f"ndcg@{k}"] = float(((ranks < k) / np.log2(ranks + 2)).mean()) if len(ranks) else 0.0
    return out


def test_expected_metrics_without_ties_by_hand():
    m = expected_metrics(np.array([0, 5, 20]), np.zeros(3, np.int64), ks=(1, 10, 30))
    assert m["recall@1"] == pytest.approx(1 / 3)
    assert m["recall@10"] == pytest.approx(2 / 3)
    assert m["recall@30"] == pytest.approx(1.0)
    assert m["ndcg@10"] == pytest.approx((1 + 1 / math.log2(7)) / 3)
    assert m["ndcg@30"] == pytest.approx((1 + 1 / math.log2(7) + 1 / math.log2(22)) / 3)
    assert set(m) == {"recall@1", "ndcg@1", "recall@10", "ndcg@10", "recall@30", "ndcg@30"}
    assert expected_metrics(np.zeros(0), np.zeros(0), ks=(10,)) == {"recall@10": 0.0, "ndcg@10": 0.0}
    assert set(expected_metrics(np.array([1]), np.array([0]), ks=(5,), hit_name="hr")) == {"hr@5", "ndcg@5"}


def test_expected_metrics_ties_by_hand():
    # 2 items above, target tied with 2 others: positions 3, 4, 5 (1-based), each with probability 1/3
    m = expected_metrics(np.array([2]), np.array([2]), ks=(1, 2, 3, 4, 5, 10))
    assert m["recall@1"] == 0.0 and m["recall@2"] == 0.0 and m["ndcg@2"] == 0.0
    assert m["recall@3"] == pytest.approx(1 / 3)
    assert m["ndcg@3"] == pytest.approx(1 / 3 * 1 / math.log2(4))  # = 1/6
    assert m["ndcg@3"] == pytest.approx(1 / 6)
    assert m["recall@4"] == pytest.approx(2 / 3)
    assert m["ndcg@4"] == pytest.approx((1 / math.log2(4) + 1 / math.log2(5)) / 3)
    assert m["recall@5"] == pytest.approx(1.0) and m["recall@10"] == pytest.approx(1.0)
    assert m["ndcg@5"] == pytest.approx((1 / 2 + 1 / math.log2(5) + 1 / math.log2(6)) / 3)
    assert m["ndcg@10"] == pytest.approx(m["ndcg@5"])
    # averaged over rows: (1/3 + 1 + 0) / 3 at k=3 (row 2: untied at position 1; row 3: 9 above)
    m = expected_metrics(np.array([2, 0, 9]), np.array([2, 0, 4]), ks=(3,))
    assert m["recall@3"] == pytest.approx((1 / 3 + 1 + 0) / 3)
    # a tie that straddles k: 9 above, 1 tie -> position 10 or 11
    m = expected_metrics(np.array([9]), np.array([1]), ks=(10,))
    assert m["recall@10"] == pytest.approx(0.5) and m["ndcg@10"] == pytest.approx(0.5 / math.log2(11))
    with pytest.raises(ValueError, match="same shape"):
        expected_metrics(np.zeros(2), np.zeros(3), ks=(1,))


def brute_force_expected(scores, target_col, ks):
    """Exact expectation over every order of the candidates consistent with the scores (ties in every order)."""
    n = len(scores)
    orders = [p for p in itertools.permutations(range(n))
              if all(scores[p[i]] >= scores[p[i + 1]] for i in range(n - 1))]
    out = {}
    for k in ks:
        pos = [p.index(target_col) for p in orders]
        out[f"recall@{k}"] = float(np.mean([r < k for r in pos]))
        out[f"ndcg@{k}"] = float(np.mean([(r < k) / math.log2(r + 2) for r in pos]))
    return out


def test_rank_counts_match_brute_force_over_tie_orders():
    rng = np.random.default_rng(3)
    for _ in range(20):
        scores = rng.integers(0, 3, size=7).astype(np.float64)  # many ties
        t = int(rng.integers(0, 7))
        g, e = rank_counts(torch.from_numpy(scores[None, :]), np.array([t]))
        assert (g[0], e[0]) == ((scores > scores[t]).sum(), (scores == scores[t]).sum() - 1)
        assert expected_metrics(g, e, ks=(1, 2, 4)) == pytest.approx(brute_force_expected(scores, t, (1, 2, 4)))


def test_rank_counts_exclusions_never_drop_the_target():
    s = torch.tensor([[5.0, 5.0, 5.0, 9.0, 1.0]])
    assert [int(x[0]) for x in rank_counts(s, np.array([0]))] == [1, 2]
    assert [int(x[0]) for x in rank_counts(s, np.array([0]), [[1, 3]])] == [0, 1]
    assert [int(x[0]) for x in rank_counts(s, np.array([0]), [[0, 1, 2]])] == [1, 0]  # target in its own exclusions


def test_popularity_known_ranks():
    targets = np.array([1, 6, 21])  # ranks 0, 5, 20
    m = evaluate_popularity(pop_counts(), targets, N, ks=(10, 25))
    assert m["recall@10"] == pytest.approx(2 / 3)
    assert m["ndcg@10"] == pytest.approx((1 / math.log2(2) + 1 / math.log2(7)) / 3)
    assert m["recall@25"] == pytest.approx(1.0)
    assert m["ndcg@25"] == pytest.approx((1 + 1 / math.log2(7) + 1 / math.log2(22)) / 3)
    assert set(m) == {"recall@10", "ndcg@10", "recall@25", "ndcg@25"}


def tied_counts():
    """Rows 1, 2 above; rows 5, 6, 7 tied at 30 (the target will be 7); every other row lower (ties among them)."""
    c = np.full(N + 1, 10, np.int64)
    c[1], c[2] = 50, 40
    c[5] = c[6] = c[7] = 30
    c[0] = 10_000  # pad row must be ignored
    return c


def test_popularity_ties_averaged_not_in_the_targets_favour():
    # target 7 is tied with 2 others after 2 better rows: positions 3, 4, 5 equally likely
    m = evaluate_popularity(tied_counts(), np.array([7]), N, ks=(1, 2, 3, 4, 5))
    assert m["recall@2"] == 0.0
    assert m["recall@3"] == pytest.approx(1 / 3)  # counting ties for the target would give 1.0
    assert m["ndcg@3"] == pytest.approx(1 / 6)
    assert m["recall@4"] == pytest.approx(2 / 3)
    assert m["recall@5"] == pytest.approx(1.0)
    assert m["ndcg@5"] == pytest.approx((1 / 2 + 1 / math.log2(5) + 1 / math.log2(6)) / 3)
    assert [x.tolist() for x in popularity_rank_counts(tied_counts(), np.array([7, 1, 20]), N)] == [[2, 0, 5], [2, 0, 24]]
    # a low row: 5 above, tied with the 24 other rows at 10 -> uniform on positions 6..30
    m = evaluate_popularity(tied_counts(), np.array([20]), N, ks=(5, 6, 30))
    assert m["recall@5"] == 0.0 and m["recall@6"] == pytest.approx(1 / 25) and m["recall@30"] == pytest.approx(1.0)


def test_popularity_ties_with_seen_items():
    c = tied_counts()
    # one tied item seen: positions 3, 4
    m = evaluate_popularity(c, np.array([7]), N, seen_rows=[[6]], ks=(3,))
    assert m["recall@3"] == pytest.approx(1 / 2)
    assert m["ndcg@3"] == pytest.approx(1 / 2 * 1 / math.log2(4))
    # both tied items and row 1 seen: position 2 for sure
    assert evaluate_popularity(c, np.array([7]), N, seen_rows=[[1, 5, 6]], ks=(1, 2)) == \
        pytest.approx({"recall@1": 0.0, "ndcg@1": 0.0, "recall@2": 1.0, "ndcg@2": 1 / math.log2(3)})
    # the target itself seen: it keeps its score and its ties
    m = evaluate_popularity(c, np.array([7]), N, seen_rows=[[7]], ks=(3,))
    assert m["recall@3"] == pytest.approx(1 / 3)
    # rows beyond n_items (unused capacity) tied with the target are not candidates
    c2 = np.concatenate([c, [30, 30, 30]])
    assert evaluate_popularity(c2, np.array([7]), N, ks=(3,))["recall@3"] == pytest.approx(1 / 3)


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
    want = ranks_metrics(ranks, (1, 5, 10))
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
    assert got == pytest.approx(ranks_metrics(reference_ranks(scores, targets, partial), (1, 3, 10)))


def test_model_ties_averaged():
    """Zeroed item rows score exactly 0 for every user: a target whose row is zeroed ties with the 2 others."""
    model, hist, _, _ = model_and_data()
    with torch.no_grad():
        model.item_embedding.weight[[4, 9, 17]] = 0.0  # rows 4, 9, 17 (items in the history are not among them)
    hist = np.where(np.isin(hist, [4, 9, 17]), 1, hist)
    hist[0, :3] = 0
    with torch.no_grad():
        scores = (model.encode_users(torch.from_numpy(hist)) @ model.encode_items(torch.arange(1, N + 1)).T).numpy()
    targets = np.full(len(hist), 9)
    assert (scores[:, [3, 8, 16]] == 0).all()
    g = (scores > 0).sum(1)
    assert len(set(g.tolist())) > 1  # users differ
    gt, eq = model_rank_counts(model, hist, targets, N)
    assert gt.tolist() == g.tolist() and eq.tolist() == [2] * len(hist)
    for k in (1, 5, 10, 20):  # position uniform on g+1..g+3 (1-based): recall@k = clip(k - g, 0, 3) / 3
        m = evaluate_model(model, hist, targets, N, ks=(k,))
        assert m[f"recall@{k}"] == pytest.approx(np.mean(np.clip(k - g, 0, 3) / 3))
        want_ndcg = np.mean([sum(1 / math.log2(r + 2) for r in range(gi, gi + 3) if r < k) / 3 for gi in g])
        assert m[f"ndcg@{k}"] == pytest.approx(want_ndcg)
    # seeing one of the two tied items leaves one tie
    assert model_rank_counts(model, hist, targets, N, seen_rows=[[4]] * len(hist))[1].tolist() == [1] * len(hist)


def test_model_leaves_eval_mode_and_no_grad():
    model, hist, targets, _ = model_and_data()
    model.train()
    evaluate_model(model, hist, targets, N)
    assert not model.training
    assert all(p.grad is None for p in model.parameters())


def test_model_empty_input():
    model, hist, _, _ = model_and_data()
    assert evaluate_model(model, hist[:0], np.zeros(0, np.int64), N) == {"recall@10": 0.0, "ndcg@10": 0.0}


def test_popularity_counts_equal_rank_counts_on_the_count_matrix():
    """popularity_rank_counts (one sorted copy) gives what rank_counts gives on the full (B, N) count matrix."""
    rng = np.random.default_rng(5)
    c = rng.integers(0, 6, N + 1)  # many ties
    targets = rng.integers(1, N + 1, 40)
    seen = [rng.integers(1, N + 1, rng.integers(0, 8)).tolist() + ([int(t)] if i % 3 == 0 else [])
            for i, t in enumerate(targets)]
    scores = torch.from_numpy(c[1:].astype(np.float64))[None].expand(len(targets), -1)
    for s in (None, seen):
        got = popularity_rank_counts(c, targets, N, seen_rows=s)
        want = rank_counts(scores, targets - 1, None if s is None else [np.asarray(x, np.int64) - 1 for x in s])
        assert got[0].tolist() == want[0].tolist() and got[1].tolist() == want[1].tolist()
        assert got[1].sum() > 0
