"""`livetower eval` flags and command. Imports nothing heavy at module level (the parser is built
for every livetower command)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import time
from pathlib import Path


def add_eval_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--protocol", default="sasrec,full",
                   help="comma-separated: sasrec (100 sampled negatives, HR/NDCG), full (all items, Recall/NDCG), "
                        "time (global time split, full ranking); sasrec and full share one training")
    p.add_argument("--dataset", choices=("games", "ml100k"), default="ml100k")
    p.add_argument("--data", "--path", dest="data", type=Path,
                   help="data file (or ml-100k dir); default ../shared/data/... for the dataset")
    p.add_argument("--preset", choices=("default", "legacy", "tuned", "tiny"), default="default",
                   help="starting config: default = the sidecar's TrainConfig and loss; legacy = the sidecar's "
                        "before issue 9 (jsonl lines 1-21 'default'); tuned = legacy's best (run 6, the start of "
                        "runs 7-31); flags below override it")
    p.add_argument("--epochs", type=int, help="maximum epochs (early stopping on validation)")
    p.add_argument("--patience", type=int, help="validations without improvement before stopping (0 = off)")
    p.add_argument("--loss", choices=("sampled_softmax", "full_softmax", "bce"))
    p.add_argument("--logq", action=argparse.BooleanOptionalAction,
                   help="sampled_softmax: log-Q correction of the candidates")
    p.add_argument("--in-batch", action=argparse.BooleanOptionalAction,
                   help="sampled_softmax: the batch's other positives are negatives too (else uniform ones only)")
    p.add_argument("--pairwise", type=float, dest="pairwise_weight",
                   help="sampled_softmax: weight of the BPR term over the uniform negatives (0 = off)")
    p.add_argument("--negatives", type=int, help="uniform random negatives per training step")
    p.add_argument("--lr", type=float)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--dim", type=int, help="model width (dim = out_dim)")
    p.add_argument("--arch", choices=("deepseek", "sasrec"),
                   help="user tower: deepseek (served; default) or sasrec (plain SASRec, a reference)")
    p.add_argument("--layers", type=int)
    p.add_argument("--experts", type=int, help="routed experts per MoE layer")
    p.add_argument("--moe-dim", type=int, help="hidden size of each expert")
    p.add_argument("--heads", type=int, help="attention heads")
    p.add_argument("--dense-layers", type=int, help="first_k_dense: the first k layers use a dense MLP, not MoE")
    p.add_argument("--ffn-dim", type=int, help="hidden size of the dense MLP layers")
    p.add_argument("--dropout", type=float)
    p.add_argument("--emb-dropout", type=float, help="dropout on the history's input embeddings (training only)")
    p.add_argument("--tower-proj", action=argparse.BooleanOptionalAction,
                   help="user/item projection layers (--no-tower-proj: score the stack output against the raw "
                        "item embeddings)")
    p.add_argument("--emb-scale", action=argparse.BooleanOptionalAction,
                   help="scale the history's item embeddings by sqrt(dim) before the stack (as SASRec)")
    p.add_argument("--abs-positions", action=argparse.BooleanOptionalAction,
                   help="learned absolute position embeddings (counted from the newest item) on top of RoPE")
    p.add_argument("--learn-temperature", action="store_true", help="train the temperature (from --temperature)")
    p.add_argument("--fp32-logits", action="store_true", help="full_softmax: fp32 logits matmuls (default bf16)")
    p.add_argument("--ema-epochs", type=float,
                   help="validate and keep an average of the weights over about this many epochs (0 = off)")
    p.add_argument("--lr-decay", type=float, help="multiply the lr by this after each validation that is not the best")
    p.add_argument("--max-history", type=int, help="sequence length T")
    p.add_argument("--temperature", type=float)
    p.add_argument("--precision", choices=("bf16", "fp32"))
    p.add_argument("--seed", type=int)
    p.add_argument("--max-val-users", type=int, help="validation users scored during training (0 = all)")
    p.add_argument("--eval-negatives", type=int, default=100, help="sampled negatives per user (sasrec)")
    p.add_argument("--neg-exclude", choices=("sequence", "train"), default="sequence",
                   help="sasrec negatives avoid the user's whole sequence, or only its training items (SASRec code)")
    p.add_argument("--incremental", type=int, metavar="CHUNK", default=0,
                   help="also train the sidecar's Trainer in rounds of CHUNK events (time order) and compare")
    p.add_argument("--epochs-per-round", type=int,
                   help="with --incremental: epochs per round (default: the preset's TrainConfig)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--out", type=Path, help="write the JSON result here")
    p.add_argument("--record", type=Path, help="append one JSON line (config, metrics, time, command) here")
    p.add_argument("--note", default="", help="free text stored with --record")


def build_config(args):
    from trainer.studies.offline import PRESETS

    cfg = PRESETS[args.preset]()
    model_changes = {k: v for k, v in dict(
        dim=args.dim, out_dim=args.dim, n_layers=args.layers, n_routed_experts=args.experts,
        moe_dim=args.moe_dim, n_heads=args.heads, first_k_dense=args.dense_layers, ffn_dim=args.ffn_dim,
        dropout=args.dropout, max_history=args.max_history,
        temperature=args.temperature, emb_dropout=args.emb_dropout, emb_scale=args.emb_scale,
        tower_proj=args.tower_proj,
        abs_positions=args.abs_positions).items() if v is not None}
    model = dataclasses.replace(cfg.train.model, **model_changes)
    train_changes = {k: v for k, v in dict(
        lr=args.lr, weight_decay=args.weight_decay, batch_size=args.batch_size, n_random_negatives=args.negatives,
        precision=args.precision, seed=args.seed, epochs_per_round=args.epochs_per_round,
        logq_correction=args.logq, in_batch_negatives=args.in_batch,
        pairwise_weight=args.pairwise_weight, ema_epochs=args.ema_epochs).items() if v is not None}
    train = cfg.train.replace(model=model, **train_changes)
    changes = {k: v for k, v in dict(epochs=args.epochs, patience=args.patience, loss=args.loss, arch=args.arch,
                                     max_val_users=args.max_val_users, lr_decay=args.lr_decay).items() if v is not None}
    if args.learn_temperature:
        changes["learn_temperature"] = True
    if args.fp32_logits:
        changes["logits_bf16"] = False
    return dataclasses.replace(cfg, train=train, **changes)


def run_eval_command(args) -> int:
    import torch

    from trainer.data.sequences import load_dataset
    from trainer.studies.offline import format_table, run_eval

    torch.set_num_threads(args.threads)
    protocols = [p.strip() for p in args.protocol.split(",") if p.strip()]
    cfg = build_config(args)
    data = load_dataset(args.dataset, args.data)
    started = time.strftime("%Y-%m-%dT%H:%M:%S")

    def progress(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    result = run_eval(data, protocols, cfg, n_negatives=args.eval_negatives, neg_exclude=args.neg_exclude,
                      progress=progress)
    if args.incremental:
        from trainer.studies.incremental import compare_incremental

        result["incremental"] = compare_incremental(data, protocols, cfg, chunk_events=args.incremental,
                                                    n_negatives=args.eval_negatives, neg_exclude=args.neg_exclude,
                                                    progress=progress)
    result.update(started=started, threads=args.threads, note=args.note,
                  command="livetower " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    print(format_table(result))
    if "incremental" in result:
        inc = result["incremental"]
        print(f"incremental ({inc['train']['rounds']} rounds of {args.incremental} events, "
              f"{inc['train']['train_seconds']:.0f} s): test {inc['test']}")
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).write_text(text)
    if args.record:
        slim = {k: v for k, v in result.items()}
        slim["train"] = {k: v for k, v in result["train"].items()}
        if "incremental" in slim:
            slim["incremental"] = {**slim["incremental"], "train": {
                k: v for k, v in slim["incremental"]["train"].items() if k != "round_log"}}
        with open(args.record, "a") as f:
            f.write(json.dumps(slim) + "\n")
    return 0
