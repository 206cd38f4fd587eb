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

        self.table_rows = Gauge("livetower_trainer_item_table_rows", "Rows of the item embedding table", registry=r)
        self.vocab_items = Gauge("livetower_trainer_vocab_items", "Item ids with a table row", registry=r)
        self.items_admitted = Counter("livetower_trainer_items_admitted_total",
                                      "Item ids given a table row (after item_min_count events)", registry=r)
        self.items_evicted = Counter("livetower_trainer_items_evicted_total",
                                     "Item ids whose rows were freed (unseen for item_ttl_s)", registry=r)
        self.unadmitted_events = Counter("livetower_trainer_unadmitted_events_total",
                                         "Events consumed for items without a table row (not trained)", registry=r)
        self.users_kept = Gauge("livetower_trainer_users_kept", "Users whose recent rows the trainer keeps",
                                registry=r)
        self.users_dropped = Counter("livetower_trainer_users_dropped_total",
                                     "Users dropped from the kept sequences (least recently active, max_users)",
                                     registry=r)
        self.retention_deleted = Counter("livetower_trainer_retention_deleted_total",
                                         "Rows deleted by event-log retention", ["table"], registry=r)

    def on_items(self, r, *, table_rows: int, vocab: int) -> None:
        """r: a trainer/items.py ItemRound."""
        self.table_rows.set(table_rows)
        self.vocab_items.set(vocab)
        self.items_admitted.inc(r.admitted)
        self.items_evicted.inc(r.evicted)
        self.unadmitted_events.inc(r.unadmitted_events)

    def on_users(self, kept: int, dropped: int) -> None:
        self.users_kept.set(kept)
        self.users_dropped.inc(dropped)

    def on_retention(self, events: int, dead_letters: int) -> None:
        self.retention_deleted.labels("events").inc(events)
        self.retention_deleted.labels("dead_letters").inc(dead_letters)

    def on_lag(self, lag: Mapping[str, int]) -> None:
        for partition, n in lag.items():
            self.lag.labels(partition).set(n)
