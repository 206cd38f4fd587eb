"""Offline leave-last-out evaluation: per user, the last event by time is the test item, the rest
train the model; rank against all items with the user's training items excluded."""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from typing import Iterable

import numpy as np
import torch

from proto import livetower_v1_pb2 as pb
from trainer.config import TrainConfig
from trainer.evaluate import evaluate_model, evaluate_popularity
from trainer.examples import stack_windows, windows_for_new
from trainer.loop import left_pad
from trainer.model import TwoTower
from trainer.training import make_optimizer, train_windows
from trainer.vocab import ItemVocab, table_rows_for

log = logging.getLogger("livetower.offline")


def leave_last_out(events: Iterable[pb.Event], cfg: TrainConfig, *, epochs: int,
                   ks: tuple[int, ...] = (10, 20)) -> dict:
    """events must be in time order. Returns model and popularity metrics plus timings."""
    vocab = ItemVocab()
    seqs: dict[str, list[int]] = defaultdict(list)
    for ev in events:
        seqs[ev.user_id].append(vocab.add(ev.item_id))
    users = [u for u, s in seqs.items() if len(s) >= 2]
    T = cfg.model.max_history
    n_items = len(vocab)
    counts = np.zeros(table_rows_for(n_items), np.int64)
    windows = []
    for u in users:
        train = seqs[u][:-1]
        np.add.at(counts, train, 1)
        windows.extend(windows_for_new(train, len(train), T))
    torch.manual_seed(cfg.seed)
    model = TwoTower(cfg.model, table_rows_for(n_items))
    opt = make_optimizer(model, cfg)
    item_prob = torch.from_numpy(counts / counts.sum()).float()
    gen = torch.Generator().manual_seed(cfg.seed)
    hist_BT = np.stack([left_pad(seqs[u][:-1], T) for u in users])
    tgt_B = np.asarray([seqs[u][-1] for u in users], np.int64)
    seen = [sorted(set(seqs[u][:-1])) for u in users]
    t0 = time.perf_counter()
    losses = train_windows(model, opt, *stack_windows(windows), item_prob_R=item_prob, n_items=n_items, cfg=cfg,
                           epochs=epochs, generator=gen, progress=log.info)
    train_s = time.perf_counter() - t0
    return {
        "users": len(users), "items": n_items, "train_windows": len(windows), "epochs": epochs,
        "train_seconds": train_s, "final_loss": losses[-1] if losses else None,
        "model": evaluate_model(model, hist_BT, tgt_B, n_items, seen_rows=seen, ks=ks),
        "popularity": evaluate_popularity(counts, tgt_B, n_items, seen_rows=seen, ks=ks),
    }
