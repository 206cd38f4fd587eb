"""How many workers a round gets: a pure function of the backlog, the freshness target and the devices.

W = the larger of ceil(backlog / events_per_worker) and the workers the measured per-worker rate needs
to train the backlog within freshness_target_s, then clamped to [min_workers, max_workers] and to the
devices available. The choice, its reason and the arithmetic are returned (and logged / exported by
`record_choice`), so an operator can see why a round ran on W workers.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

import torch
from trainer.config import ElasticConfig
from trainer.elastic.metrics import ElasticMetrics

log = logging.getLogger("livetower.trainer.elastic")

REASONS = ("backlog", "freshness", "min_workers", "max_workers", "devices")


@dataclass(frozen=True, slots=True)
class WorkerChoice:
    workers: int          # W for the round
    reason: str           # one of REASONS: what decided W
    detail: str           # the arithmetic, for the log
    backlog_events: int
    devices: int


def resolve_device(device: str) -> str:
    """ElasticConfig.device -> "cpu" or "cuda" ("auto": cuda when a GPU is visible)."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("ElasticConfig.device='cuda' but torch sees no GPU; use device='cpu' or 'auto'")
    return device


def available_devices(cfg: ElasticConfig) -> int:
    """GPUs for cuda; CPU cores this process may use // threads_per_worker for cpu (at least 1)."""
    if resolve_device(cfg.device) == "cuda":
        return torch.cuda.device_count()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // cfg.threads_per_worker)


def choose_workers(backlog_events: int, cfg: ElasticConfig, *, devices: int,
                   events_per_s_per_worker: float | None = None) -> WorkerChoice:
    """W in [min_workers, max_workers] (and <= devices) for a round over `backlog_events`.

    events_per_s_per_worker: the measured round throughput of one worker (RoundStats.events_per_s_per_worker
    of an earlier round); None before any was measured (then only the backlog counts)."""
    if backlog_events < 0 or devices < 0:
        raise ValueError(f"backlog_events ({backlog_events}) and devices ({devices}) must be >= 0")
    by_backlog = max(1, math.ceil(backlog_events / cfg.events_per_worker))
    parts = [f"backlog {backlog_events} / {cfg.events_per_worker} per worker -> {by_backlog}"]
    by_fresh = 1
    if events_per_s_per_worker:
        by_fresh = max(1, math.ceil(backlog_events / (events_per_s_per_worker * cfg.freshness_target_s)))
        parts.append(f"freshness: {backlog_events} at {events_per_s_per_worker:.0f} ev/s/worker within "
                     f"{cfg.freshness_target_s:g} s -> {by_fresh}")
    want, reason = (by_fresh, "freshness") if by_fresh > by_backlog else (by_backlog, "backlog")
    w = want
    if w < cfg.min_workers:
        w, reason = cfg.min_workers, "min_workers"
        parts.append(f"raised to min_workers={w}")
    if w > cfg.max_workers:
        w, reason = cfg.max_workers, "max_workers"
        parts.append(f"capped at max_workers={w}")
    if w > devices:
        w, reason = max(1, devices), "devices"
        below = " (below min_workers: running on what there is)" if w < cfg.min_workers else ""
        parts.append(f"only {devices} device(s) -> {w}{below}")
    return WorkerChoice(workers=w, reason=reason, detail="; ".join(parts) + f" => W={w}",
                        backlog_events=backlog_events, devices=devices)


def record_choice(choice: WorkerChoice, metrics: ElasticMetrics | None = None) -> None:
    """Log the choice and export it (when given the metrics)."""
    if metrics is not None:
        metrics.on_choice(choice)
    log.info("round workers: W=%d (%s): %s", choice.workers, choice.reason, choice.detail)
