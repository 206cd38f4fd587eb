"""The hit-rate statistics (contracts/outcome.py) and the experiment user split: bounds, decisions, and the error
guarantees checked by simulation (binomial streams looked at every 100 impressions, as the server does)."""

from __future__ import annotations

import numpy as np
import pytest

from contracts.outcome import ArmCounts, OutcomeTest, diff_bounds, experiment_decision, noninferiority
from contracts.rollout import CanaryPolicy, Experiment, ExperimentArm
from server.engine.experiments import arm_index


def test_bounds_cover_the_difference_and_sequential_is_wider():
    a, b = ArmCounts(5000, 1300), ArmCounts(5000, 1000)
    fixed = diff_bounds(a, b, OutcomeTest(test="fixed"))
    seq = diff_bounds(a, b, OutcomeTest(test="sequential"))
    assert fixed.diff == pytest.approx(0.06) and seq.diff == pytest.approx(0.06)
    assert seq.lo < fixed.lo < 0.06 < fixed.hi < seq.hi
    assert fixed.hi - fixed.lo == pytest.approx(2 * 1.6449 * np.sqrt(0.26 * 0.74 / 5001 + 0.2 * 0.8 / 5001), rel=0.02)
    assert diff_bounds(a, b, OutcomeTest(test="fixed"), comparisons=3).lo < fixed.lo  # alpha split: wider


def test_outcome_test_and_policy_validation_name_the_field():
    for kwargs, field in ((dict(alpha=0.7), "alpha"), (dict(test="bayes"), "test"), (dict(effect=0), "effect"),
                          (dict(horizon=50), "horizon"), (dict(min_impressions=5), "min_impressions")):
        with pytest.raises(ValueError, match=field):
            OutcomeTest(**kwargs)
    with pytest.raises(ValueError, match="outcome_alpha"):
        CanaryPolicy(outcome_alpha=0.9)
    with pytest.raises(ValueError, match="outcome_test"):
        CanaryPolicy(outcome_test="maybe")
    with pytest.raises(ValueError, match="outcome_margin"):
        CanaryPolicy(outcome_margin=-0.1)


def test_noninferiority_waits_passes_and_fails():
    t = OutcomeTest(min_impressions=200)
    assert noninferiority(ArmCounts(100, 30), ArmCounts(5000, 1500), t, 0.01).action == "wait"
    assert noninferiority(ArmCounts(20000, 6000), ArmCounts(20000, 6000), t, 0.02).action == "pass"
    worse = noninferiority(ArmCounts(5000, 1000), ArmCounts(5000, 1500), t, 0.01)
    assert worse.action == "fail" and "worse than stable" in worse.reason
    undecided = noninferiority(ArmCounts(20000, 5880), ArmCounts(20000, 6000), t, 0.01)  # -0.6 pp at the horizon
    assert undecided.action == "fail" and "horizon" in undecided.reason
    fixed = OutcomeTest(test="fixed", horizon=5000)
    assert noninferiority(ArmCounts(4999, 1500), ArmCounts(6000, 1800), fixed, 0.02).action == "wait"  # no early look
    assert noninferiority(ArmCounts(5000, 1500), ArmCounts(6000, 1800), fixed, 0.02).action == "pass"


def test_experiment_picks_the_better_arm_and_no_winner_when_all_are_worse():
    t = OutcomeTest(min_impressions=200)
    d = experiment_decision(ArmCounts(4000, 800), {"b": ArmCounts(4000, 1200), "c": ArmCounts(4000, 600)}, t)
    assert d.action == "winner" and d.winner == "b"
    assert {v.name: v.state for v in d.arms} == {"b": "winner", "c": "worse"}
    d = experiment_decision(ArmCounts(4000, 1200), {"b": ArmCounts(4000, 800), "c": ArmCounts(4000, 700)}, t)
    assert d.action == "no_winner" and "every arm is worse" in d.reason
    # two arms both better than control, not separated from each other: wait, then at the horizon the better one
    close = {"b": ArmCounts(3000, 900), "c": ArmCounts(3000, 910)}
    assert experiment_decision(ArmCounts(3000, 600), close, t).action == "wait"
    at_h = OutcomeTest(min_impressions=200, horizon=3000)
    d = experiment_decision(ArmCounts(3000, 600), close, at_h)
    assert d.action == "winner" and d.winner == "c" and "not separated" in d.reason


