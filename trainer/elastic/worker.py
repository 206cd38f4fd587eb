"""One rank of a distributed training round: DDP over a deterministic shard of every global batch.

Every rank holds the round's windows and runs the one epoch loop (trainer/training.py: train_epochs) as
rank r of W: epoch e shuffles the windows with a permutation seeded by (seed, e), cuts it into global
batches of cfg.batch_size, and rank r trains batch[r::W]. So the split depends only on (seed, epoch, W),
the global batches do not depend on W at all, and a retry with fewer workers trains exactly the windows
of the epochs it has left.

Each rank's loss is weighted by W * M_r / M (M_r its targets, M the global batch's, known to every
rank from the masks), so DDP's gradient average is the gradient of the mean loss over all the
batch's targets; the MoE expert loads are summed over ranks before the bias update, so every
replica keeps the same router bias. Rank 0 writes an atomic checkpoint after every epoch; the
launcher (trainer/elastic/launcher.py) restarts a failed round from the newest one.
"""

from __future__ import annotations

import atexit
import faulthandler
import os
import sys
import signal
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from trainer.config import TrainConfig
from trainer.elastic.files import load_tensors, save_tensors
from trainer.model import TwoTower
from trainer.model_config import ModelConfig
from trainer.training import Shard, WindowLoss, make_grad_scaler, make_optimizer, train_epochs, window_loss

# Objects that hold the gloo process group are never freed in a worker. ~ProcessGroupGloo runs with the GIL held
# and waits for the PG's work mutex, which a gloo thread can hold while it drops the last reference of a Python
# tensor of a finished collective (needing the GIL): a deadlock we hit on a loaded 2-core machine (1 round in ~10).
# fork/forkserver workers end with os._exit anyway; spawn/torchrun workers do too after a success (atexit below).
_KEEP_UNTIL_EXIT: list = []


def _exit_without_teardown() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# Round files hold no pickle (trainer/elastic/files.py): tensors and plain containers, and the spec as JSON.
DATA_FILE = "round_data.pt"
SPEC_FILE = "spec.json"         # the latest attempt's RoundSpec (what `torchrun -m trainer.elastic` reads)
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
    """What every rank of one launch attempt gets (passed to launched workers in memory, written as SPEC_FILE
    JSON for external launchers; the bulk lives in files)."""
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


def save_state(path: Path, *, epoch: int, model: TwoTower, opt: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler | None, losses: list[float], window_epochs_N: np.ndarray) -> None:
    save_tensors(path, {"epoch": epoch, "model": {k: v.cpu() for k, v in model.state_dict().items()},
                        "optimizer": opt.state_dict(), "scaler": scaler.state_dict() if scaler else None,
                        "losses": list(losses), "window_epochs_N": window_epochs_N})


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
        data = load_tensors(out_dir / DATA_FILE)
        state = load_tensors(spec.state_path)
        model, opt, scaler = build_replica(spec.model_config, state, cfg, device)
        ddp = torch.nn.parallel.DistributedDataParallel(
            WindowLoss(model), device_ids=[local_rank] if cuda else None,
            forward_sync_buffers=False)  # buffers: equal at init (same state); the router bias then stays equal
                                         # through the summed expert loads, so no broadcast before every forward
        _KEEP_UNTIL_EXIT.append(ddp)
        prior_losses = list(state.get("losses", []))
        prior_counts = state.get("window_epochs_N")
        if prior_counts is None:
            prior_counts = np.zeros(data["inputs_WT"].shape[0], np.int64)

        def before_step(g_step: int) -> None:
            heartbeat()
            f = spec.fault
            if f is not None and (f.rank, f.at_step, f.attempt) == (rank, g_step, spec.attempt):
                (out_dir / KILLED_FILE).write_text(repr(time.time()))
                os.kill(os.getpid(), signal.SIGKILL)  # the test hook: die like an OOM-killed or preempted worker

        def after_step(g_step: int) -> None:
            if rank == 0 and g_step == spec.record_grads_step:  # the all-reduced, unscaled gradients of the step
                torch.save({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None},
                           out_dir / GRADS_FILE)

        def on_epoch_end(epoch: int, losses: list[float], counts_N: np.ndarray) -> None:
            if rank == 0:
                save_state(checkpoint_path(out_dir, epoch), epoch=epoch, model=model, opt=opt, scaler=scaler,
                           losses=prior_losses + losses, window_epochs_N=prior_counts + counts_N)

        say = (lambda m: print(f"[worker {rank}/{world}] {m}", flush=True)) if rank == 0 else None
        res = train_epochs(model, opt, window_loss(ddp, cfg, data["item_prob_R"], data["n_items"]), data["inputs_WT"],
                           data["targets_WT"], data["mask_WT"], cfg=cfg, epochs=spec.epochs,
                           start_epoch=spec.start_epoch, seed=spec.seed, shard=Shard(rank, world, dist.all_reduce),
                           scaler=scaler, before_step=before_step, after_step=after_step, on_epoch_end=on_epoch_end,
                           progress=say)
        atexit.register(_exit_without_teardown)  # success (spawn, torchrun): the process group is never freed
        return {"rank": rank, "world": world, "steps": res.steps, "t_first_step": res.t_first_step,
                "t_end": res.t_end, "losses": res.losses, "t_group": t_group, "t_exit": time.time()}
    finally:
        heartbeat()  # teardown and process exit are watched too: a worker that does not exit in time exits 1
        dist.destroy_process_group()  # deregisters it (NCCL: shuts it down); the object lives on in _KEEP_UNTIL_EXIT
