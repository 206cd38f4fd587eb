"""Run one training round on W workers through torch.distributed.elastic, retrying with fewer on failure.

A launch = `elastic_launch` with a c10d rendezvous on a free loopback port, W local workers
(`worker.worker_main`: DDP, gloo on CPU / NCCL on GPU). The round's input is the model and optimizer
state it was given (= the trainer's last checkpoint), written to the round dir with the windows;
rank 0 adds an atomic checkpoint after each epoch. When a worker dies (ChildFailedError: killed,
OOM, preempted), the elastic agent first restarts the same W workers `agent_max_restarts` times (0
by default: a lost local worker is taken as gone), then this launcher re-runs the round with W - 1
workers from the newest epoch checkpoint, up to `max_round_retries` times. So a round either
completes with every window trained for every epoch, or raises RoundFailed leaving the caller's
state untouched (its events stay unconsumed and the next round trains them): no event is lost.

Multi-node: the same worker code runs under `torchrun --rdzv-backend c10d` (deploy/k8s/); the round
dir must then be on storage every node sees.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import shutil
import signal
import socket
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from trainer.config import TrainConfig
from trainer.elastic.files import load_tensors, save_spec, save_tensors
from trainer.elastic.metrics import ElasticMetrics
from trainer.elastic.policy import resolve_device
from trainer.elastic.worker import (DATA_FILE, KILLED_FILE, SPEC_FILE, FaultInjection, RoundSpec, checkpoint_path,
                                    latest_checkpoint, worker_main)
from trainer.model import TwoTower
from trainer.training import WindowLoss, make_grad_scaler, round_seed, train_epochs, window_loss

log = logging.getLogger("livetower.trainer.elastic")


# torch._dynamo is what AdamW's first construction imports (~1.7 s); the worker module brings torch and the model.
FORKSERVER_PRELOAD = ["torch", "torch._dynamo", "trainer.elastic.worker"]


class RoundFailed(RuntimeError):
    """The round failed on every attempt; the caller's model and optimizer are unchanged."""


@dataclass(frozen=True, slots=True)
class AttemptRecord:
    attempt: int
    workers: int
    start_epoch: int
    outcome: str          # "ok" | "failed"
    seconds: float
    error: str = ""


@dataclass(kw_only=True, slots=True)
class RoundStats:
    losses: list[float]                # mean loss per epoch (all epochs of the round, across attempts)
    workers: int                       # workers of the attempt that completed the round
    in_process: bool                   # trained in the calling process (W = 1, no launch)
    epochs: int
    windows: int
    targets_per_epoch: int             # new events the round trains (masked targets)
    startup_seconds: float             # launch -> first step of the completing attempt
    train_seconds: float               # first -> last step of the completing attempt
    wall_seconds: float                # the whole call
    events_per_s_per_worker: float     # targets trained per second of train_seconds per worker (epochs of that attempt)
    window_epochs_N: np.ndarray        # epochs each window was trained in (== epochs everywhere on success)
    attempts: list[AttemptRecord] = field(default_factory=list)
    startup_phases: dict[str, float] = field(default_factory=dict)  # where startup_seconds went (slowest rank)
    round_dir: str = ""                          # launched rounds: data, checkpoints, logs (removed unless keep_dir)
    failure_detect_seconds: float | None = None  # killed worker -> the launcher sees the failure (fault hook only)
    recovery_seconds: float | None = None        # failure (kill time when known) -> first step of the retry


@dataclass(slots=True)
class RoundOutput:
    model_state: dict
    optimizer_state: dict
    scaler_state: dict | None      # fp16 GradScaler state after the round (None otherwise)
    stats: RoundStats


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _kept_signal_handlers():
    """The elastic agent installs SIGTERM/SIGINT/... handlers in this process and never restores them."""
    sigs = [signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT]
    main = threading.current_thread() is threading.main_thread()
    saved = {s: signal.getsignal(s) for s in sigs} if main else {}
    try:
        yield
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


def _describe(err: Exception) -> str:
    failures = getattr(err, "failures", None) or {}
    parts = []
    for rank, f in sorted(failures.items()):
        sig = f.signal_name() if f.exitcode is not None and f.exitcode < 0 else ""
        parts.append(f"rank {rank} exit {f.exitcode}" + (f" ({sig})" if sig else ""))
    return ", ".join(parts) or f"{type(err).__name__}: {err}"


