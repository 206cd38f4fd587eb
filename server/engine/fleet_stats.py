"""Canary evidence across replicas. grpc-free.

Each replica serving a canary publishes a report of its own CanaryStats into the registry
(`reports/canary-<version>/<replica>.json`, rewritten about once a second); the lease holder judges the canary
on the merge of every fresh report, its own included, so the decision covers the fleet's traffic and is the same
whichever replica holds the lease. Merging is exact where it can be: request and error counts add; latencies are
counts in fixed log-spaced buckets (LATENCY_EDGES_S, ~3 % wide), so the merged P99 is the bucket where the fleet's
99th percentile falls (read as its upper edge); shadow overlaps merge as sums; the score-drift test and the paired
engine-time ratio run on the union of each replica's newest samples (REPORT_SAMPLES per arm).

Hit rates (the outcome criterion and experiments) come from each replica's own attribution store, which holds the
impressions that replica served. Each replica publishes its counts for the window being judged
(`reports/outcomes-<window start>/<replica>.json`); the holder adds every replica's newest. Counts over a window
only grow, so a report stays evidence after its replica dies (its impressions were served and joined).
"""

from __future__ import annotations

import json
import logging
import time

import numpy as np

from server.engine.canary import LATENCY_EDGES_S, LIVE_TAIL_MIN_REQUESTS, CanaryStats, ks_distance

log = logging.getLogger("livetower.engine")
REPORT_INTERVAL_S = 1.0  # how often a replica rewrites its report (and the lease holder reads them all)
REPORT_SAMPLES = 300     # newest shadow scores and paired engine times per arm in a report
FRESH_S = 10.0           # reports older than this are left out (a replica that stopped serving the canary)


def report(stats: CanaryStats, replica: str, canary_version: int) -> bytes:
    return json.dumps({"replica": replica, "canary_version": canary_version, "time_ms": int(time.time() * 1000),
                       **stats.mergeable(REPORT_SAMPLES)}).encode()


def fresh(raw_reports: list[bytes], canary_version: int, now_ms: int | None = None) -> list[dict]:
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    out = []
    for raw in raw_reports:
        try:
            r = json.loads(raw)
        except ValueError:
            continue  # a torn or foreign object: not evidence
        if r.get("canary_version") == canary_version and now_ms - r.get("time_ms", 0) <= FRESH_S * 1000:
            out.append(r)
    return out


def _p99_ms(hist: dict[int, int]) -> float:
    total = sum(hist.values())
    if not total:
        return 0.0
    seen = 0
    for i in sorted(hist):
        seen += hist[i]
        if seen >= 0.99 * total:
            return 1e3 * (LATENCY_EDGES_S[i] if i < len(LATENCY_EDGES_S) else LATENCY_EDGES_S[-1])
    return 0.0


def _nth_slowest_floor_ms(hist: dict[int, int], n: int) -> float:
    """A latency the n slowest requests all reached: the lower edge of the bucket holding the n-th slowest
    (0.0 with fewer than n requests)."""
    seen = 0
    for i in sorted(hist, reverse=True):
        seen += hist[i]
        if seen >= n:
            return 1e3 * LATENCY_EDGES_S[i - 1] if i > 0 else 0.0
    return 0.0


