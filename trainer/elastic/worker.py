"""One rank of a distributed training round: DDP over a deterministic shard of every global batch.

Every rank holds the round's windows and walks the same plan: epoch e shuffles the windows with a
permutation seeded by (seed, e), cuts it into global batches of cfg.batch_size, and rank r trains
batch[r::W]. So the split depends only on (seed, epoch, W), the global batches do not depend on W
at all, and a retry with fewer workers trains exactly the windows of the epochs it has left.

Each rank's loss is weighted by W * M_r / M (M_r its targets, M the global batch's, known to every
rank from the masks), so DDP's gradient average is the gradient of the mean loss over all the
batch's targets; the MoE expert loads are summed over ranks before the bias update, so every
replica keeps the same router bias. Rank 0 writes an atomic checkpoint after every epoch; the
launcher (trainer/elastic/launcher.py) restarts a failed round from the newest one.
"""

from __future__ import annotations

import atexit
import faulthandler
import io
import os
import sys
import signal
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from contracts.atomic import write_atomic
from trainer import ema
from trainer.config import TrainConfig
from trainer.model import ModelConfig, TwoTower
from trainer.training import WindowLoss, make_grad_scaler, make_optimizer, train_step

# Objects that hold the gloo process group are never freed in a worker. ~ProcessGroupGloo runs with the GIL held
# and waits for the PG's work mutex, which a gloo thread can hold while it drops the last reference of a Python
# tensor of a finished collective (needing the GIL): a deadlock we hit on a loaded 2-core machine (1 round in ~10).
# fork/forkserver workers end with os._exit anyway; spawn/torchrun workers do too after a success (atexit below).
_KEEP_UNTIL_EXIT: list = []


def _exit_without_teardown() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


DATA_FILE = "round_data.pt"
SPEC_FILE = "spec.pt"           # the latest attempt's RoundSpec (what `torchrun -m trainer.elastic` reads)
KILLED_FILE = "killed_at"      # the fault hook writes the kill time here (recovery timing)
GRADS_FILE = "grads.pt"         # the gradient hook's output


def checkpoint_path(out_dir: Path, epoch: int) -> Path:
    return Path(out_dir) / f"state_epoch{epoch:03d}.pt"


def latest_checkpoint(out_dir: Path) -> tuple[Path, int] | None:
    """(path, epochs done) of the newest epoch checkpoint in a round dir, or None."""
    done = sorted(Path(out_dir).glob("state_epoch*.pt"))
    return (done[-1], int(done[-1].stem.removeprefix("state_epoch"))) if done else None


@dataclass(kw_only=True, frozen=True, slots=True)
class FaultInjection:
    """Test hook: rank `rank` SIGKILLs itself just before global step `at_step` of launch attempt `attempt`."""
    rank: int
    at_step: int
    attempt: int = 0


@dataclass(kw_only=True, frozen=True, slots=True)
class RoundSpec:
    """What every rank of one launch attempt gets (pickled to the workers; the bulk lives in files)."""
    out_dir: str                   # round dir: DATA_FILE, epoch checkpoints, hook outputs
    state_path: str                # model/optimizer state to start from (round input or an epoch checkpoint)
    cfg: TrainConfig
    model_config: dict             # ModelConfig.to_dict()
    epochs: int                    # epochs of the whole round
    start_epoch: int               # first epoch to train (> 0 when resuming from an epoch checkpoint)
    seed: int                      # round seed: shuffles and negatives
    attempt: int                   # launch attempt (0 = first)
    device: str                    # "cpu" (gloo) or "cuda" (NCCL, GPU = local rank)
    fault: FaultInjection | None = None
    record_grads_step: int | None = None  # test hook: rank 0 saves the all-reduced gradients of this global step


# ---- the plan every rank computes identically ----

def epoch_order(n_windows: int, seed: int, epoch: int) -> np.ndarray:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n_windows, generator=g).numpy()


def global_batches(order_N: np.ndarray, batch_size: int) -> list[np.ndarray]:
    return [order_N[s:s + batch_size] for s in range(0, len(order_N), batch_size)]


def rank_generator(seed: int, epoch: int, rank: int) -> torch.Generator:
    """The RNG of a rank's random negatives in an epoch."""
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 4099 + rank + 1)


def local_share(batch_B: np.ndarray, mask_WT: np.ndarray, rank: int, world: int) -> tuple[np.ndarray, float]:
    """(window indices this rank trains, loss weight). A rank whose share has no target trains a stand-in
    window of the batch with weight 0, so that it still joins the gradient all-reduce."""
    mine = batch_B[rank::world]
    m_r = int(mask_WT[mine].sum()) if len(mine) else 0
    m_all = int(mask_WT[batch_B].sum())
    if m_r == 0:
        first = next(i for i in batch_B if mask_WT[i].any())
        return np.asarray([first]), 0.0
    return mine, world * m_r / m_all


