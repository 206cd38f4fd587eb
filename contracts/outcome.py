"""Outcome statistics: is one arm's hit rate better than another's, or not worse beyond a margin, with an error
guarantee that holds however often the analysis looks. Plain math, no grpc, no I/O: the server's canary and
experiment analyses, the CLI and benchmarks/experiments.py use it.

Hit rate = impressions with >= 1 hit / impressions, over settled impressions (served long enough ago that the
events they lead to had time to arrive and be joined; contracts/attribution.py counts them).

Two tests (TESTS), both giving one-sided bounds: `lo` is a lower and `hi` an upper bound on the true difference
of hit rates, each wrong with probability <= alpha.
- "sequential": an always-valid confidence sequence (the normal-mixture boundary of the mixture SPRT; Johari,
  Pekelis & Walsh, "Always valid inference: continuous monitoring of A/B tests", Operations Research 2022), on
  the estimated difference with its plug-in variance. P(a bound is ever wrong, at ANY of the analysis's looks)
  <= alpha, asymptotically (normal approximation; min_impressions keeps it out of the tiny-sample regime).
  So the analysis may look every tick and stop the moment it is conclusive.
- "fixed": a z-bound looked at ONCE, when the arms reached the horizon: P(wrong) <= alpha at that look. Looking
  earlier would break the guarantee, so nothing is decided before the horizon.
The sequential test pays for continuous looks with wider bounds (about 1.5-2x a fixed z-bound at the same n)
and wins when a true difference is large: it stops long before any fixed horizon sized for small ones.

A/B/N (experiment_decision) splits alpha over all its comparisons (each arm vs control, each pair of arms:
Bonferroni), so the chance that an experiment makes ANY false claim (an arm better than control when it is not,
or better than another when it is not) is <= alpha. In an A/A test every winner is false: P(winner) <= alpha.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

TESTS = ("sequential", "fixed")


@dataclass(frozen=True, slots=True)
class ArmCounts:
    impressions: int   # settled impressions served by the arm
    hits: int          # of them, impressions with >= 1 joined event on a shown item

    @property
    def rate(self) -> float:
        return self.hits / self.impressions if self.impressions else 0.0


@dataclass(frozen=True, slots=True)
class DiffBounds:
    diff: float        # rate(a) - rate(b)
    lo: float          # lower bound on the true difference (one-sided level alpha)
    hi: float          # upper bound


@dataclass(frozen=True, slots=True)
class OutcomeTest:
    test: str = "sequential"  # one of TESTS
    alpha: float = 0.05       # error probability of each claim (an experiment: of any claim)
    effect: float = 0.02      # difference in hit rate the sequential test is tuned to (its mixture's scale): smaller
                              # detects small effects sooner and large ones later
    horizon: int = 20_000     # impressions per arm: the fixed test looks here once; the sequential test gives up here
    min_impressions: int = 200  # per arm, before any bound is trusted (normal approximation)

    def __post_init__(self) -> None:
        if self.test not in TESTS:
            raise ValueError(f"test must be one of {', '.join(TESTS)}, got {self.test!r}")
        if not 0 < self.alpha < 0.5:
            raise ValueError(f"alpha must be in (0, 0.5), got {self.alpha}")
        if not 0 < self.effect < 1:
            raise ValueError(f"effect must be in (0, 1), got {self.effect}")
        if self.min_impressions < 10:
            raise ValueError(f"min_impressions must be >= 10, got {self.min_impressions}")
        if self.horizon < self.min_impressions:
            raise ValueError(f"horizon must be >= min_impressions ({self.min_impressions}), got {self.horizon}")


def _variance(c: ArmCounts) -> float:
    p = (c.hits + 0.5) / (c.impressions + 1.0)  # smoothed: an arm with 0 hits so far still has a variance
    return p * (1.0 - p) / c.impressions


def diff_bounds(a: ArmCounts, b: ArmCounts, t: OutcomeTest, *, comparisons: int = 1) -> DiffBounds:
    """Bounds on rate(a) - rate(b) at level t.alpha / comparisons. Both arms need impressions."""
    if a.impressions < 1 or b.impressions < 1:
        raise ValueError("both arms need impressions")
    alpha = t.alpha / comparisons
    var = _variance(a) + _variance(b)
    if t.test == "sequential":
        # Mixture likelihood ratio over a N(0, tau^2) prior on the difference < 1/alpha  <=>  |d - theta| < radius.
        tau2 = t.effect ** 2
        radius = math.sqrt(var * (var + tau2) / tau2 * (2 * math.log(1 / alpha) + math.log((var + tau2) / var)))
    else:
        radius = NormalDist().inv_cdf(1 - alpha) * math.sqrt(var)
    d = a.rate - b.rate
    return DiffBounds(d, d - radius, d + radius)


def _ready(arms: list[ArmCounts], t: OutcomeTest) -> tuple[bool, bool, int]:
    """(enough for any bound, at the horizon, smallest arm)."""
    n = min(c.impressions for c in arms)
    return n >= t.min_impressions and (t.test == "sequential" or n >= t.horizon), n >= t.horizon, n


def _pct(x: float) -> str:
    return f"{100 * x:+.2f} pp"


@dataclass(frozen=True, slots=True)
class NonInferiority:
    action: str               # "wait" | "pass" | "fail"
    reason: str
    canary: ArmCounts
    stable: ArmCounts
    bounds: DiffBounds | None  # None while waiting for the sample

    def figures(self) -> dict[str, float]:
        b = self.bounds
        return {"canary_impressions": self.canary.impressions, "stable_impressions": self.stable.impressions,
                "canary_hit_rate": self.canary.rate, "stable_hit_rate": self.stable.rate,
                "hit_rate_diff": self.canary.rate - self.stable.rate,
                "hit_rate_lo": b.lo if b else 0.0, "hit_rate_hi": b.hi if b else 0.0}


def noninferiority(canary: ArmCounts, stable: ArmCounts, t: OutcomeTest, margin: float) -> NonInferiority:
    """pass: the canary's hit rate is shown to be no worse than stable's minus `margin` (P(pass | truly worse by
    >= margin) <= alpha); fail: shown worse by more than the margin, or the horizon came without showing it."""
    def result(action: str, reason: str, b: DiffBounds | None = None) -> NonInferiority:
        return NonInferiority(action, reason, canary, stable, b)

    ready, at_horizon, n = _ready([canary, stable], t)
    if not ready:
        need = t.min_impressions if t.test == "sequential" else t.horizon
        return result("wait", f"hit rate sample {n} of {need} settled impressions per arm")
    b = diff_bounds(canary, stable, t)
    figures = (f"hit rate {canary.rate:.4f} vs stable {stable.rate:.4f} on {canary.impressions}/{stable.impressions} "
               f"impressions: difference {_pct(b.diff)}, {t.test} bounds [{_pct(b.lo)}, {_pct(b.hi)}] at "
               f"alpha {t.alpha:g}")
    if b.lo > -margin:
        return result("pass", f"{figures} > -margin {_pct(margin)[1:]}", b)
    if b.hi < -margin:
        return result("fail", f"{figures}: worse than stable by more than the margin {_pct(margin)[1:]}", b)
    if at_horizon:
        return result("fail", f"{figures}: not shown within margin {_pct(margin)[1:]} by the horizon {t.horizon}", b)
    return result("wait", figures, b)


@dataclass(frozen=True, slots=True)
class ArmVerdict:
    name: str
    counts: ArmCounts
    vs_control: DiffBounds | None
    state: str         # "running" | "worse" (shown worse than control) | "winner"


@dataclass(frozen=True, slots=True)
class ExperimentDecision:
    action: str        # "wait" | "winner" | "no_winner"
    winner: str        # arm name when action == "winner", else ""
    reason: str
    control: ArmCounts
    arms: tuple[ArmVerdict, ...]


def experiment_decision(control: ArmCounts, arms: dict[str, ArmCounts], t: OutcomeTest) -> ExperimentDecision:
    """A/B/N on hit rate. A winner beats control AND every arm not shown worse than control (pairwise); at the
    horizon the best arm shown better than control wins even when it is not separated from another such arm
    (the reason says so). Every bound is at alpha / (number of comparisons)."""
    k = len(arms)
    m = k + k * (k - 1) // 2
    ready, at_horizon, n = _ready([control, *arms.values()], t)
    if not ready:
        need = t.min_impressions if t.test == "sequential" else t.horizon
        return ExperimentDecision("wait", "", f"sample {n} of {need} settled impressions per arm", control,
                                  tuple(ArmVerdict(a, c, None, "running") for a, c in arms.items()))
    vs = {a: diff_bounds(c, control, t, comparisons=m) for a, c in arms.items()}
    worse = {a for a, b in vs.items() if b.hi < 0}
    better = sorted((a for a, b in vs.items() if b.lo > 0), key=lambda a: -arms[a].rate)

    def clear_winner(a: str) -> bool:
        return all(diff_bounds(arms[a], arms[o], t, comparisons=m).lo > 0 for o in arms if o != a and o not in worse)

    winner = next((a for a in better if clear_winner(a)), "")
    note = ""
    if not winner and better and at_horizon:
        winner = better[0]
        note = f" (horizon reached; not separated from {', '.join(a for a in better[1:]) or 'the others'})"
    verdicts = tuple(ArmVerdict(a, c, vs[a], "winner" if a == winner else "worse" if a in worse else "running")
                     for a, c in arms.items())
    summary = "; ".join(f"{a} {arms[a].rate:.4f} ({_pct(vs[a].diff)}, [{_pct(vs[a].lo)}, {_pct(vs[a].hi)}])"
                        for a in arms)
    head = (f"control {control.rate:.4f} on {control.impressions} impressions; {summary}; {t.test} bounds at "
            f"alpha {t.alpha:g}/{m}")
    if winner:
        return ExperimentDecision("winner", winner, f"{winner} beats control{note}: {head}", control, verdicts)
    if len(worse) == k:
        return ExperimentDecision("no_winner", "", f"every arm is worse than control: {head}", control, verdicts)
    if at_horizon:
        return ExperimentDecision("no_winner", "", f"horizon {t.horizon} reached, no arm shown better: {head}",
                                  control, verdicts)
    return ExperimentDecision("wait", "", head, control, verdicts)