def merged_figures(reports: list[dict]) -> dict[str, float]:
    """The figures CanaryStats.figures() gives, over every report (same keys)."""
    def add_hist(arm: int) -> dict[int, int]:
        out: dict[int, int] = {}
        for r in reports:
            for i, n in r["latency_hist"][arm].items():
                out[int(i)] = out.get(int(i), 0) + n
        return out

    requests = [sum(r["requests"][a] for r in reports) for a in (0, 1)]
    errors = [sum(r["errors"][a] for r in reports) for a in (0, 1)]
    canary_hist = add_hist(0)
    c99, s99 = _p99_ms(canary_hist), _p99_ms(add_hist(1))
    floor = _nth_slowest_floor_ms(canary_hist, LIVE_TAIL_MIN_REQUESTS)
    n_shadow = sum(r["overlap_n"] for r in reports)
    engine = [np.concatenate([np.asarray(r["engine_s"][a], float) for r in reports]) for a in (0, 1)]
    med_c = float(np.median(engine[0])) if len(engine[0]) else 0.0
    med_s = float(np.median(engine[1])) if len(engine[1]) else 0.0
    return {
        "elapsed_s": max(r["elapsed_s"] for r in reports),
        "canary_requests": requests[0], "stable_requests": requests[1],
        "canary_errors": errors[0], "stable_errors": errors[1],
        "canary_p99_ms": c99, "stable_p99_ms": s99, "p99_ratio": c99 / s99 if s99 > 0 else 0.0,
        "canary_tail_floor_ms": floor,
        "shadow_samples": n_shadow,
        "topk_overlap": sum(r["overlap_sum"] for r in reports) / n_shadow if n_shadow else 0.0,
        "score_drift": ks_distance([x for r in reports for x in r["scores"][0]],
                                   [x for r in reports for x in r["scores"][1]]),
        "shadow_latency_ratio": med_c / med_s if med_s > 0 else 0.0,
    }


class CanaryReports:
    """One replica's side, for one canary: publish its report about once a second; when it holds the decision
    lease, read every fresh report and give their merge if another replica reported too (None: judge this
    process's own figures, as a single server does)."""

    def __init__(self, registry, replica: str) -> None:  # registry: contracts.registry.Registry (or a subclass)
        self.registry, self.replica = registry, replica
        self._at = 0.0
        self._figures: dict[str, float] | None = None

    def tick(self, canary_version: int, stats: CanaryStats, leading: bool) -> dict[str, float] | None:
        now = time.monotonic()
        if now - self._at < REPORT_INTERVAL_S:
            return self._figures
        self._at = now
        group = f"canary-{canary_version}"
        try:
            self.registry.write_report(f"{group}/{self.replica}.json", report(stats, self.replica, canary_version))
            reports = fresh(self.registry.read_reports(group), canary_version) if leading else []
        except Exception:  # noqa: BLE001 - an unreachable registry: judge on what this replica saw
            log.warning("canary %d: replica reports unavailable; judging this replica's own figures", canary_version,
                        exc_info=True)
            reports = []
        self._figures = merged_figures(reports) if any(r["replica"] != self.replica for r in reports) else None
        return self._figures


Counts = dict[tuple[str, int], tuple[int, int]]  # (arm, engine version) -> (impressions, hit impressions)


def outcome_report(replica: str, counts: Counts) -> bytes:
    return json.dumps({"replica": replica, "time_ms": int(time.time() * 1000),
                       "counts": [[arm, v, n, hits] for (arm, v), (n, hits) in sorted(counts.items())]}).encode()


def merged_outcomes(raw_reports: list[bytes]) -> Counts:
    total: Counts = {}
    for raw in raw_reports:
        try:
            rows = json.loads(raw)["counts"]
        except (ValueError, KeyError, TypeError):
            continue  # a torn or foreign object: not evidence
        for arm, v, n, hits in rows:
            was = total.get((arm, v), (0, 0))
            total[(arm, v)] = (was[0] + int(n), was[1] + int(hits))
    return total


def fleet_outcomes(registry, replica: str, window_start_ms: int, own: Counts, leading: bool) -> Counts:
    """Publish this replica's counts for the window; the holder gets every replica's added (else its own)."""
    group = f"outcomes-{window_start_ms}"
    try:
        registry.write_report(f"{group}/{replica}.json", outcome_report(replica, own))
        return merged_outcomes(registry.read_reports(group)) if leading else own
    except Exception:  # noqa: BLE001 - an unreachable registry: judge on what this replica saw
        log.warning("outcome reports unavailable; judging this replica's own hit rates", exc_info=True)
        return own