def sum_expert_loads(model: TwoTower) -> None:
    """All-reduce (sum) every MoE layer's recorded load, so each replica makes the same bias update."""
    moes = [m for m in model.moe_layers() if m.last_load is not None]
    if not moes:
        return
    flat = torch.cat([m.last_load.float() for m in moes])
    dist.all_reduce(flat)
    for m, part in zip(moes, flat.split([m.last_load.numel() for m in moes])):
        m.last_load = part.to(m.last_load.dtype)


# ---- the epoch loop (also the in-process W = 1 path: world = 1, no process group) ----

@dataclass(kw_only=True, slots=True)
class EpochLoopResult:
    losses: list[float]            # mean global-step loss per epoch trained here (start_epoch..)
    window_epochs_N: np.ndarray    # epochs each window was trained in, summed over ranks (this run only)
    steps: int                     # optimiser steps this rank took
    t_first_step: float            # time.time() before the first step
    t_end: float


def train_epochs(model: TwoTower, opt: torch.optim.Optimizer, loss_module: torch.nn.Module, data: dict, *,
                 cfg: TrainConfig, epochs: int, start_epoch: int, seed: int, rank: int = 0, world: int = 1,
                 scaler: torch.amp.GradScaler | None = None, fault: FaultInjection | None = None, attempt: int = 0,
                 record_grads: tuple[int, Path] | None = None,
                 on_epoch_end: Callable[[int, list[float], np.ndarray], None] | None = None,
                 progress: Callable[[str], None] | None = None,
                 heartbeat: Callable[[], None] | None = None) -> EpochLoopResult:
    """Train epochs start_epoch..epochs-1 of the round's plan as `rank` of `world` (world > 1: loss_module is
    DDP and a process group is up). on_epoch_end(epoch + 1, losses, window_epochs_N) runs on every rank."""
    inputs_WT, targets_WT, mask_WT = data["inputs_WT"], data["targets_WT"], data["mask_WT"]
    device = next(model.parameters()).device
    item_prob_R = data["item_prob_R"].to(device)
    n_windows = inputs_WT.shape[0]
    counts_N = np.zeros(n_windows, np.int64)
    sync = sum_expert_loads if world > 1 else None
    losses: list[float] = []
    steps, t_first, last_report = 0, 0.0, time.monotonic()
    model.train()
    for epoch in range(start_epoch, epochs):
        batches = global_batches(epoch_order(n_windows, seed, epoch), cfg.batch_size)
        ema_decay = ema.decay_for(cfg.ema_epochs, len(batches))
        gen = rank_generator(seed, epoch, rank)
        weighted_loss, n_steps = 0.0, 0
        epoch_counts_N = np.zeros(n_windows, np.int64)
        for s, batch_B in enumerate(batches):
            g_step = epoch * len(batches) + s
            if heartbeat is not None:
                heartbeat()
            if fault is not None and (fault.rank, fault.at_step, fault.attempt) == (rank, g_step, attempt):
                Path(data["out_dir"], KILLED_FILE).write_text(repr(time.time()))
                os.kill(os.getpid(), signal.SIGKILL)  # the test hook: die like an OOM-killed or preempted worker
            epoch_counts_N[batch_B[rank::world]] += 1  # this rank's share is done (a share without targets too)
            if not mask_WT[batch_B].any():
                continue  # nothing to learn in the whole batch: every rank skips it alike
            mine, weight = local_share(batch_B, mask_WT, rank, world)
            if not t_first:
                t_first = time.time()
            m_BT = torch.from_numpy(mask_WT[mine]).to(device)
            hook = sync
            if weight == 0.0:
                def hook(mdl, _sync=sync):  # a stand-in's loads must not count
                    for moe in mdl.moe_layers():
                        if moe.last_load is not None:
                            moe.last_load = torch.zeros_like(moe.last_load)
                    if _sync:
                        _sync(mdl)
            if record_grads is not None and g_step == record_grads[0]:
                hook = _recording(hook, rank, record_grads[1])
            loss = train_step(loss_module, model, opt, torch.from_numpy(inputs_WT[mine]).to(device),
                              torch.from_numpy(targets_WT[mine]).to(device), m_BT, item_prob_R=item_prob_R,
                              n_items=data["n_items"], cfg=cfg, generator=gen, scaler=scaler,
                              weight=weight if world > 1 else 1.0, before_bias_update=hook, ema_decay=ema_decay)
            weighted_loss += loss * weight / world if world > 1 else loss
            n_steps += 1
            steps += 1
            if progress and time.monotonic() - last_report > 30:
                last_report = time.monotonic()
                progress(f"epoch {epoch + 1}/{epochs}: step {s + 1}/{len(batches)}, rank-local loss {loss:.4f}")
        if world > 1:
            t = torch.tensor([weighted_loss], dtype=torch.float64, device=device)  # NCCL wants device tensors
            dist.all_reduce(t)
            weighted_loss = float(t)
            c = torch.from_numpy(epoch_counts_N).to(device)
            dist.all_reduce(c)
            epoch_counts_N = c.cpu().numpy()
        counts_N += epoch_counts_N
        losses.append(weighted_loss / max(n_steps, 1))
        if progress:
            progress(f"epoch {epoch + 1}/{epochs}: loss {losses[-1]:.4f} over {n_windows} windows on {world} worker(s)")
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, losses, counts_N)
    model.eval()
    return EpochLoopResult(losses=losses, window_epochs_N=counts_N, steps=steps, t_first_step=t_first or time.time(),
                           t_end=time.time())


