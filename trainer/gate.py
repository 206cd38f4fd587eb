"""A full round's publish gate: the held-out events' metrics for the candidate, popularity and the serving model
(`RoundGate`, a mixin of trainer.loop.Trainer, whose state it uses), and the decision (`gate_decision`, a pure
function of them)."""

from __future__ import annotations

import logging
import math

import numpy as np

from trainer import ema
from trainer.config import TrainConfig
from trainer.evaluate import evaluate_model, evaluate_popularity
from trainer.examples import left_pad
from trainer.round_types import RoundSplit
from trainer.user_features import window_user_rows

log = logging.getLogger("livetower.trainer")


def holdout_arrays(split: RoundSplit, T: int) -> tuple[np.ndarray, np.ndarray]:
    """(hist_BT, tgt_B): each held-out user's history before its newest event (left-padded), and that event."""
    hist_BT = np.stack([left_pad(split.seqs[u][:-1], T) for u in split.holdout])
    return hist_BT, np.asarray([split.seqs[u][-1] for u in split.holdout], np.int64)


def gate_decision(metrics: dict[str, float], cfg: TrainConfig) -> str:
    """The round's gate from its metrics (Trainer._evaluate): "skipped" below cfg.min_eval_users held-out users;
    else "passed" when the model's Recall@10 is >= gate_min_ratio x popularity's and, when a serving model was
    evaluated (serving_recall@10), >= gate_min_vs_serving x the serving model's less 2 standard errors of the
    difference; else "failed"."""
    n = metrics["holdout_users"]
    if n < cfg.min_eval_users:
        return "skipped"
    model = metrics["model_recall@10"]
    ok = model >= cfg.gate_min_ratio * metrics["popularity_recall@10"]
    if "serving_recall@10" in metrics:
        serving = metrics["serving_recall@10"]
        # Same users, so a paired comparison; Var(hit_a - hit_b) <= p_a + p_b per user: small holdouts must not
        # fail on noise.
        noise = 2 * math.sqrt((model + serving) / n)
        ok = ok and model >= cfg.gate_min_vs_serving * serving - noise
    return "passed" if ok else "failed"


class RoundGate:
    def _evaluate(self, split: RoundSplit) -> dict[str, float]:
        """The gate's statistics on the held-out events: Recall/NDCG@10 of the model (its weight average), of
        popularity and of the serving model (when this trainer has it); holdout_users alone below
        min_eval_users."""
        metrics: dict[str, float] = {"holdout_users": float(len(split.holdout))}
        if len(split.holdout) < self.cfg.min_eval_users:
            return metrics
        hist_BT, tgt_B = holdout_arrays(split, self.model.cfg.max_history)
        n_items = len(self.vocab)
        model = ema.averaged(self.model, self.opt)
        metrics.update({f"model_{k}": v for k, v in evaluate_model(
            model, hist_BT, tgt_B, n_items, users_B=window_user_rows(model, split.holdout, self.catalog)).items()})
        metrics.update({f"popularity_{k}": v for k, v in
                        evaluate_popularity(self.state.item_counts, tgt_B, n_items).items()})
        baseline_version, serving = self._evaluate_serving(hist_BT, tgt_B, split.holdout)
        if serving is not None:
            metrics.update({f"serving_{k}": v for k, v in serving.items()})
            metrics["gate_baseline_version"] = float(baseline_version)
        return metrics

    def _log_gate(self, metrics: dict[str, float], gate: str) -> None:
        step, n = self.state.step + 1, int(metrics["holdout_users"])
        if gate == "skipped":
            log.info("round %d: %d held-out users < min_eval_users=%d: gate skipped", step, n, self.cfg.min_eval_users)
            return
        serving = "-" if "serving_recall@10" not in metrics else \
            f"v{int(metrics['gate_baseline_version'])} R@10 {metrics['serving_recall@10']:.4f}"
        log.info("round %d eval on %d held-out users: model R@10 %.4f N@10 %.4f | serving %s | "
                 "popularity R@10 %.4f N@10 %.4f -> gate %s", step, n, metrics["model_recall@10"],
                 metrics["model_ndcg@10"], serving, metrics["popularity_recall@10"], metrics["popularity_ndcg@10"],
                 gate)

    def _baseline_version(self) -> int:
        """The version the gate compares against: the server's stable one (rollout.json in the shared
        registry) when this trainer published it, else its own last published version. Comparing with the
        last published one alone is wrong once the server rolls canaries back: it would keep vouching for
        candidates against a model no user sees."""
        stable = self.read_ahead.base_of(self.registry.read_rollout().stable)  # a short engine: its full round's
        return stable if stable in self.state.published_models else self.state.published_version

    def _evaluate_serving(self, hist_BT: np.ndarray, tgt_B: np.ndarray,
                          users: list[str]) -> tuple[int, dict[str, float] | None]:
        """(baseline version, its metrics on the same holdout). It knows only the items of its own table:
        newer history rows are dropped (as the server drops unknown ids) and newer targets count as misses."""
        version = self._baseline_version()
        state = self.state.published_models.get(version)
        if state is None or self.state.published_vocab_epochs.get(version, 0) != self.state.vocab_epoch:
            return version, None  # none, or its rows name other items (a compaction since: trainer/items.py)
        rows = state["item_embedding.weight"].shape[0]
        n_known = min(len(self.vocab), rows - 1)
        served = self._empty_model(rows)
        served.load_state_dict(state)
        known = tgt_B <= n_known
        if not known.any():
            return version, {"recall@10": 0.0, "ndcg@10": 0.0}
        T = hist_BT.shape[1]
        hist = np.stack([left_pad([r for r in h if 0 < r <= n_known], T) for h in hist_BT[known]])
        rows_B = window_user_rows(served, [u for u, k in zip(users, known) if k], self.catalog)
        m = evaluate_model(served, hist, tgt_B[known], n_known, users_B=rows_B)
        return version, {k: v * float(known.mean()) for k, v in m.items()}
