"""Prometheus metrics of the server, on a registry owned by the server instance (no globals)."""

from __future__ import annotations

import time
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 1.0)
# Request-latency series are labelled by engine version. Those of a version the server no longer holds are
# dropped at the first load of a version more than this many above it: short rounds publish an engine every few
# seconds, and kept series would grow without bound, each scrape rendering all of them while it holds the GIL.
RETIRED_VERSIONS_KEPT = 8


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.latency = Histogram("livetower_request_seconds", "Server-side handling time by method and engine version",
                                 ["method", "engine_version"], buckets=LATENCY_BUCKETS, registry=r)
        self.responses = Counter("livetower_responses_total", "Responses by method and gRPC status code",
                                 ["method", "code"], registry=r)
        self.serving_version = Gauge("livetower_serving_engine_version", "Engine version serving traffic", registry=r)
        self.canary_version = Gauge("livetower_canary_engine_version", "Engine version in canary (0: none)", registry=r)
        self.canary_fraction = Gauge("livetower_canary_fraction", "Share of users the canary serves", registry=r)
        self.engine_events = Counter("livetower_engine_events_total",
                                     "Engine loads, swaps, refusals, canaries, promotions and rollbacks",
                                     ["kind"], registry=r)
        self.engine_load_seconds = Histogram("livetower_engine_load_seconds", "Verify+load+parity+warm-up time",
                                             buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30), registry=r)
        self.events_accepted = Counter("livetower_events_accepted_total", "Events appended to the log", registry=r)
        self.freshness = Gauge("livetower_serving_freshness_seconds",
                               "Now minus the event-time watermark the stable engine was trained through "
                               "(NaN while no engine serves)", registry=r)
        self.feed_records = Counter("livetower_history_feed_records_total",
                                    "Kafka records read by the history feed", ["valid"], registry=r)
        self.feed_delay = Histogram("livetower_history_feed_delay_seconds",
                                    "Record timestamp (produce time) to history update",
                                    buckets=(0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5),
                                    registry=r)
        self.events_rejected = Counter("livetower_events_rejected_total", "Invalid events (LogEvents), by field",
                                       ["field"], registry=r)
        self.events_duplicate = Counter("livetower_events_duplicate_total",
                                        "Valid events not stored: their event_id was already in the log", registry=r)
        self.dead_letters_dropped = Counter("livetower_dead_letters_dropped_total",
                                            "Invalid events beyond the per-request dead-letter cap (not stored)",
                                            registry=r)
        self.history_bytes = Gauge("livetower_history_bytes", "Estimated bytes held by per-user recent histories",
                                   registry=r)
        self.impressions_written = Counter("livetower_impressions_written_total",
                                           "Recommend responses stored in the attribution store", registry=r)
        self.impressions_dropped = Counter("livetower_impressions_dropped_total",
                                           "Recommend responses not recorded for attribution (writer queue full, "
                                           "write failed or shutting down)", registry=r)
        self.history_users = Gauge("livetower_history_users", "Users with a recent history held", registry=r)
        self._held: Callable[[], set[int]] = set  # watch_versions
        self._labelled: set[int] = set()  # versions loaded whose latency series are kept

    def watch_versions(self, held: Callable[[], set[int]]) -> None:
        """held: the engine versions the server holds for serving now; the latency series of any other version
        are dropped at the first load of a version more than RETIRED_VERSIONS_KEPT above it."""
        self._held = held

    def _forget_retired(self, newest: int) -> None:
        keep = self._held() | set(range(newest - RETIRED_VERSIONS_KEPT, newest + 1))
        for v in self._labelled - keep:
            self.latency.remove_by_labels({"engine_version": str(v)})
        self._labelled &= keep

    def watch_stages(self, clock) -> None:
        """Export a StageClock (server/engine/stages.py): compute seconds per stage, batches and queries."""
        self.registry.register(_StageCollector(clock))

    def watch_batcher(self, batcher) -> None:
        """Export a MicroBatcher's (server/batching.py) shed requests by reason and its requests expired in queue."""
        self.registry.register(_BatcherCollector(batcher))

    def watch_outcomes(self, read: Callable[[], dict]) -> None:
        """Export the attribution outcomes (contracts/attribution.py read_outcomes: {(arm, version): Outcome}),
        read at scrape time on the metrics server's thread: one small table scan per scrape. Only the versions
        whose latency series are kept (held, or retired recently): the store keeps one row per version ever
        served."""
        self.registry.register(_OutcomeCollector(read, lambda: self._held() | self._labelled))

    def watch_freshness(self, current_engine: Callable[[], object | None]) -> None:
        def freshness() -> float:
            engine = current_engine()
            watermark = engine.manifest.watermark_ms if engine is not None else 0
            return time.time() - watermark / 1000 if watermark else float("nan")

        self.freshness.set_function(freshness)

    def watch_history(self, history) -> None:
        """Export a RecentHistory's size (server/events/history.py)."""
        self.history_bytes.set_function(lambda: history.bytes)
        self.history_users.set_function(lambda: len(history))

    def on_feed_record(self, delay_s: float, valid: bool) -> None:
        self.feed_records.labels("true" if valid else "false").inc()
        if valid:
            self.feed_delay.observe(delay_s)

    def on_engine_event(self, kind: str, version: int, value: float) -> None:
        """value: seconds for "load", the fraction for "canary"."""
        self.engine_events.labels(kind).inc()
        if kind == "load":
            self.engine_load_seconds.observe(value)
            self._labelled.add(version)  # every version a request can be labelled with was loaded first
            self._forget_retired(version)
        elif kind == "swap":
            self.serving_version.set(version)
        elif kind == "canary":
            self.canary_version.set(version)
            self.canary_fraction.set(value)
        elif kind in ("promote", "rollback", "canary_end"):
            self.canary_version.set(0)
            self.canary_fraction.set(0)