def _launch(spec: RoundSpec, workers: int, log_dir: Path) -> dict:
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    ec = spec.cfg.elastic
    if ec.start_method == "forkserver":  # the server imports these once; every later worker forks warm from it
        multiprocessing.get_context("forkserver").set_forkserver_preload(FORKSERVER_PRELOAD)
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=workers, run_id=f"livetower-round-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{free_port()}",
        rdzv_configs={"timeout": int(ec.rendezvous_timeout_s)}, max_restarts=ec.agent_max_restarts,
        monitor_interval=ec.monitor_interval_s, start_method=ec.start_method,
        logs_specs=DefaultLogsSpecs(log_dir=str(log_dir)))
    with _kept_signal_handlers():
        return elastic_launch(config, worker_main)(spec)


def run_distributed_round(model_state: dict, optimizer_state: dict, *, model_config: dict, inputs_WT: np.ndarray,
                          targets_WT: np.ndarray, mask_WT: np.ndarray, item_prob_R: torch.Tensor, n_items: int,
                          cfg: TrainConfig, epochs: int, seed: int, workers: int,
                          scaler_state: dict | None = None, progress: Callable[[str], None] | None = None,
                          fault: FaultInjection | None = None, record_grads_step: int | None = None,
                          keep_dir: bool = False, metrics: ElasticMetrics | None = None) -> RoundOutput:
    """Train `epochs` over the windows on `workers` launched processes; returns the new states and the stats.

    fault / record_grads_step are test hooks (kill a rank at a step; save the all-reduced gradients of a step
    to <round dir>/grads.pt, which keep_dir=True keeps)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    say = progress or (lambda m: log.info("%s", m))
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if inputs_WT.shape[0] == 0:
        raise ValueError("no windows to train; skip the round's training step instead")
    ec = cfg.elastic
    device = resolve_device(ec.device)
    t0 = time.time()
    parent = Path(ec.work_dir) if ec.work_dir else Path(tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    round_dir = Path(tempfile.mkdtemp(prefix="livetower-round-", dir=parent))
    save_tensors(round_dir / DATA_FILE, {"inputs_WT": inputs_WT, "targets_WT": targets_WT, "mask_WT": mask_WT,
                                         "item_prob_R": item_prob_R.detach().cpu(), "n_items": n_items})
    state_path = round_dir / "state_input.pt"
    save_tensors(state_path, {"epoch": 0, "model": model_state, "optimizer": optimizer_state, "scaler": scaler_state})
    attempts: list[AttemptRecord] = []
    w, start_epoch, t_failed, t_killed = workers, 0, None, None
    try:
        for attempt in range(ec.max_round_retries + 1):
            spec = RoundSpec(out_dir=str(round_dir), state_path=str(state_path), cfg=cfg, model_config=model_config,
                             epochs=epochs, start_epoch=start_epoch, seed=seed, attempt=attempt, device=device,
                             fault=fault, record_grads_step=record_grads_step)
            save_spec(round_dir / SPEC_FILE, spec)
            say(f"round attempt {attempt + 1}: launching {w} {device} worker(s) from epoch {start_epoch}/{epochs} "
                f"({inputs_WT.shape[0]} windows, {cfg.precision})")
            t_launch = time.time()
            try:
                results = _launch(spec, w, round_dir / f"logs-{attempt}")
            except ChildFailedError as e:
                t_failed = time.time()
                killed = round_dir / KILLED_FILE
                t_killed = float(killed.read_text()) if killed.exists() else None
                err = _describe(e)
                attempts.append(AttemptRecord(attempt, w, start_epoch, "failed", t_failed - t_launch, err))
                if metrics is not None:
                    metrics.attempts.labels(outcome="failed").inc()
                if (done := latest_checkpoint(round_dir)) is not None:
                    state_path, start_epoch = done
                if attempt == ec.max_round_retries or w == 1:
                    raise RoundFailed(
                        f"training round failed on {attempt + 1} attempt(s), last with {w} worker(s): {err}. The "
                        f"trainer's state is unchanged and the round's events will be trained by the next round; "
                        f"worker logs are in {round_dir}") from e
                w -= 1
                below = f" (below min_workers={ec.min_workers})" if w < ec.min_workers else ""
                say(f"round attempt {attempt + 1} failed ({err}); retrying with {w} worker(s){below} from epoch "
                    f"{start_epoch}/{epochs}")
                continue
            t_done = time.time()
            attempts.append(AttemptRecord(attempt, w, start_epoch, "ok", t_done - t_launch))
            break
        final = load_tensors(checkpoint_path(round_dir, epochs))
        t_first = max(r["t_first_step"] for r in results.values())
        t_end = max(r["t_end"] for r in results.values())
        train_s = max(t_end - min(r["t_first_step"] for r in results.values()), 1e-9)
        targets = int(mask_WT.sum())
        stats = RoundStats(
            losses=list(final["losses"]), workers=w, in_process=False, epochs=epochs, windows=int(inputs_WT.shape[0]),
            targets_per_epoch=targets, startup_seconds=t_first - t_launch, train_seconds=train_s,
            wall_seconds=time.time() - t0, events_per_s_per_worker=targets * (epochs - start_epoch) / train_s / w,
            window_epochs_N=np.asarray(final["window_epochs_N"]), attempts=attempts,
            failure_detect_seconds=(t_failed - t_killed) if t_killed and t_failed else None,
            recovery_seconds=(t_first - (t_killed or t_failed)) if t_failed else None, round_dir=str(round_dir))
        rs = results.values()
        stats.startup_phases = {"process_start": max(r["t_enter"] for r in rs) - t_launch,
                                "process_group": max(r["t_group"] - r["t_enter"] for r in rs),
                                "load_state": max(r["t_first_step"] - r["t_group"] for r in rs),
                                "exit": t_done - max(r["t_exit"] for r in rs)}
        if metrics is not None:
            metrics.on_round(stats)
        say(f"round done on {w} worker(s): loss {' -> '.join(f'{x:.4f}' for x in stats.losses)}, "
            f"{stats.events_per_s_per_worker:.0f} events/s/worker, startup {stats.startup_seconds:.1f} s"
            + (f", recovered in {stats.recovery_seconds:.1f} s" if stats.recovery_seconds is not None else ""))
        return RoundOutput(final["model"], final["optimizer"], final.get("scaler"), stats)
    finally:
        if not keep_dir and (round_dir / DATA_FILE).exists() and attempts and attempts[-1].outcome == "ok":
            shutil.rmtree(round_dir, ignore_errors=True)


def train_windows_elastic(model: TwoTower, opt: torch.optim.Optimizer, inputs_WT: np.ndarray,
                          targets_WT: np.ndarray, mask_WT: np.ndarray, *, item_prob_R: torch.Tensor, n_items: int,
                          cfg: TrainConfig, epochs: int, generator: torch.Generator, workers: int,
                          progress: Callable[[str], None] | None = None, scaler: torch.amp.GradScaler | None = None,
                          metrics: ElasticMetrics | None = None, fault: FaultInjection | None = None,
                          after_step: Callable[[int], None] | None = None,
                          users_W: np.ndarray | None = None) -> RoundStats:
    """train_windows on `workers` workers: updates model, opt (and the fp16 scaler) in place, only when the round
    completes; on RoundFailed they are unchanged.

    W = 1 with cfg.elastic.in_process_single_worker trains here, with the workers' plan (world = 1), no launch;
    after_step(g) then runs after each step (the trainer's short rounds between a full round's steps; not called
    for launched workers). users_W: each window's user row (a model with user features: in-process only). fault is
    a test hook (see FaultInjection)."""
    seed = round_seed(generator)
    if workers == 1 and cfg.elastic.in_process_single_worker and fault is None:
        t0 = time.time()
        if scaler is None:
            scaler = make_grad_scaler(cfg.precision, next(model.parameters()).device.type, cfg.fp16_init_scale)
        res = train_epochs(model, opt, window_loss(WindowLoss(model), cfg, item_prob_R, n_items), inputs_WT,
                           targets_WT, mask_WT, cfg=cfg, epochs=epochs, seed=seed, scaler=scaler, progress=progress,
                           after_step=after_step, users_W=users_W)
        train_s = max(res.t_end - res.t_first_step, 1e-9)
        targets = int(mask_WT.sum())
        stats = RoundStats(losses=res.losses, workers=1, in_process=True, epochs=epochs,
                           windows=int(inputs_WT.shape[0]), targets_per_epoch=targets,
                           startup_seconds=res.t_first_step - t0, train_seconds=train_s, wall_seconds=time.time() - t0,
                           events_per_s_per_worker=targets * epochs / train_s, window_epochs_N=res.window_epochs_N)
        if metrics is not None:
            metrics.on_round(stats)
        return stats
    if users_W is not None:
        raise ValueError("user features train in the trainer process only (TrainConfig.user_features needs "
                         "elastic.max_workers 1 on the CPU)")
    out = run_distributed_round(model.state_dict(), opt.state_dict(), model_config=model.cfg.to_dict(),
                                inputs_WT=inputs_WT, targets_WT=targets_WT, mask_WT=mask_WT, item_prob_R=item_prob_R,
                                n_items=n_items, cfg=cfg, epochs=epochs, seed=seed, workers=workers,
                                scaler_state=scaler.state_dict() if scaler is not None else None,
                                progress=progress, fault=fault, metrics=metrics)
    model.load_state_dict(out.model_state)
    opt.load_state_dict(out.optimizer_state)
    if scaler is not None and out.scaler_state:
        scaler.load_state_dict(out.scaler_state)
    model.eval()
    return out.stats