def _monitored(ps: list[float], t: OutcomeTest, rng, step: int = 100) -> tuple[str, str, int]:
    n = np.zeros(len(ps), int)
    h = np.zeros(len(ps), int)
    while True:
        h += rng.binomial(step, ps)
        n += step
        d = experiment_decision(ArmCounts(n[0], h[0]), {f"a{i}": ArmCounts(n[i], h[i]) for i in range(1, len(ps))}, t)
        if d.action != "wait":
            return d.action, d.winner, int(n[0])


@pytest.mark.parametrize("test", ["sequential", "fixed"])
def test_aa_false_winner_rate_stays_below_alpha_under_continuous_looks(test):
    """A/A/A: every winner is false. 400 runs looked at every 100 impressions up to 4,000 per arm; with
    alpha = 0.1 the rate must stay below it (binomial noise: 400 runs at 0.1 would exceed 0.13 with p < 0.03)."""
    rng = np.random.default_rng(7)
    t = OutcomeTest(test=test, alpha=0.1, horizon=4000, min_impressions=200)
    winners = sum(_monitored([0.2, 0.2, 0.2], t, rng)[0] == "winner" for _ in range(400))
    assert winners / 400 <= 0.13, winners


def test_naive_repeated_z_test_would_break_the_guarantee():
    """Why the sequential bounds: the fixed z-bound looked at every 100 impressions (what a naive dashboard does)
    declares false winners far above alpha. The test above would fail for it."""
    rng = np.random.default_rng(7)
    t = OutcomeTest(test="fixed", alpha=0.1, horizon=4000, min_impressions=200)
    wins = 0
    for _ in range(200):
        n, h = np.zeros(2, int), np.zeros(2, int)
        for _ in range(40):
            h += rng.binomial(100, [0.2, 0.2])
            n += 100
            if n[0] >= 200 and diff_bounds(ArmCounts(n[1], h[1]), ArmCounts(n[0], h[0]), t).lo > 0:
                wins += 1
                break
    assert wins / 200 > 0.2, wins


def test_sequential_finds_a_real_difference_before_the_horizon():
    rng = np.random.default_rng(3)
    t = OutcomeTest(alpha=0.05, horizon=20_000, min_impressions=200)
    runs = [_monitored([0.2, 0.25, 0.15], t, rng) for _ in range(50)]
    assert all(r[1] == "a1" for r in runs), runs
    assert np.median([r[2] for r in runs]) < 5000


def _experiment(**kw) -> Experiment:
    base = dict(id=1, name="x", control_version=1, test=OutcomeTest(),
                arms=(ExperimentArm(name="b", version=2, fraction=0.2), ExperimentArm(name="c", version=3, fraction=0.3)))
    return Experiment(**{**base, **kw})


def test_user_split_is_sticky_salted_and_proportional():
    x = _experiment()
    users = [f"user-{i}" for i in range(20_000)]
    arms = [arm_index(u, x, b"salt") for u in users]
    assert arms == [arm_index(u, x, b"salt") for u in users]  # sticky: any replica computes the same
    shares = np.bincount(np.array(arms) + 1, minlength=3) / len(users)
    assert shares == pytest.approx([0.5, 0.2, 0.3], abs=0.015)
    other_salt = [arm_index(u, x, b"pepper") for u in users]
    assert np.mean(np.array(arms) == np.array(other_salt)) < 0.6  # the salt decides; a caller cannot aim
    reshuffled = [arm_index(u, _experiment(id=2), b"salt") for u in users]
    assert np.mean(np.array(arms) == np.array(reshuffled)) < 0.6  # a new experiment takes new slices
    assert arm_index("", x, b"salt") == -1


@pytest.mark.parametrize("kwargs, words", [
    (dict(arms=()), "1 to 8 arms"),
    (dict(arms=(ExperimentArm(name="stable", version=2, fraction=0.2),)), "name 'stable'"),
    (dict(arms=(ExperimentArm(name="b", version=1, fraction=0.2),)), "other than stable"),
    (dict(arms=(ExperimentArm(name="b", version=2, fraction=0.6), ExperimentArm(name="c", version=3, fraction=0.4))),
     "sum to 1"),
    (dict(arms=(ExperimentArm(name="b", version=2, fraction=0.1), ExperimentArm(name="b", version=3, fraction=0.1))),
     "distinct"),
    (dict(name=""), "name must have"),
])
def test_experiment_validation(kwargs, words):
    with pytest.raises(ValueError, match=words):
        _experiment(**kwargs)
