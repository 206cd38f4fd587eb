"""Incremental (sidecar-style) training on a protocol's training data, for comparison with offline.

The training events of a split are written, in time order, to an embedded SqliteEventLog and
consumed by the sidecar's own `Trainer.run_round` in rounds of `chunk_events` (its holdout, gate
and fold-in included). Only engine publishing is skipped (it measures serving, not quality).
The model is then scored on the same EvalSets as the offline one, mapping item ids through the
Trainer's vocabulary (items it never saw score 0: the pad row).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from contracts.eventlog import SqliteEventLog
from contracts.registry import Registry
from proto import livetower_v1_pb2 as pb
from trainer.config import TrainConfig
from trainer.data.sequences import SequenceData
from trainer.loop import Trainer
from trainer.studies.protocols import Split


class _NoPublishTrainer(Trainer):
    def publish(self, metrics: dict[str, float], gate: str) -> int:  # no engine build in quality studies
        return 0


def training_events(data: SequenceData, split: Split) -> list[pb.Event]:
    """The split's training items as events, ordered by (timestamp, user, position)."""
    if data.times is None:
        raise ValueError(f"incremental training replays events in time order; {data.name!r} has no timestamps")
    rows = []
    for u, seq in enumerate(split.train):
        ts = data.times[u][:len(seq)]  # training items are each user's oldest ones in both splits
        rows.extend((int(t), u, j, int(i)) for j, (t, i) in enumerate(zip(ts, seq)))
    rows.sort()
    return [pb.Event(event_id=f"{data.name}-{u}-{j}", user_id=f"u{u}", item_id=str(i), action="click", weight=1.0,
                     timestamp_ms=t * 1000) for t, u, j, i in rows]


def train_incremental(data: SequenceData, split: Split, train_cfg: TrainConfig, *, chunk_events: int,
                      workdir: Path | None = None,
                      progress: Callable[[str], None] = print) -> tuple[Trainer, np.ndarray, dict]:
    """-> (trainer with its model, rows_of_item (N + 1,), log). train_cfg.epochs_per_round applies per round."""
    if chunk_events < 1:
        raise ValueError(f"chunk_events must be >= 1, got {chunk_events}")
    cfg = train_cfg.replace(max_round_events=chunk_events, backend="torch")
    tmp = tempfile.TemporaryDirectory(prefix="livetower-incr-") if workdir is None else None
    root = Path(tmp.name if tmp else workdir)
    try:
        events = training_events(data, split)
        log_db = SqliteEventLog(root / "events.sqlite")
        log_db.append_all(events)
        trainer = _NoPublishTrainer(cfg, log_db, Registry(root / "registry"), root / "trainer")
        rounds, t0 = [], time.perf_counter()
        progress(f"incremental: {len(events)} events in rounds of {chunk_events}, "
                 f"{cfg.epochs_per_round} epoch(s) per round")
        while (r := trainer.run_round()) is not None:
            rounds.append({"events": r.events, "seconds": round(r.seconds, 2), "gate": r.gate,
                           **{k: round(v, 4) for k, v in r.metrics.items()}})
            progress(f"round {len(rounds)}: {r.events} events, {r.seconds:.1f} s, gate {r.gate}, "
                     f"model R@10 {r.metrics.get('model_recall@10', float('nan')):.4f} "
                     f"pop R@10 {r.metrics.get('popularity_recall@10', float('nan')):.4f}")
        train_s = time.perf_counter() - t0
        log_db.close()
    finally:
        if tmp:
            tmp.cleanup()
    rows_of_item = np.zeros(split.n_items + 1, np.int64)
    for i in range(1, split.n_items + 1):
        rows_of_item[i] = trainer.vocab.row_of.get(str(i), 0)
    log = {"rounds": len(rounds), "events": len(events), "chunk_events": chunk_events, "windows_note":
           "each round trains its new events for epochs_per_round epochs; the held-out newest event 1 epoch",
           "epochs_per_round": cfg.epochs_per_round, "train_seconds": train_s,
           "unknown_items": int((rows_of_item[1:] == 0).sum()), "round_log": rounds}
    return trainer, rows_of_item, log


def compare_incremental(data: SequenceData, protocols: list[str], cfg, *, chunk_events: int, n_negatives: int = 100,
                        neg_exclude: str = "sequence", ks: tuple[int, ...] = (10, 20),
                        progress: Callable[[str], None] = print) -> dict:
    """Train cfg.train (an OfflineTrainConfig's TrainConfig) incrementally on the protocol's training data
    and score it on the same validation/test sets and negatives as run_eval. Its loss is always the
    sidecar's sampled softmax with cfg.train's negatives (in_batch_negatives, logq_correction), whatever
    cfg.loss says."""
    if getattr(cfg, "arch", "deepseek") != "deepseek":
        raise ValueError(f"incremental training runs the sidecar's DeepSeek tower; OfflineTrainConfig.arch is "
                         f"{cfg.arch!r} (drop --incremental or --arch)")
    from trainer.studies.offline import TEST_NEG_SEED, VAL_NEG_SEED, _flat
    from trainer.studies.protocols import make_split, negatives_for
    from trainer import ema
    from trainer.studies.ranking import evaluate_model_on

    split = make_split(data, protocols[0])
    trainer, rows_of_item, log = train_incremental(data, split, cfg.train, chunk_events=chunk_events,
                                                   progress=progress)
    tc = cfg.train
    out = {"train": log, "loss": f"sampled_softmax (sidecar: {tc.n_random_negatives} uniform negatives"
                                 f"{' + in-batch' if tc.in_batch_negatives else ''}"
                                 f"{', log-Q' if tc.logq_correction else ''})"}
    served = ema.averaged(trainer.model, trainer.opt)  # what the sidecar publishes (the weight average, if any)
    for name, ev, seed in (("val", split.val, VAL_NEG_SEED), ("test", split.test, TEST_NEG_SEED)):
        neg = negatives_for(data, ev, split, n=n_negatives, exclude=neg_exclude, seed=seed) \
            if "sasrec" in protocols else None
        m = evaluate_model_on(served, ev, split.n_items, negatives_BK=neg, ks=ks, rows_of_item=rows_of_item)
        out[name] = _flat(m, protocols)
    return out
