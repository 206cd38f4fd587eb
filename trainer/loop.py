"""The sidecar trainer: consume the event log in rounds, train, evaluate, gate, checkpoint, publish.

A round: read events after the checkpointed positions → grow the vocabulary → hold out each user's
newest event (up to max_eval_users) → train on the rest, mixed with replayed windows of earlier
users (anti-forgetting) → Recall/NDCG@10 of the model, of the serving (stable) model and of
popularity on the same fresh holdout → fold the holdout in → checkpoint atomically (positions
included) → build + publish an engine if the gate passed (beats popularity and does not fall
below the serving model). Crash anywhere: the next start resumes from the last checkpoint,
so every event is trained at least once.

With cfg.tracing on, a round is one span "trainer.round" (round, events, gate, published version) with a
child span per step: read, train (vocabulary growth, split, training), eval, commit (fold-in, checkpoint),
build (the engine build) and publish (the registry's atomic publish, inside build).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from contracts.catalog import CatalogStore
from contracts.eventlog import SOURCE_KEY, EventBatch, EventSource, StoredEvent
from contracts.registry import Registry
from contracts.tracing import start_tracing
from trainer.checkpoint import TrainerState, load_checkpoint, save_checkpoint
from trainer.config import TrainConfig
from trainer.examples import stack_windows
from trainer.item_catalog import (feature_config_from_state, feature_config_to_state, new_feature_model,
                                  refresh_rows)
from trainer.features import FeatureTwoTower
from trainer.gate import RoundGate, gate_decision
from trainer.items import AdmissionSketch, map_rows, place_items, remember_users
from trainer.metrics import TrainerMetrics
from trainer.model import TwoTower
from trainer.model_config import ModelConfig
from trainer.elastic import (ElasticMetrics, RoundFailed, available_devices, choose_workers, record_choice,
                             resolve_device, train_windows_elastic)
from trainer.publishing import Publishing
from trainer.round_types import RoundResult, RoundSplit
from trainer.short_round_control import ShortRoundControl
from trainer.short_rounds import ReadAhead, watermark_after
from trainer.training import make_grad_scaler, make_optimizer, train_windows
from trainer.user_features import attach_user_features, new_user_features, window_user_rows, windows_of_users
from trainer.vocab import ItemVocab, table_rows_for

log = logging.getLogger("livetower.trainer")


def split_round(new_by_user: dict[str, list[int]], user_seqs: dict[str, list[int]], *, max_eval_users: int,
                seed: int) -> RoundSplit:
    """Hold out the newest event of up to max_eval_users users (picked by `seed`) among those with a history."""
    seqs = {u: user_seqs.get(u, []) + new for u, new in new_by_user.items()}
    eligible = [u for u in new_by_user if len(seqs[u]) >= 2]
    pick = np.random.default_rng(seed).permutation(len(eligible))[:max_eval_users]
    return RoundSplit(new_by_user=new_by_user, seqs=seqs, holdout=sorted(eligible[i] for i in pick))


def new_windows(split: RoundSplit, T: int) -> tuple[list[int], list, list[str]]:
    """(item rows trained, their next-item windows, the user of each window): every new event except the held-out
    ones."""
    held = set(split.holdout)
    rows, parts = [], []
    for u, new in split.new_by_user.items():
        seq, n_new = (split.seqs[u][:-1], len(new) - 1) if u in held else (split.seqs[u], len(new))
        rows.extend(new[:n_new])
        parts.append((u, seq, n_new))
    return rows, *windows_of_users(parts, T)


class Trainer(Publishing, RoundGate, ShortRoundControl):
    """The sidecar trainer (module docstring); publishing, the gate and short rounds are trainer/publishing.py's,
    trainer/gate.py's and trainer/short_round_control.py's."""

    def __init__(self, cfg: TrainConfig, event_log: EventSource, registry: Registry, checkpoint_dir: Path, *,
                 ledger_path: Path | None = None, metrics: TrainerMetrics | None = None,
                 catalog: CatalogStore | None = None) -> None:
        """ledger_path: when set, every round appends "<round>\t<pid>\t<event_id>" lines for the events it
        trained, fsynced before the round's checkpoint. A crash between the two leaves lines of a round the
        checkpoint does not hold; the restarted trainer redoes that round (same number, another pid), so a
        round's committed lines are those of the last pid that wrote it. For audits (the kill -9 campaign)."""
        if (cfg.item_features or cfg.user_features) and resolve_device(cfg.elastic.device) == "cuda":
            raise ValueError("item and user features train in the trainer process, on the CPU (the launched GPU "
                             "workers build the id-only model): pass --train-device cpu")
        if resolve_device(cfg.elastic.device) == "cuda" and cfg.elastic.in_process_single_worker:
            # The trainer process keeps its model on the CPU (eval, export); W = 1 launches one GPU worker.
            cfg = cfg.replace(elastic=cfg.elastic.replace(in_process_single_worker=False))
        for name in ("item_features", "user_features"):
            if getattr(cfg, name) and catalog is None:
                raise ValueError(f"TrainConfig.{name} needs the catalogue: pass catalog=CatalogStore(...) "
                                 "(`livetower train` opens <data-dir>/catalog.sqlite)")
        self.cfg = cfg
        self.catalog = catalog
        self.devices = available_devices(cfg.elastic)
        self.rate_per_worker: float | None = None   # measured events/s of one worker in the last round
        self.event_log = event_log
        self.ledger_path = ledger_path
        self.metrics = metrics or TrainerMetrics()
        self.registry = registry
        self.checkpoint_dir = Path(checkpoint_dir)
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        if removed := registry.remove_stale_staging():
            log.info("removed %d half-built engine dir(s) left by an earlier crash", removed)
        state = load_checkpoint(self.checkpoint_dir)
        if state is None:
            model_cfg = cfg.model
            self.vocab = ItemVocab()
            torch.manual_seed(cfg.seed)
            self.model = new_feature_model(model_cfg, table_rows_for(0), catalog) if cfg.item_features else \
                TwoTower(model_cfg, table_rows_for(0))
            user_cfg = new_user_features(self.model, catalog) if cfg.user_features else None
            self.opt = make_optimizer(self.model, cfg)
            self.state = TrainerState(model_config=model_cfg.to_dict(), model={}, optimizer={}, vocab=[],
                                      item_counts=np.zeros(self.model.num_rows, np.int64), user_seqs=OrderedDict(),
                                      offsets={}, item_last_seen_ms=np.zeros(self.model.num_rows, np.int64))
            if cfg.item_features:
                self.state.feature_config = feature_config_to_state(self.model.feat_cfg)
            if user_cfg is not None:
                self.state.user_feature_config = feature_config_to_state(user_cfg)
            log.info("no checkpoint in %s: starting fresh%s%s", self.checkpoint_dir,
                     " with a feature item tower" if cfg.item_features else "",
                     " with user features" if user_cfg is not None else "")
        else:
            model_cfg = ModelConfig.from_dict(state.model_config)
            if model_cfg != cfg.model:
                log.warning("checkpoint model config differs from the configured one; keeping the checkpoint's")
            self.vocab = ItemVocab(state.vocab)
            self.state = state
            if state.feature_config is not None and catalog is None:
                raise ValueError("the checkpoint holds a feature item tower: the trainer needs the catalogue "
                                 "(--item-features)")
            if state.user_feature_config is not None and catalog is None:
                raise ValueError("the checkpoint holds user features: the trainer needs the catalogue "
                                 "(--user-features)")
            self.model = self._empty_model(state.model["item_embedding.weight"].shape[0])
            self.model.load_state_dict(state.model)
            self.opt = make_optimizer(self.model, cfg)
            self.opt.load_state_dict(state.optimizer)
            log.info("resumed from checkpoint: round %d, %d events trained, positions %s, %d items",
                     state.step, state.trained_events, state.offsets, len(self.vocab))
        self.model.eval()
        st = self.state
        st.user_seqs = OrderedDict(st.user_seqs)
        if len(st.item_last_seen_ms) != len(st.item_counts):
            st.item_last_seen_ms = np.zeros(len(st.item_counts), np.int64)
        self.sketch = AdmissionSketch(cfg.admission_sketch_width, st.admission_sketch if st.admission_sketch.size
                                      else None, st.admission_added)
        self._last_retention = float("-inf")
        self.generator = torch.Generator().manual_seed(cfg.seed + self.state.step)
        self.scaler = make_grad_scaler(cfg.precision, "cpu", cfg.fp16_init_scale)  # fp16 loss scale, kept across rounds
        self.elastic_metrics = ElasticMetrics(self.metrics.registry)
        self.tracing = start_tracing(cfg.tracing, "livetower-trainer")
        self.read_ahead = ReadAhead()  # events short rounds read ahead of the next full round (short_rounds.py)
        self.last_short = float("-inf")  # monotonic time of the last short round

    def _empty_model(self, rows: int) -> TwoTower:
        """An untrained model of this trainer's kind with `rows` table rows (a state dict is loaded into it)."""
        model_cfg, st = ModelConfig.from_dict(self.state.model_config), self.state
        model = TwoTower(model_cfg, rows) if st.feature_config is None else \
            FeatureTwoTower.empty(model_cfg, rows, feature_config_from_state(st.feature_config))
        if st.user_feature_config is not None:
            attach_user_features(model, feature_config_from_state(st.user_feature_config), [])
        return model

    def close(self) -> None:
        """Export the spans still buffered and stop the exporter (the event log is its owner's to close)."""
        self.tracing.shutdown()

    def _span(self, name: str, **attributes):
        """A child span of the current one (the round's) while tracing is on and the round is traced; else
        nothing (an unsampled round's steps must not start traces of their own)."""
        if self.tracing.tracer is None:
            return contextlib.nullcontext()
        from opentelemetry.trace import get_current_span

        if not get_current_span().is_recording():
            return contextlib.nullcontext()
        return self.tracing.tracer.start_as_current_span(name, attributes=attributes or None)

    @property
    def next_offset(self) -> int:
        """The embedded log's next offset (tests and the SQLite path)."""
        return self.state.offsets.get(SOURCE_KEY, 1)

    def lag(self) -> dict[str, int]:
        """Unread events per position key (partition); exported as a metric."""
        lag = self.event_log.lag(self.state.offsets)
        self.metrics.on_lag(lag)
        return lag

    def backlog(self) -> int:
        return sum(self.lag().values())

    def _item_prob(self) -> torch.Tensor:
        c = torch.from_numpy(self.state.item_counts.astype(np.float64))
        return (c / c.sum().clamp_min(1)).float()

    def _count(self, rows: list[int]) -> None:
        np.add.at(self.state.item_counts, rows, 1)

    def run_round(self) -> RoundResult | None:
        """One round, step by step (module docstring). None when it trained nothing: no new event, or training
        failed on every worker count (then its events are read again by the next round)."""
        if self.tracing.tracer is None or not self.tracing.sampled({}):
            return self._round(None)
        with self.tracing.tracer.start_as_current_span("trainer.round",
                                                       attributes={"round": self.state.step + 1}) as span:
            return self._round(span)

    def _round(self, span) -> RoundResult | None:
        with self._span("read"):
            batch, placed = self._read_batch()
        if batch is None:
            if span is not None:
                span.set_attribute("events", 0)
            return None
        t0 = time.perf_counter()
        if span is not None:
            span.set_attribute("events", len(batch.events))
        with self._span("train", events=len(batch.events)):
            epoch, n_items = self.state.vocab_epoch, len(self.vocab)
            split = split_round(self._add_items(batch.events, placed), self.state.user_seqs,
                                max_eval_users=self.cfg.max_eval_users, seed=self.cfg.seed + self.state.step)
            self._prepare_fork(split, epoch, n_items)
            trained = self._train(split, len(batch.events))
        if not trained:
            self.read_ahead.put_back(batch)  # read once (a Kafka source drops re-read event ids as duplicates)
            if span is not None:
                span.set_attribute("gate", "train_failed")
            return None
        with self._span("eval", holdout_users=len(split.holdout)):
            metrics = self._evaluate(split)
            gate = gate_decision(metrics, self.cfg)
        self._log_gate(metrics, gate)
        with self._span("commit"):
            self._fold_in(split)
            self._commit(batch, split, metrics, gate)
            self.read_ahead.committed(keep_fork=gate == "failed")
        version = self.publish(metrics, gate) if gate != "failed" else 0
        if span is not None:
            span.set_attributes({"gate": gate, "published_version": version})
        self.metrics.rounds.labels(gate).inc()
        self.metrics.round_seconds.set(time.perf_counter() - t0)
        return RoundResult(len(batch.events), len(split.holdout), metrics, gate, version, time.perf_counter() - t0)

    def _read_batch(self) -> tuple[EventBatch | None, int]:
        """(the events after the checkpointed positions, up to max_round_events: the read-ahead buffer of short
        rounds first, how many of them are buffered), or (None, 0) when there are none; a batch of dead letters
        only still moves the positions past them (checkpointed)."""
        st, ahead = self.state, self.read_ahead
        limit = self.cfg.max_round_events - len(ahead.events)
        batch = self.event_log.read_batch(ahead.start(st.offsets), limit) if limit > 0 else \
            EventBatch([], ahead.start(st.offsets))
        self.metrics.dead_letters.inc(batch.dead_lettered)
        buffered, placed = ahead.take()
        ahead.next_offsets = dict(batch.next_offsets)
        if buffered or batch.events:
            return EventBatch(buffered + batch.events, batch.next_offsets, batch.dead_lettered), placed
        if batch.next_offsets != st.offsets:
            st.offsets = batch.next_offsets
            self._checkpoint()
        return None, 0

    def _add_items(self, events: list[StoredEvent], placed: int = 0) -> dict[str, list[int]]:
        """Each user's item rows in this batch, in order; events of items without a row are left out. Expired
        items are evicted, new ones admitted once counted often enough (trainer/items.py); the item table (with
        its optimizer state and the per-row arrays) grows to fit them. The first `placed` events were placed by
        a short round already (the admission sketch counts an event once)."""
        if placed < len(events):
            r = place_items(events[placed:], state=self.state, vocab=self.vocab, sketch=self.sketch,
                            model=self.model, opt=self.opt, cfg=self.cfg, now_ms=int(time.time() * 1000))
            if r.evicted:
                log.info("evicted %d items unseen for %gs; %d live items renumbered, table %d rows", r.evicted,
                         self.cfg.item_ttl_s, len(self.vocab), self.model.num_rows)
            self.metrics.on_items(r, table_rows=self.model.num_rows, vocab=len(self.vocab))
            self._refresh_features()
            if not placed:
                return r.rows_by_user
        return map_rows(events, self.vocab)[0]

    def _refresh_features(self) -> None:
        """Feature item tower: new rows get their catalogue features, changed records their new ones."""
        if isinstance(self.model, FeatureTwoTower) and self.catalog is not None:
            self.state.catalog_version, n = refresh_rows(self.model, self.vocab, self.catalog,
                                                         self.state.catalog_version)
            if n:
                log.info("item features: %d row(s) assigned from the catalogue (version %d)", n,
                         self.state.catalog_version)

    def _train(self, split: RoundSplit, n_events: int) -> bool:
        """Train the round's new windows (held-out events excepted), mixed with replayed windows of earlier users,
        on the workers the elastic policy picks. False when every worker count failed: the model, optimizer and
        item counts are then as they were."""
        cfg, st = self.cfg, self.state
        rows, windows, users = new_windows(split, self.model.cfg.max_history)
        counts_before = st.item_counts.copy()
        self._count(rows)
        n_new = len(windows)
        replayed, replay_users = self._replay_windows(int(cfg.replay_fraction * n_new), exclude=split.new_by_user)
        windows += replayed
        users += replay_users
        log.info("round %d: %d events from %d users (%d new + %d replayed windows), %d held out, %d items",
                 st.step + 1, n_events, len(split.new_by_user), n_new, len(windows) - n_new, len(split.holdout),
                 len(self.vocab))
        if not windows:
            return True
        choice = choose_workers(n_events, cfg.elastic, devices=self.devices,
                                events_per_s_per_worker=self.rate_per_worker)
        record_choice(choice, self.elastic_metrics)
        try:
            stats = train_windows_elastic(
                self.model, self.opt, *stack_windows(windows), item_prob_R=self._item_prob(), n_items=len(self.vocab),
                cfg=cfg, epochs=cfg.epochs_per_round, generator=self.generator, workers=choice.workers,
                progress=lambda m: log.info("round %d %s", st.step + 1, m), scaler=self.scaler,
                metrics=self.elastic_metrics, users_W=window_user_rows(self.model, users, self.catalog),
                after_step=self._between_steps if cfg.short_round_max_events else None)
        except RoundFailed as e:  # model and optimizer unchanged, positions not advanced: the next round retries
            log.error("round %d failed on every worker count tried: %s; its events are read again next round",
                      st.step + 1, e)
            st.item_counts = counts_before
            return False
        self.rate_per_worker = stats.events_per_s_per_worker
        return True

    def _fold_in(self, split: RoundSplit) -> None:
        """After the evaluation, one epoch on the held-out events, so nothing consumed goes untrained (short rounds
        run between its steps too: with many held-out users it takes seconds)."""
        if not split.holdout:
            return
        T = self.model.cfg.max_history
        self._count([split.seqs[u][-1] for u in split.holdout])
        fold, users = windows_of_users(((u, split.seqs[u], 1) for u in split.holdout), T)
        train_windows(self.model, self.opt, *stack_windows(fold), item_prob_R=self._item_prob(),
                      users_W=window_user_rows(self.model, users, self.catalog),
                      n_items=len(self.vocab), cfg=self.cfg, epochs=1, generator=self.generator, scaler=self.scaler,
                      after_step=self._between_steps if self.cfg.short_round_max_events else None)

    def _commit(self, batch: EventBatch, split: RoundSplit, metrics: dict[str, float], gate: str) -> None:
        """Move the state past the batch (histories, positions, counters, the round's history line), append the
        ledger, checkpoint atomically, and only then commit the positions to the event log."""
        st, events = self.state, batch.events
        self.remember_users(split.seqs)
        st.offsets = batch.next_offsets
        st.trained_events += len(events)
        # Event time, but never past this trainer's clock: one future-stamped event must not move it for good.
        st.watermark_ms = watermark_after(st.watermark_ms, events, int(time.time() * 1000))
        st.step += 1
        st.model_published = False
        st.history.append({"round": st.step, "events": len(events), "gate": gate, **metrics})
        if self.ledger_path is not None:
            self._write_ledger(st.step, events)
        self._checkpoint()
        self.event_log.commit(st.offsets)
        self._retain()
        self.metrics.events_trained.inc(len(events))
        self.metrics.watermark.set(st.watermark_ms / 1000)

    def remember_users(self, seqs: dict[str, list[int]]) -> None:
        """Keep the round's users' newest rows (LRU over users, at most max_users)."""
        dropped = remember_users(self.state.user_seqs, seqs, T=self.model.cfg.max_history,
                                 max_users=self.cfg.max_users)
        self.metrics.on_users(len(self.state.user_seqs), dropped)

    def _retain(self) -> None:
        """Event-log retention (SQLite log; a Kafka topic has the broker's), at most every retention.interval_s.
        Only below every consumer's committed offset, so after this trainer's commit."""
        retain = getattr(self.event_log, "retain", None)
        if retain is None or time.monotonic() - self._last_retention < self.cfg.retention.interval_s:
            return
        self._last_retention = time.monotonic()
        try:
            r = retain(self.cfg.retention)
        except Exception:  # noqa: BLE001 - retention is housekeeping: a busy log is tried again next time
            log.exception("event-log retention failed; retried after the next round")
            return
        if r.events_deleted or r.dead_letters_deleted:
            log.info("retention: deleted %d consumed events and %d dead letters", r.events_deleted,
                     r.dead_letters_deleted)
        self.metrics.on_retention(r.events_deleted, r.dead_letters_deleted)

    def _replay_windows(self, n: int, *, exclude) -> tuple[list, list[str]]:
        """Up to n windows over the kept sequences of users not in this round (seeded, reproducible), and the user
        of each."""
        if n <= 0:
            return [], []
        T, st = self.model.cfg.max_history, self.state
        users = [u for u, seq in st.user_seqs.items() if len(seq) >= 2 and u not in exclude]
        rng = np.random.default_rng(self.cfg.seed + 7919 * st.step)
        picked = rng.permutation(len(users))[:n]
        return windows_of_users(((users[i], st.user_seqs[users[i]], len(st.user_seqs[users[i]])) for i in picked), T)

    def _write_ledger(self, step: int, events) -> None:
        with open(self.ledger_path, "a", encoding="utf-8") as f:
            pid = os.getpid()
            f.write("".join(f"{step}\t{pid}\t{ev.event_id}\n" for ev in events))
            f.flush()
            os.fsync(f.fileno())

    def _checkpoint(self) -> None:
        st = self.state
        st.model = self.model.state_dict()
        st.optimizer = self.opt.state_dict()
        st.vocab = list(self.vocab.ids)
        st.admission_sketch, st.admission_added = self.sketch.table, self.sketch.added
        save_checkpoint(self.checkpoint_dir, st)

    def run(self, stop: threading.Event) -> None:
        """Rounds until `stop` is set: on backlog >= round_min_events, or on any backlog after round_interval_s."""
        last_round = float("-inf")
        poll_s = self.cfg.poll_interval_s if self.cfg.short_round_max_events == 0 else \
            min(self.cfg.poll_interval_s, self.cfg.short_round_interval_s / 4)
        while not stop.is_set():
            backlog = self.backlog()  # since the last full round: the read-ahead buffer included
            due = backlog >= self.cfg.round_min_events or (
                backlog > 0 and time.monotonic() - last_round >= self.cfg.round_interval_s)
            if due:
                self.run_round()
                last_round = time.monotonic()
            elif self._short_round_due(backlog):
                self.last_short = time.monotonic()
                self.run_short_round()
            else:
                stop.wait(poll_s)