class _StageCollector:
    def __init__(self, clock) -> None:
        self.clock = clock

    def collect(self):
        seconds = CounterMetricFamily("livetower_engine_stage_seconds",
                                      "Compute-thread seconds per stage of Recommend batches", labels=["stage"])
        for stage, value in self.clock.seconds.items():
            seconds.add_metric([stage], value)
        yield seconds
        yield CounterMetricFamily("livetower_engine_batches", "Recommend batches computed", value=self.clock.batches)
        yield CounterMetricFamily("livetower_engine_batched_queries", "Recommend queries computed in batches",
                                  value=self.clock.queries)


class _BatcherCollector:
    """Read at scrape time: the counts are plain ints the event loop increments (no lock on the request path)."""

    def __init__(self, batcher) -> None:
        self.batcher = batcher

    def collect(self):
        shed = CounterMetricFamily("livetower_shed",
                                   "Requests shed at admission (RESOURCE_EXHAUSTED), by the bound that shed them: "
                                   "queue_full (max_queue), loop_lag (max_loop_lag_ms), queue_delay "
                                   "(max_queue_delay_ms), deadline (the request's own), shutdown", labels=["reason"])
        for reason, n in list(self.batcher.shed_by_reason.items()):
            shed.add_metric([reason], n)
        yield shed
        yield CounterMetricFamily("livetower_expired_in_queue", "Requests whose deadline passed while queued "
                                  "(DEADLINE_EXCEEDED, not computed)", value=self.batcher.expired)
        yield CounterMetricFamily("livetower_inline_queries", "Recommend queries computed on the event loop "
                                  "(inline_below_ms), not on the compute thread", value=self.batcher.inline)
        yield GaugeMetricFamily("livetower_event_loop_busy", "The event loop's own share of a core in the last "
                                "window (inline compute not counted)", value=self.batcher.loop_busy)
        yield GaugeMetricFamily("livetower_inline_demand", "The share of a core the last window's Recommends "
                                "would add computed on the loop; inline runs while this plus "
                                "livetower_event_loop_busy is under inline_max_loop_busy",
                                value=self.batcher.inline_demand)


class _OutcomeCollector:
    """Attribution counts per (arm, engine_version), as gauges: the joiner's totals since the store began."""
    FIELDS = (("impressions", "Recommend responses recorded as impressions"),
              ("hit_impressions", "Impressions with at least one attributed event on a shown item"),
              ("hit_events", "Attributed events on a shown item"),
              ("joined_events", "Events joined to an impression within the attribution window"))

    def __init__(self, read: Callable[[], dict], versions: Callable[[], set[int]]) -> None:
        self.read, self.versions = read, versions

    def collect(self):
        try:
            outcomes = self.read()
        except Exception:  # noqa: BLE001 - a locked or missing store must not fail the whole scrape
            outcomes = {}
        kept = self.versions()
        outcomes = {key: o for key, o in outcomes.items() if key[1] in kept}
        for name, doc in self.FIELDS:
            family = GaugeMetricFamily(f"livetower_outcome_{name}", doc, labels=["arm", "engine_version"])
            for (arm, version), outcome in outcomes.items():
                family.add_metric([arm, str(version)], getattr(outcome, name))
            yield family
