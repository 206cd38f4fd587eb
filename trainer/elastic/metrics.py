"""Prometheus metrics of elastic rounds, on a registry the caller owns (the trainer's: trainer/metrics.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge

if TYPE_CHECKING:
    from trainer.elastic.launcher import RoundStats
    from trainer.elastic.policy import WorkerChoice


class ElasticMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.workers = Gauge("livetower_trainer_elastic_workers", "Workers chosen for the latest round", registry=r)
        self.choices = Counter("livetower_trainer_elastic_choices_total", "Worker-count decisions by what set W",
                               ["reason"], registry=r)
        self.backlog = Gauge("livetower_trainer_elastic_backlog_events",
                             "Backlog (consumer lag) the latest worker-count choice was made on", registry=r)
        self.devices = Gauge("livetower_trainer_elastic_devices",
                             "Devices available to a round (GPUs, or CPU cores // threads_per_worker)", registry=r)
        self.attempts = Counter("livetower_trainer_elastic_attempts_total", "Round launch attempts by outcome",
                                ["outcome"], registry=r)
        self.startup = Gauge("livetower_trainer_elastic_startup_seconds",
                             "Latest round: call -> first training step (process start, rendezvous, state load)",
                             registry=r)
        self.recovery = Gauge("livetower_trainer_elastic_recovery_seconds",
                              "Latest recovered round: worker failure -> first training step of the retry", registry=r)
        self.rate = Gauge("livetower_trainer_elastic_events_per_second_per_worker",
                          "Latest round: events trained (all epochs) per second of training, per worker", registry=r)

    def on_choice(self, choice: WorkerChoice) -> None:
        self.workers.set(choice.workers)
        self.choices.labels(reason=choice.reason).inc()
        self.backlog.set(choice.backlog_events)
        self.devices.set(choice.devices)

    def on_round(self, stats: RoundStats) -> None:
        if stats.attempts:  # launched (failed attempts are counted as they fail)
            self.attempts.labels(outcome="ok").inc()
        self.startup.set(stats.startup_seconds)
        self.rate.set(stats.events_per_s_per_worker)
        if stats.recovery_seconds is not None:
            self.recovery.set(stats.recovery_seconds)
