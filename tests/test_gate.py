"""The round's publish gate (trainer/gate.py: gate_decision), a pure function of the round's metrics and config."""

from __future__ import annotations

import math

import pytest

from trainer.config import TrainConfig
from trainer.gate import gate_decision


def _cfg(**overrides) -> TrainConfig:
    return TrainConfig.tiny_debug(**{"min_eval_users": 20, "gate_min_ratio": 1.0, "gate_min_vs_serving": 0.95,
                                     **overrides})


def _metrics(n: int, model: float, popularity: float, serving: float | None = None) -> dict[str, float]:
    m = {"holdout_users": float(n), "model_recall@10": model, "model_ndcg@10": model / 2,
         "popularity_recall@10": popularity, "popularity_ndcg@10": popularity / 2}
    if serving is not None:
        m.update({"serving_recall@10": serving, "serving_ndcg@10": serving / 2, "gate_baseline_version": 3.0})
    return m


def test_too_few_held_out_users_skip_the_gate():
    assert gate_decision({"holdout_users": 19.0}, _cfg()) == "skipped"  # nothing else was evaluated
    assert gate_decision(_metrics(19, model=0.0, popularity=0.9), _cfg()) == "skipped"
    assert gate_decision(_metrics(20, model=0.0, popularity=0.9), _cfg()) == "failed"


@pytest.mark.parametrize("model, ratio, gate", [(0.30, 1.0, "passed"), (0.20, 1.0, "passed"), (0.19, 1.0, "failed"),
                                                (0.31, 1.5, "passed"), (0.29, 1.5, "failed"), (0.0, 0.0, "passed")])
def test_without_a_serving_model_the_candidate_must_reach_ratio_x_popularity(model, ratio, gate):
    assert gate_decision(_metrics(500, model=model, popularity=0.20), _cfg(gate_min_ratio=ratio)) == gate


def test_the_serving_comparison_allows_two_standard_errors_of_the_paired_difference():
    m = _metrics(400, model=0.40, popularity=0.10, serving=0.50)
    se = math.sqrt((0.40 + 0.50) / 400)
    at_margin = (0.40 + 2 * se) / 0.50  # gate_min_vs_serving at which 0.40 is exactly the threshold
    assert gate_decision(m, _cfg(gate_min_vs_serving=at_margin - 1e-6)) == "passed"
    assert gate_decision(m, _cfg(gate_min_vs_serving=at_margin + 1e-6)) == "failed"


def test_the_margin_shrinks_with_the_holdout():
    # 0.42 vs 0.50: within 2 standard errors on 400 users (0.096), well outside them on 10 000 (0.019).
    assert gate_decision(_metrics(400, model=0.42, popularity=0.1, serving=0.5), _cfg(gate_min_vs_serving=1.0)) \
        == "passed"
    assert gate_decision(_metrics(10_000, model=0.42, popularity=0.1, serving=0.5), _cfg(gate_min_vs_serving=1.0)) \
        == "failed"


def test_both_conditions_must_hold():
    beats_serving_not_popularity = _metrics(500, model=0.30, popularity=0.40, serving=0.10)
    assert gate_decision(beats_serving_not_popularity, _cfg()) == "failed"
    beats_popularity_not_serving = _metrics(500, model=0.30, popularity=0.10, serving=0.60)
    assert gate_decision(beats_popularity_not_serving, _cfg()) == "failed"
    assert gate_decision(_metrics(500, model=0.30, popularity=0.10, serving=0.30), _cfg()) == "passed"
