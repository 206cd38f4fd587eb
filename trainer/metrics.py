"""Prometheus metrics of the trainer, on a registry owned by the trainer instance (no globals)."""

from __future__ import annotations

from typing import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge


class TrainerMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.lag = Gauge("livetower_trainer_consumer_lag_events", "Events not yet trained, per partition",
                         ["partition"], registry=r)
        self.events_trained = Counter("livetower_trainer_events_trained_total", "Events trained", registry=r)
        self.dead_letters = Counter("livetower_trainer_dead_letters_total",
                                    "Malformed records sent to the dead-letter topic/table", registry=r)
        self.rounds = Counter("livetower_trainer_rounds_total", "Training rounds by gate outcome", ["gate"],
                              registry=r)
        self.watermark = Gauge("livetower_trainer_watermark_seconds",
                               "Newest event time trained through (Unix seconds)", registry=r)
        self.published_version = Gauge("livetower_trainer_published_version", "Last engine version published",
                                       registry=r)
        self.round_seconds = Gauge("livetower_trainer_last_round_seconds", "Duration of the last round",
                                   registry=r)

    def on_lag(self, lag: Mapping[str, int]) -> None:
        for partition, n in lag.items():
            self.lag.labels(partition).set(n)
