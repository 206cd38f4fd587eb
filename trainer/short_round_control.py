"""The trainer's short rounds (trainer/short_rounds.py explains them): when they run, what they read, train and
publish. A mixin of trainer.loop.Trainer, whose state (cfg, state, vocab, model, opt, read_ahead, event_log) it
uses."""

from __future__ import annotations

import logging
import time
from trainer.export.build import BuildInfo
from trainer.items import map_rows
from trainer.round_types import RoundResult, RoundSplit
from trainer.short_rounds import Fork, merge_rows, short_metrics, train_fork, windows_after
from trainer.user_features import window_user_rows

log = logging.getLogger("livetower.trainer")


class ShortRoundControl:
    def run_short_round(self, *, in_full_round: bool = False) -> RoundResult | None:
        """A short round (trainer/short_rounds.py): read what arrived (at most short_round_max_events) into the
        read-ahead buffer, train the fork one pass over the events it has not trained and publish it. None when
        there is nothing to train or no published base to fork. Nothing is committed: a full round trains the
        buffer. in_full_round: called between a full round's steps (no item placement: the table is in use)."""
        cfg, st, ahead = self.cfg, self.state, self.read_ahead
        if ahead.fork is None and (in_full_round or not st.model_published):
            return None
        t0 = time.perf_counter()
        batch = self.event_log.read_batch(ahead.start(st.offsets), cfg.short_round_max_events)
        self.metrics.dead_letters.inc(batch.dead_lettered)
        ahead.add(batch)
        if not in_full_round:
            epoch = st.vocab_epoch
            if ahead.placed < len(ahead.events):
                self._add_items(ahead.events[ahead.placed:])
                ahead.placed = len(ahead.events)
            if st.vocab_epoch != epoch or ahead.fork is None:  # rows renumbered (evictions), or no fork yet
                if not st.model_published:  # a kept fork's rows moved, and the model's gate failed: no base
                    ahead.fork = None
                    return None
                ahead.fork, ahead.trained = Fork.of(self.model, self.opt, cfg, st.published_version,
                                                    st.trained_events, st.watermark_ms, len(self.vocab)), 0
            ahead.fork.n_items = len(self.vocab)  # items just placed: their events are in this round's windows
        if ahead.trained == len(ahead.events):
            return None
        todo = ahead.events[ahead.trained:]
        context = merge_rows(ahead.in_round, map_rows(ahead.events[:ahead.trained], self.vocab)[0])
        windows, users = windows_after(context, map_rows(todo, self.vocab)[0], st.user_seqs,
                                       self.model.cfg.max_history)
        ahead.trained, ahead.rounds = len(ahead.events), ahead.rounds + 1
        if not windows:
            return RoundResult(len(todo), 0, {}, "skipped", 0, time.perf_counter() - t0)
        fork = ahead.fork
        fork.grow(self.model)
        served = train_fork(fork, windows, todo, item_prob_R=self._item_prob(), n_items=len(self.vocab), cfg=cfg,
                            seed=cfg.seed + 104729 * st.step + ahead.rounds, now_ms=int(time.time() * 1000),
                            users_W=window_user_rows(fork.model, users, self.catalog))
        metrics = short_metrics(fork.events, len(windows))
        info = BuildInfo(parent=max(st.published_version, ahead.last_version),
                         stream_offsets=ahead.start(st.offsets), watermark_ms=fork.watermark_ms,
                         trained_events=fork.base_trained_events + fork.events, eval_metrics=metrics)
        version = self._build(served, info, n_items=fork.n_items)
        if version:
            ahead.bases[version] = fork.base_version
            ahead.last_version = version
        seconds = time.perf_counter() - t0
        log.info("short round%s: %d new events (%d windows), %d since engine %d -> engine %s in %.2fs",
                 " between full-round steps" if in_full_round else "", len(todo), len(windows), fork.events,
                 fork.base_version, version or "not published", seconds)
        return RoundResult(len(todo), 0, metrics, "short", version, seconds)

    def _prepare_fork(self, split: RoundSplit, vocab_epoch: int, n_items: int) -> None:
        """Before a full round trains: keep (or make, from the published model) the fork its short rounds serve
        from, grown to the table's new rows (not served: n_items, the vocabulary before this round placed its
        items); none after evictions renumbered the rows."""
        if not self.cfg.short_round_max_events:
            return
        ahead, st = self.read_ahead, self.state
        ahead.in_round = split.new_by_user
        if st.vocab_epoch != vocab_epoch:
            ahead.fork = None
        elif ahead.fork is None and st.model_published:
            ahead.fork = Fork.of(self.model, self.opt, self.cfg, st.published_version, st.trained_events,
                                 st.watermark_ms, n_items)
        if ahead.fork is not None:
            ahead.fork.grow(self.model)

    def _between_steps(self, step: int) -> None:
        """After each step of a full round's in-process training: a short round when one is due."""
        if time.monotonic() - self.last_short >= self.cfg.short_round_interval_s:
            self.last_short = time.monotonic()
            self.run_short_round(in_full_round=True)

    def _short_round_due(self, backlog: int) -> bool:
        """Short rounds on, a base to fork (a published model, or a fork kept over a failed gate), their interval
        passed, and events arrived that the fork has not trained."""
        return (self.cfg.short_round_max_events > 0
                and (self.state.model_published or self.read_ahead.fork is not None)
                and time.monotonic() - self.last_short >= self.cfg.short_round_interval_s
                and backlog > self.read_ahead.trained)
