"""Canary analysis: the sticky user split, live per-arm statistics, the paired shadow comparison and
the verdict. grpc-free; the manager owns one CanaryStats per running canary.

Two kinds of evidence:
- live: latency and errors of real requests on each arm (the canary serves `fraction` of users);
- shadow: sampled queries (recent live queries, else stored user histories, else random item
  histories, so a quiet server still gets a sample) run on BOTH engines off the request path, giving
  paired engine CPU times, top-k overlap and the distance between the two top-k score distributions.
A raising canary fails fast (early rollback), garbage scores show as low overlap or large drift, a
slow one as a high latency ratio; a healthy one is promoted once both samples are big enough.

Low overlap and large drift are also what a young, quickly learning model shows between versions. So a
canary whose manifest carries the trainer's passed quality gate against the CURRENT stable version (same
fresh holdout, trainer/loop.py) is vouched for: its ranking change is expected and measured, and those two
checks are reported instead of enforced. Errors and latency are always enforced. Without this, one
rollback freezes stable and every later candidate drifts further from it: the canary never promotes again.
"""

from __future__ import annotations

import hashlib
import threading
from bisect import bisect_left
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from contracts.outcome import NonInferiority
from contracts.rollout import CanaryPolicy
from proto import livetower_v1_pb2 as pb
from server.engine.engine import Engine, RecommendQuery

LIVE_KEPT = 5_000        # newest live latencies kept per arm (P99 over these; bounded analysis cost)
SCORES_PER_SAMPLE = 10   # top scores of each shadow sample that enter the drift test
SCORES_KEPT = 2_000      # newest such scores per arm (bounds the KS test's cost)
SHADOW_K = 100
SHADOW_KEEP_QPS = 1.0    # shadow rate once policy.shadow_samples pairs are in: the estimate keeps updating
# Live latencies are also counted in fixed log-spaced buckets (~3 % wide; one overflow bucket), mergeable across
# replicas (server/engine/fleet_stats.py).
LATENCY_EDGES_S = tuple(float(x) for x in np.geomspace(1e-5, 30.0, 501))


# A live-latency rollback needs at least this many canary requests beyond max_p99_ratio x the stable arm's P99:
# the canary serves a small slice, and the P99 of ~20-200 requests is their slowest one or two, so one request
# stalled by a GC pause or a busy host (CI: 440 ms against a stable P99 of 6.9 ms) read as a latency regression.
LIVE_TAIL_MIN_REQUESTS = 3


def latency_bucket(seconds: float) -> int:
    return bisect_left(LATENCY_EDGES_S, seconds)


def in_canary(user_id: str, canary_version: int, fraction: float, salt: bytes) -> bool:
    """Sticky: the same user, canary and salt always give the same answer; keyed by version so each canary
    takes a different slice of users, and by the registry's secret salt (Registry.canary_salt) so a caller
    cannot compute who is in the canary and aim expensive requests at it to force a rollback."""
    if not user_id:
        return False
    h = hashlib.blake2b(f"{canary_version}\x00{user_id}".encode(), digest_size=8, key=salt).digest()
    return int.from_bytes(h, "big") < fraction * 2.0 ** 64


