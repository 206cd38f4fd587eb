"""`livetower bench train`: training throughput per precision and worker count, scaling, scale events, recovery.

On one synthetic round (each user's newest event held out for quality), for every precision:
  - W=1 in this process (1 thread): the baseline, its per-epoch loss curve and Recall/NDCG@10 on the holdout;
    and W=1 with max(--workers) threads (the other way to use the cores);
  - W in --workers launched through torch.distributed.elastic (gloo on CPU; W=1 too, so the launch path is
    compared with itself): events/s per worker, device-seconds per million events, scaling efficiency
    = rate(W) / (W * rate(launched W=1)).
Then (first precision): a scale sequence W=1 -> 2 -> 1 continuing one model (time from the round call to the
first step on the new W = the scale event), and a W=2 round whose rank 1 is SIGKILLed mid-epoch (time from the
kill to the retry's first step on the remaining worker). Loss parity: each mode's epoch losses and quality
against fp32 on the same data and seed. On a GPU (when torch sees one): W=1 per precision there.
Writes results.json and results.png under --out. "events" = new events trained (masked targets) x epochs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from trainer.config import PRECISIONS, ElasticConfig, TrainConfig
from trainer.data.synthetic import SyntheticConfig, generate
from trainer.elastic import FaultInjection, run_distributed_round, train_windows_elastic
from trainer.evaluate import evaluate_model
from trainer.examples import left_pad, stack_windows, windows_for_new
from trainer.model import TwoTower
from trainer.model_config import ModelConfig
from trainer.training import global_batches, make_optimizer
from trainer.vocab import ItemVocab, table_rows_for


@dataclass(kw_only=True, slots=True)
class RoundData:
    inputs_WT: np.ndarray
    targets_WT: np.ndarray
    mask_WT: np.ndarray
    item_prob_R: torch.Tensor
    n_items: int
    num_rows: int
    holdout_hist_BT: np.ndarray    # each user's history before its newest event
    holdout_tgt_B: np.ndarray      # ... and that event's row
    events: int                    # events trained per epoch (masked targets)


def make_round_data(model_cfg: ModelConfig, *, n_users: int, events_per_user: int, n_items: int = 1000,
                    seed: int = 0) -> RoundData:
    """Synthetic events -> next-item windows the way a trainer round builds them (newest event per user held out)."""
    syn = SyntheticConfig(n_users=n_users, n_items=n_items, n_clusters=min(25, n_items), events_per_user=events_per_user,
                          seed=seed)
    vocab, seqs = ItemVocab(), defaultdict(list)
    for ev in generate(syn):
        seqs[ev.user_id].append(vocab.add(ev.item_id))
    T = model_cfg.max_history
    windows, hist, tgt = [], [], []
    for seq in seqs.values():
        windows.extend(windows_for_new(seq[:-1], len(seq) - 1, T))
        hist.append(left_pad(seq[:-1], T))
        tgt.append(seq[-1])
    inputs_WT, targets_WT, mask_WT = stack_windows(windows)
    rows = table_rows_for(len(vocab))
    counts = np.zeros(rows, np.float64)
    np.add.at(counts, targets_WT[mask_WT], 1)
    return RoundData(inputs_WT=inputs_WT, targets_WT=targets_WT, mask_WT=mask_WT,
                     item_prob_R=torch.from_numpy(counts / counts.sum()).float(), n_items=len(vocab), num_rows=rows,
                     holdout_hist_BT=np.stack(hist), holdout_tgt_B=np.asarray(tgt, np.int64), events=int(mask_WT.sum()))


def fresh_model(cfg: TrainConfig, data: RoundData, seed: int = 0) -> tuple[TwoTower, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = TwoTower(cfg.model, data.num_rows)
    return model, make_optimizer(model, cfg)


def _round(cfg: TrainConfig, data: RoundData, model: TwoTower, opt, *, workers: int, epochs: int, seed: int,
           fault: FaultInjection | None = None):
    g = torch.Generator().manual_seed(seed)
    return train_windows_elastic(model, opt, data.inputs_WT, data.targets_WT, data.mask_WT,
                                 item_prob_R=data.item_prob_R, n_items=data.n_items, cfg=cfg, epochs=epochs,
                                 generator=g, workers=workers, fault=fault, progress=lambda m: print(f"    {m}", flush=True))


def _row(stats) -> dict:
    rate = stats.events_per_s_per_worker
    return {"workers": stats.workers, "in_process": stats.in_process, "losses": stats.losses,
            "train_s": stats.train_seconds, "startup_s": stats.startup_seconds, "wall_s": stats.wall_seconds,
            "events_per_s": rate * stats.workers, "events_per_s_per_worker": rate,
            "device_s_per_million_events": 1e6 / rate, "startup_phases": stats.startup_phases}


def run(args) -> dict:
    torch.set_num_threads(1)
    model_cfg = ModelConfig.tiny_debug() if args.tiny else ModelConfig()
    base = TrainConfig(model=model_cfg, batch_size=args.batch_size,
                       elastic=ElasticConfig(max_workers=max(args.workers), device="cpu"))
    data = make_round_data(model_cfg, n_users=args.users, events_per_user=args.events_per_user)
    n_steps = len(global_batches(np.arange(data.inputs_WT.shape[0]), base.batch_size))
    res: dict = {"config": {"users": args.users, "events_per_user": args.events_per_user, "events_per_epoch": data.events,
                            "windows": int(data.inputs_WT.shape[0]), "epochs": args.epochs, "batch_size": base.batch_size,
                            "model": model_cfg.to_dict(), "workers": args.workers, "precisions": args.precision,
                            "cpu_cores": os.cpu_count(), "loadavg_start": os.getloadavg(), "torch": torch.__version__,
                            "machine": platform.processor() or platform.machine()},
                 "cpu": {}, "gpu": None}
    print(f"train bench: {data.events} events/epoch in {data.inputs_WT.shape[0]} windows, {args.epochs} epoch(s), "
          f"{n_steps} steps/epoch, model dim {model_cfg.dim} x {model_cfg.n_layers} layers", flush=True)
    t_cold = None
    for prec in args.precision:
        cfg = base.replace(precision=prec)
        out = res["cpu"][prec] = {"runs": {}}
        print(f"[{prec}] W=1 in process (baseline, 1 thread)", flush=True)
        model, opt = fresh_model(cfg, data)
        st = _round(cfg, data, model, opt, workers=1, epochs=args.epochs, seed=1)
        out["runs"]["inproc_w1"] = _row(st)
        out["quality"] = evaluate_model(model, data.holdout_hist_BT, data.holdout_tgt_B, data.n_items)
        if max(args.workers) > 1:  # the other use of W cores: one process with W intra-op threads
            t = max(args.workers)
            print(f"[{prec}] W=1 in process, {t} threads", flush=True)
            torch.set_num_threads(t)
            model, opt = fresh_model(cfg, data)
            st = _round(cfg, data, model, opt, workers=1, epochs=args.epochs, seed=1)
            out["runs"][f"inproc_w1_{t}threads"] = _row(st)
            torch.set_num_threads(1)
        for w in args.workers:
            print(f"[{prec}] W={w} launched (elastic, gloo)", flush=True)
            model, opt = fresh_model(cfg, data)
            st = _round(cfg.replace(elastic=cfg.elastic.replace(in_process_single_worker=False)), data, model, opt,
                        workers=w, epochs=args.epochs, seed=1)
            if t_cold is None:
                t_cold = st.startup_seconds  # the first launch also starts the forkserver and imports torch there
            out["runs"][f"launched_w{w}"] = _row(st)
            out["runs"][f"launched_w{w}"]["quality"] = evaluate_model(model, data.holdout_hist_BT, data.holdout_tgt_B,
                                                                      data.n_items)
        one = out["runs"].get("launched_w1")
        out["scaling_efficiency"] = {
            f"w{w}": out["runs"][f"launched_w{w}"]["events_per_s"] / (w * one["events_per_s"])
            for w in args.workers if one and w > 1}
        r = out["runs"]
        print(f"[{prec}] events/s per worker: " + ", ".join(f"{k} {v['events_per_s_per_worker']:.0f}" for k, v in r.items())
              + f"; scaling efficiency {out['scaling_efficiency']}; R@10 (W=1 in process) {out['quality']['recall@10']:.4f}, "
              + ", ".join(f"{k} {v['quality']['recall@10']:.4f}" for k, v in r.items() if "quality" in v), flush=True)
    res["cold_first_launch_startup_s"] = t_cold
    ref = res["cpu"].get("fp32")
    res["parity_vs_fp32"] = {}
    if ref:
        for prec, out in res["cpu"].items():
            a, b = out["runs"]["inproc_w1"]["losses"], ref["runs"]["inproc_w1"]["losses"]
            res["parity_vs_fp32"][prec] = {
                "max_rel_loss_diff": max(abs(x - y) / abs(y) for x, y in zip(a, b)),
                "recall@10_diff": out["quality"]["recall@10"] - ref["quality"]["recall@10"],
                "ndcg@10_diff": out["quality"]["ndcg@10"] - ref["quality"]["ndcg@10"]}
    prec = args.precision[0]
    cfg = base.replace(precision=prec)
    if max(args.workers) >= 2:
        print(f"[{prec}] scale sequence W=1 -> 2 -> 1 on one model", flush=True)
        model, opt = fresh_model(cfg, data)
        seq = []
        for i, w in enumerate((1, 2, 1)):
            t0 = time.perf_counter()
            st = _round(cfg, data, model, opt, workers=w, epochs=1, seed=10 + i)
            seq.append({"workers": w, "in_process": st.in_process, "call_to_first_step_s": st.startup_seconds,
                        "wall_s": time.perf_counter() - t0, "loss": st.losses[-1]})
        res["scale_sequence"] = seq
        print("    " + ", ".join(f"W={s['workers']}: {s['call_to_first_step_s']:.2f} s to first step" for s in seq), flush=True)
        print(f"[{prec}] W=2 round, rank 1 SIGKILLed mid-epoch {args.epochs}", flush=True)
        model, opt = fresh_model(cfg, data)
        at = (args.epochs - 1) * n_steps + n_steps // 2
        st = _round(cfg, data, model, opt, workers=2, epochs=args.epochs, seed=20, fault=FaultInjection(rank=1, at_step=at))
        res["killed_worker"] = {"kill_at_step": at, "attempts": [dataclasses.asdict(a) for a in st.attempts],
                                "failure_detect_s": st.failure_detect_seconds, "recovery_s": st.recovery_seconds,
                                "wall_s": st.wall_seconds, "finished_on_workers": st.workers,
                                "every_window_trained_every_epoch": bool((st.window_epochs_N == args.epochs).all())}
        print(f"    detected in {st.failure_detect_seconds:.2f} s, retry training {st.recovery_seconds:.2f} s after "
              f"the kill, on {st.workers} worker(s)", flush=True)
    if torch.cuda.is_available():
        res["gpu"] = _gpu(base, data, args)
    else:
        res["gpu"] = {"status": "blocked: torch sees no GPU on this machine (no CUDA numbers, no fp8)"}
    res["config"]["loadavg_end"] = os.getloadavg()
    return res


def _gpu(base: TrainConfig, data: RoundData, args) -> dict:
    out = {"device": torch.cuda.get_device_name(0), "runs": {}}
    for prec in args.precision:
        cfg = base.replace(precision=prec, elastic=base.elastic.replace(device="cuda"))
        model, opt = fresh_model(cfg, data)
        o = run_distributed_round(model.state_dict(), opt.state_dict(), model_config=cfg.model.to_dict(),
                                  inputs_WT=data.inputs_WT, targets_WT=data.targets_WT, mask_WT=data.mask_WT,
                                  item_prob_R=data.item_prob_R, n_items=data.n_items, cfg=cfg, epochs=args.epochs,
                                  seed=1, workers=1)
        out["runs"][prec] = _row(o.stats)
    return out


def plot(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    precs = list(res["cpu"])
    kinds = list(res["cpu"][precs[0]]["runs"]) if precs else []
    x = np.arange(len(precs))
    width = 0.8 / max(len(kinds), 1)
    for i, k in enumerate(kinds):
        a.bar(x + i * width - 0.4 + width / 2, [res["cpu"][p]["runs"][k]["events_per_s_per_worker"] for p in precs],
              width, label=k)
    a.set_xticks(x, precs)
    a.set_ylabel("events/s per worker")
    a.set_title(f"CPU ({res['config']['cpu_cores']} cores), {res['config']['events_per_epoch']} events/epoch")
    a.legend(fontsize=8)
    for p in precs:
        losses = res["cpu"][p]["runs"]["inproc_w1"]["losses"]
        b.plot(range(1, len(losses) + 1), losses, marker="o", label=p)
    b.set_xlabel("epoch")
    b.set_ylabel("mean training loss")
    b.set_title("loss per precision (W=1, same data and seed)")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="livetower bench train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", default="1,2", help="comma-separated worker counts (default 1,2)")
    p.add_argument("--precision", default="fp32,bf16,fp16", help=f"comma-separated, from {PRECISIONS}")
    p.add_argument("--users", type=int, default=400)
    p.add_argument("--events-per-user", type=int, default=30)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--tiny", action="store_true", help="the tiny test model instead of the default one")
    p.add_argument("--out", type=Path, default=Path("bench-results/train"))
    args = p.parse_args(argv)
    args.workers = sorted({int(w) for w in args.workers.split(",")})
    args.precision = [s.strip() for s in args.precision.split(",") if s.strip()]
    bad = [s for s in args.precision if s not in PRECISIONS]
    if bad or min(args.workers) < 1:
        p.error(f"--precision must be from {PRECISIONS} (got {bad}); --workers must be >= 1")
    res = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(res, indent=1, default=float))
    plot(res, args.out / "results.png")
    print(f"wrote {args.out}/results.json and results.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
