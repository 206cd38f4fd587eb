"""Elastic, distributed training rounds: the worker-count policy, the DDP worker, the elastic launcher."""

from trainer.elastic.launcher import (AttemptRecord, RoundFailed, RoundOutput, RoundStats, run_distributed_round,
                                      train_windows_elastic)
from trainer.elastic.metrics import ElasticMetrics
from trainer.elastic.policy import WorkerChoice, available_devices, choose_workers, record_choice, resolve_device
from trainer.elastic.worker import FaultInjection

__all__ = ["AttemptRecord", "ElasticMetrics", "FaultInjection", "RoundFailed", "RoundOutput", "RoundStats", "WorkerChoice",
           "available_devices", "choose_workers", "record_choice", "resolve_device", "run_distributed_round",
           "train_windows_elastic"]