def ks_distance(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: max |F_a(x) - F_b(x)|, in [0, 1]."""
    a_N, b_M = np.sort(np.asarray(a, dtype=np.float64)), np.sort(np.asarray(b, dtype=np.float64))
    if not len(a_N) or not len(b_M):
        return 0.0
    grid = np.concatenate([a_N, b_M])
    cdf_a = np.searchsorted(a_N, grid, side="right") / len(a_N)
    cdf_b = np.searchsorted(b_M, grid, side="right") / len(b_M)
    return float(np.max(np.abs(cdf_a - cdf_b)))


@dataclass(frozen=True, slots=True)
class Verdict:
    action: str                  # "wait" | "promote" | "rollback"
    reason: str
    figures: dict[str, float]    # the CanaryAnalysis fields


class CanaryStats:
    """Evidence about one canary. Live fields are written by the event loop, shadow fields by the
    shadow thread; one lock keeps snapshots consistent."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self.latency_s = {True: deque(maxlen=LIVE_KEPT), False: deque(maxlen=LIVE_KEPT)}  # is_canary -> seconds
        self.latency_hist: dict[bool, dict[int, int]] = {True: {}, False: {}}  # is_canary -> bucket -> count
        self.requests = {True: 0, False: 0}
        self.errors = {True: 0, False: 0}
        self.queries: deque[RecommendQuery] = deque(maxlen=256)  # recent live queries for the shadow
        self.overlaps: list[float] = []
        self.scores = {True: deque(maxlen=SCORES_KEPT), False: deque(maxlen=SCORES_KEPT)}
        self.engine_s = {True: [], False: []}

    def observe(self, is_canary: bool, seconds: float, error: bool) -> None:
        with self._lock:
            self.requests[is_canary] += 1
            if error:
                self.errors[is_canary] += 1
            else:
                self.latency_s[is_canary].append(seconds)
                hist, b = self.latency_hist[is_canary], latency_bucket(seconds)
                hist[b] = hist.get(b, 0) + 1

    def offer(self, query: RecommendQuery) -> None:
        self.queries.append(query)

    def add_shadow(self, overlap: float, canary_scores: list[float], stable_scores: list[float],
                   canary_s: float, stable_s: float) -> None:
        with self._lock:
            self.overlaps.append(overlap)
            self.scores[True].extend(canary_scores[:SCORES_PER_SAMPLE])
            self.scores[False].extend(stable_scores[:SCORES_PER_SAMPLE])
            self.engine_s[True].append(canary_s)
            self.engine_s[False].append(stable_s)

    def mergeable(self, samples: int) -> dict:
        """What another process needs to merge this evidence with its own (server/engine/fleet_stats.py):
        counts, latency buckets, shadow sums, and the newest `samples` scores and paired times per arm."""
        with self._lock:
            return {
                "elapsed_s": time.monotonic() - self.started,
                "requests": [self.requests[True], self.requests[False]],
                "errors": [self.errors[True], self.errors[False]],
                "latency_hist": [{str(i): n for i, n in self.latency_hist[arm].items()} for arm in (True, False)],
                "overlap_sum": float(sum(self.overlaps)), "overlap_n": len(self.overlaps),
                "scores": [list(self.scores[arm])[-samples:] for arm in (True, False)],
                "engine_s": [self.engine_s[arm][-samples:] for arm in (True, False)],
            }

    def figures(self) -> dict[str, float]:
        # Copy under the lock, compute outside it: observe() runs on the event loop and must not wait.
        with self._lock:
            lat = {arm: np.fromiter(self.latency_s[arm], float, len(self.latency_s[arm])) for arm in (True, False)}
            requests, errors = dict(self.requests), dict(self.errors)
            overlaps = list(self.overlaps)
            scores = {arm: list(self.scores[arm]) for arm in (True, False)}
            engine_s = {arm: list(self.engine_s[arm]) for arm in (True, False)}
        c99, s99 = (float(np.percentile(lat[arm], 99) * 1e3) if len(lat[arm]) else 0.0 for arm in (True, False))
        n_tail = LIVE_TAIL_MIN_REQUESTS
        floor = float(np.partition(lat[True], -n_tail)[-n_tail] * 1e3) if len(lat[True]) >= n_tail else 0.0
        med_c = float(np.median(engine_s[True])) if overlaps else 0.0
        med_s = float(np.median(engine_s[False])) if overlaps else 0.0
        return {
            "elapsed_s": time.monotonic() - self.started,
            "canary_requests": requests[True], "stable_requests": requests[False],
            "canary_errors": errors[True], "stable_errors": errors[False],
            "canary_p99_ms": c99, "stable_p99_ms": s99, "p99_ratio": c99 / s99 if s99 > 0 else 0.0,
            "canary_tail_floor_ms": floor,  # LIVE_TAIL_MIN_REQUESTS canary requests took at least this
            "shadow_samples": len(overlaps),
            "topk_overlap": float(np.mean(overlaps)) if overlaps else 0.0,
            "score_drift": ks_distance(scores[True], scores[False]),
            "shadow_latency_ratio": med_c / med_s if med_s > 0 else 0.0,  # CPU time, paired
        }


def quality_vouch(canary_metrics: dict[str, float], stable_version: int) -> str | None:
    """The trainer's evidence that the canary is no worse than stable, from its manifest's eval_metrics,
    or None when there is none for this stable version."""
    m = canary_metrics
    if m.get("gate_passed") != 1.0 or int(m.get("gate_baseline_version", -1)) != stable_version:
        return None
    return (f"trainer gate vs stable {stable_version} on {m.get('holdout_users', 0):.0f} held-out users: "
            f"R@10 {m.get('model_recall@10', 0):.4f} vs {m.get('serving_recall@10', 0):.4f}")


NO_OUTCOME = {"canary_impressions": 0, "stable_impressions": 0, "canary_hit_rate": 0.0, "stable_hit_rate": 0.0,
              "hit_rate_diff": 0.0, "hit_rate_lo": 0.0, "hit_rate_hi": 0.0}


def small_step(canary: pb.EngineManifest, stable: pb.EngineManifest, policy: CanaryPolicy, *,
               descends: bool = False) -> str | None:
    """Why the canary is a small step from stable (CanaryPolicy.small_step_events), or None: it runs the same
    compiled graph (a refit of stable's, or stable's own: only weights differ, so its cost per request cannot
    differ) and was trained on at most small_step_events events beyond stable; or it descends from stable
    (`descends`: stable is its parent, or its parent's parent...) at most small_step_events behind it: a full
    round's engine after short rounds, trained on the events stable's short rounds had served (committed, gated)
    and not on those read since."""
    if policy.small_step_events < 0:
        return None
    graph_c, graph_s = canary.graph_version or canary.version, stable.graph_version or stable.version
    extra, n = canary.trained_events - stable.trained_events, policy.small_step_events
    if graph_c != graph_s:
        return None
    if 0 <= extra <= n:
        return f"small step: weights for stable's graph {graph_s}, {extra} events beyond stable"
    if descends and -n <= extra < 0:
        return (f"small step: weights for stable's graph {graph_s}, descends from stable, {-extra} events behind "
                "it (a full round after short rounds)")
    return None


def hold_behind(verdict: Verdict, canary: pb.EngineManifest, stable: pb.EngineManifest, small: str | None,
                in_canary_s: float, policy: CanaryPolicy) -> Verdict:
    """A promotion of a small step that is behind stable (fewer trained events: a full round's engine that
    stable's short rounds outran) waits until policy.behind_hold_s into the canary, so that the short round built
    on it can supersede it (CanaryControl.supersede_behind_canary) instead of serving older weights meanwhile."""
    behind = stable.trained_events - canary.trained_events
    if verdict.action != "promote" or small is None or behind <= 0 or in_canary_s >= policy.behind_hold_s:
        return verdict
    return Verdict("wait", f"{behind} events behind stable: promotion held {policy.behind_hold_s:g} s for a newer "
                           f"engine of its line ({verdict.reason})", verdict.figures)


def analyse(stats: CanaryStats, policy: CanaryPolicy, *, vouch: str | None = None,
            outcome: NonInferiority | None = None, fleet: dict[str, float] | None = None,
            small: str | None = None) -> Verdict:
    """vouch: quality_vouch() of the canary; when set, low overlap and large drift do not roll back.
    outcome: the hit-rate test when the policy runs one (policy.outcome_test): a promotion also needs its
    "pass", its "fail" rolls back. fleet: figures merged over every replica's report (fleet_stats.py), judged
    instead of this process's own. small: small_step() of the canary; when set, the decision needs only
    policy.small_step_shadow_samples shadow pairs, neither min_duration_s nor the live sample."""
    f = {**(fleet or stats.figures()), **(outcome.figures() if outcome else NO_OUTCOME)}
    n_c, err_c = f["canary_requests"], f["canary_errors"]

    def verdict(action: str, reason: str) -> Verdict:
        if action == "promote" and outcome is not None:
            if outcome.action != "pass":
                return Verdict("wait", f"{reason}; hit rate not yet shown within the margin: {outcome.reason}", f)
            reason = f"{reason}; {outcome.reason}"
        return Verdict(action, reason, f)

    if err_c >= 3 and err_c / max(n_c, 1) > policy.max_error_rate:
        return verdict("rollback", f"canary error rate {err_c / max(n_c, 1):.3f} > max_error_rate "
                                   f"{policy.max_error_rate} ({err_c:.0f} errors in {n_c:.0f} requests)")
    if outcome is not None and outcome.action == "fail":
        return verdict("rollback", outcome.reason)
    if small is None and f["elapsed_s"] < policy.min_duration_s:
        return verdict("wait", f"{f['elapsed_s']:.1f}s of min_duration_s {policy.min_duration_s}s")
    need = policy.shadow_samples if small is None else min(policy.shadow_samples, policy.small_step_shadow_samples)
    if f["shadow_samples"] < need:
        return verdict("wait", f"shadow sample {f['shadow_samples']:.0f} of {need}")
    breaches = []
    if f["topk_overlap"] < policy.min_topk_overlap:
        breaches.append(f"top-{SHADOW_K} overlap with stable {f['topk_overlap']:.3f} < "
                        f"min_topk_overlap {policy.min_topk_overlap}")
    if f["score_drift"] > policy.max_score_drift:
        breaches.append(f"score drift (KS) {f['score_drift']:.3f} > max_score_drift {policy.max_score_drift}")
    if breaches and vouch is None:
        return verdict("rollback", breaches[0])
    if f["shadow_latency_ratio"] > policy.max_p99_ratio:
        return verdict("rollback", f"paired engine CPU time ratio {f['shadow_latency_ratio']:.2f} > max_p99_ratio "
                                   f"{policy.max_p99_ratio}")
    shadow = (f"overlap {f['topk_overlap']:.3f}, drift {f['score_drift']:.3f}, "
              f"engine CPU time ratio {f['shadow_latency_ratio']:.2f} on {f['shadow_samples']:.0f} shadow samples")
    if breaches:
        shadow += f" ({'; '.join(breaches)}: accepted, {vouch})"
    n_s = f["stable_requests"]
    if small is not None:
        return verdict("promote", f"{small}; {shadow}; {err_c:.0f} errors on {n_c:.0f} canary requests")
    if n_c >= policy.min_requests and n_s >= policy.min_requests:
        if err_c / n_c > policy.max_error_rate:
            return verdict("rollback", f"canary error rate {err_c / n_c:.3f} > max_error_rate {policy.max_error_rate}")
        if f["p99_ratio"] > policy.max_p99_ratio:
            limit_ms = policy.max_p99_ratio * f["stable_p99_ms"]
            if f["canary_tail_floor_ms"] > limit_ms:
                return verdict("rollback", f"live P99 {f['canary_p99_ms']:.2f} ms vs stable {f['stable_p99_ms']:.2f} "
                                           f"ms: ratio {f['p99_ratio']:.2f} > max_p99_ratio {policy.max_p99_ratio} "
                                           f"(at least {LIVE_TAIL_MIN_REQUESTS} canary requests over {limit_ms:.2f} ms)")
            few = (f"live P99 ratio {f['p99_ratio']:.2f} rests on fewer than {LIVE_TAIL_MIN_REQUESTS} canary requests "
                   f"over {limit_ms:.2f} ms")
            if f["elapsed_s"] < policy.max_duration_s:
                return verdict("wait", f"{few}: more live sample")
            return verdict("promote", f"on the shadow comparison ({shadow}): {few} after {f['elapsed_s']:.0f}s")
        return verdict("promote", f"live P99 ratio {f['p99_ratio']:.2f} and {err_c:.0f} errors on {n_c:.0f}/{n_s:.0f} "
                                  f"canary/stable requests; {shadow}")
    if f["elapsed_s"] >= policy.max_duration_s:
        return verdict("promote", f"on the shadow comparison alone ({shadow}): live sample {n_c:.0f}/{n_s:.0f} "
                                  f"short of min_requests {policy.min_requests} after {f['elapsed_s']:.0f}s")
    return verdict("wait", f"live sample {n_c:.0f}/{n_s:.0f} of min_requests {policy.min_requests}")


def topk_overlap(a: Sequence[str], b: Sequence[str], n_items: int) -> float:
    """|a ∩ b| / k, corrected for chance: 0 for two random top-k lists of n_items, 1 for equal sets
    (a plain overlap of two random top-100s of 300 items would be 0.33)."""
    k = max(len(a), len(b))
    chance = k / n_items if n_items else 1.0
    if not k or chance >= 1:
        return 1.0
    return (len(set(a) & set(b)) / k - chance) / (1 - chance)


class ShadowScorer:
    """Runs sampled queries on both engines on its own thread until stopped: at policy.shadow_qps until
    policy.shadow_samples pairs are in, then at SHADOW_KEEP_QPS (a small step: at small_step_shadow_qps until its
    small_step_shadow_samples are in). The two engine calls of a pair run half
    a period apart. Both choices bound what the shadow takes from live requests: on 2 cores, live P99 at
    200 QPS was 3.3-3.5 ms with no canary and 4.8-5.5 ms with a canary shadowed at 20 pairs/s throughout
    (and 3.4-4.1 ms at 0.2 pairs/s), while a decision waits mostly for live canary requests anyway."""

    def __init__(self, stable: Engine, canary: Engine, stats: CanaryStats, policy: CanaryPolicy,
                 fallback_histories: Callable[[], list[list[str]]], *, small: bool = False) -> None:
        """small: the canary is a small step (small_step()): its pairs come at policy.small_step_shadow_qps."""
        self.stable, self.canary, self.stats, self.policy, self.small = stable, canary, stats, policy, small
        self.fallback_histories = fallback_histories
        self._stop = threading.Event()
        self._rng = np.random.default_rng(canary.version)
        self._thread = threading.Thread(target=self._run, name=f"shadow-{canary.version}", daemon=True)

    def start(self) -> "ShadowScorer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=10)

    def _next_query(self, pool: list[list[str]]) -> RecommendQuery:
        if self.stats.queries:
            q = self.stats.queries[int(self._rng.integers(len(self.stats.queries)))]
            return RecommendQuery(q.history, SHADOW_K, q.exclude_seen, q.user_id)
        if pool:
            return RecommendQuery(pool[int(self._rng.integers(len(pool)))], SHADOW_K, True)
        ids = self.stable.item_ids
        picks = self._rng.integers(len(ids), size=min(10, len(ids)))
        return RecommendQuery([ids[i] for i in picks], SHADOW_K, True)

    def _rate(self, pairs: int) -> float:
        p = self.policy
        if self.small and pairs < p.small_step_shadow_samples:
            return p.small_step_shadow_qps
        return p.shadow_qps if pairs < p.shadow_samples else min(SHADOW_KEEP_QPS, p.shadow_qps)

    def _timed(self, engine: Engine, q: RecommendQuery):
        # CPU time of this thread, not wall time: waiting for the GIL or a core (the server is busy
        # serving meanwhile) says nothing about the engine and made healthy canaries look 3x slower.
        t = time.thread_time()
        return engine.recommend_batch([q])[0], time.thread_time() - t

    def _run(self) -> None:
        pool = self.fallback_histories()
        n = 0
        while True:
            half_period = 0.5 / self._rate(len(self.stats.overlaps))
            if self._stop.wait(half_period):
                return
            q = self._next_query(pool)
            n += 1
            # Alternate which engine goes first: the second call of a pair runs on warmer caches,
            # which biased the paired time ratio (two engines sharing one compiled graph: 1.94 measured
            # before alternating, 1.03 after, in tests/test_e2e.py).
            order = (self.canary, self.stable) if n % 2 else (self.stable, self.canary)
            out = {}
            for i, engine in enumerate(order):
                if i and self._stop.wait(half_period):
                    return
                try:
                    out[engine is self.canary] = self._timed(engine, q)
                except Exception:  # noqa: BLE001 - a raising canary is evidence, not a crash
                    if engine is self.canary:
                        self.stats.observe(True, 0.0, error=True)
                    break
            if len(out) < 2:
                continue
            (c, c_s), (s, s_s) = out[True], out[False]
            if c.source != "model" or s.source != "model":
                continue  # popularity answers compare nothing about the models
            self.stats.add_shadow(topk_overlap(c.item_ids, s.item_ids, len(self.stable.item_ids)), c.scores,
                                  s.scores, c_s, s_s)