def _recording(inner, rank: int, path: Path):
    def hook(model: TwoTower) -> None:
        if rank == 0:  # grads are the all-reduced (and unscaled) ones here: the optimiser step has just read them
            torch.save({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}, path)
        if inner:
            inner(model)
    return hook


def save_state(path: Path, *, epoch: int, model: TwoTower, opt: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler | None, losses: list[float], window_epochs_N: np.ndarray) -> None:
    buf = io.BytesIO()
    torch.save({"epoch": epoch, "model": {k: v.cpu() for k, v in model.state_dict().items()},
                "optimizer": opt.state_dict(), "scaler": scaler.state_dict() if scaler else None,
                "losses": list(losses), "window_epochs_N": window_epochs_N}, buf)
    write_atomic(path, buf.getvalue())


def build_replica(model_config: dict, state: dict, cfg: TrainConfig, device: torch.device):
    """(model, optimizer, scaler) on `device` from a state file's contents."""
    model = TwoTower(ModelConfig.from_dict(model_config), state["model"]["item_embedding.weight"].shape[0])
    model.load_state_dict(state["model"])
    model.to(device)
    opt = make_optimizer(model, cfg)
    if state.get("optimizer"):
        opt.load_state_dict(state["optimizer"])
    scaler = make_grad_scaler(cfg.precision, device.type, cfg.fp16_init_scale)
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    return model, opt, scaler


# ---- the process entry point torch.distributed.elastic runs ----

def worker_main(spec: RoundSpec) -> dict:
    """Entry point of each worker process. RANK / WORLD_SIZE / LOCAL_RANK / MASTER_* are set by the elastic agent."""
    t_enter = time.time()
    rank, world, local_rank = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    return {**run_rank(spec, rank=rank, world=world, local_rank=local_rank), "t_enter": t_enter}


def run_rank(spec: RoundSpec, *, rank: int, world: int, local_rank: int) -> dict:
    cfg = spec.cfg
    stall = cfg.elastic.stall_timeout_s

    def heartbeat() -> None:  # re-arms the watchdog: no step for `stall` s -> stacks to stderr, exit 1
        faulthandler.dump_traceback_later(stall, exit=True, file=sys.stderr)

    heartbeat()
    torch.set_num_threads(cfg.elastic.threads_per_worker)
    cuda = spec.device == "cuda"
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo",
                            timeout=timedelta(seconds=max(60.0, cfg.elastic.rendezvous_timeout_s)))
    t_group = time.time()
    try:
        out_dir = Path(spec.out_dir)
        data = torch.load(out_dir / DATA_FILE, weights_only=False)
        data["out_dir"] = spec.out_dir
        state = torch.load(spec.state_path, map_location="cpu", weights_only=False)
        model, opt, scaler = build_replica(spec.model_config, state, cfg, device)
        ddp = torch.nn.parallel.DistributedDataParallel(
            WindowLoss(model), device_ids=[local_rank] if cuda else None,
            forward_sync_buffers=False)  # buffers: equal at init (same state); the router bias then stays equal
                                         # through sum_expert_loads, so no broadcast before every forward
        _KEEP_UNTIL_EXIT.append(ddp)
        prior_losses = list(state.get("losses", []))
        prior_counts = state.get("window_epochs_N")
        if prior_counts is None:
            prior_counts = np.zeros(data["inputs_WT"].shape[0], np.int64)

        def on_epoch_end(epoch: int, losses: list[float], counts_N: np.ndarray) -> None:
            if rank == 0:
                save_state(checkpoint_path(out_dir, epoch), epoch=epoch, model=model, opt=opt, scaler=scaler,
                           losses=prior_losses + losses, window_epochs_N=prior_counts + counts_N)

        say = (lambda m: print(f"[worker {rank}/{world}] {m}", flush=True)) if rank == 0 else None
        grads = (spec.record_grads_step, out_dir / GRADS_FILE) if spec.record_grads_step is not None else None
        res = train_epochs(model, opt, ddp, data, cfg=cfg, epochs=spec.epochs, start_epoch=spec.start_epoch,
                           seed=spec.seed, rank=rank, world=world, scaler=scaler, fault=spec.fault,
                           attempt=spec.attempt, record_grads=grads, on_epoch_end=on_epoch_end, progress=say,
                           heartbeat=heartbeat)
        atexit.register(_exit_without_teardown)  # success (spawn, torchrun): the process group is never freed
        return {"rank": rank, "world": world, "steps": res.steps, "t_first_step": res.t_first_step,
                "t_end": res.t_end, "losses": res.losses, "t_group": t_group, "t_exit": time.time()}
    finally:
        heartbeat()  # teardown and process exit are watched too: a worker that does not exit in time exits 1
        dist.destroy_process_group()  # deregisters it (NCCL: shuts it down); the object lives on in _KEEP_UNTIL_EXIT
