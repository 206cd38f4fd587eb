"""Scoring of a replay (benchmarks/replay.py): next-event Recall@10 / NDCG@10 per event for three recommenders,
grouped into windows of stream order; the summary table and the figure.

Every streamed event e (user u, item i) is a query: u's history = u's items streamed before e (oldest
first), rank the catalogue, hit when i is in the top k. Exclude-seen: items already in u's history are
never recommended (ml-100k has no repeat ratings, so the target is never excluded).
- continuous: the newest engine published before e was appended to the log (`version_at[e]`), as the
  server would serve it: loaded from the registry with `server.engine.engine.Engine` (the torch.export
  user tower, its item matrix and vocabulary; a user with no known item gets the engine's shipped
  popularity list). Items the engine has never seen cannot be recommended.
- frozen: the first published engine, the same way, for every event after it was published.
- popularity: counts of the items over every event streamed before e (updated per event; ties broken
  by first appearance); items never streamed yet cannot be recommended.
The means compare the three on the same events: those appended after the first engine was published
(with a warm-up, every streamed event; the warm-up events themselves are not scored).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

SERIES = ("continuous", "frozen", "popularity")


def score_engine(engine, users: Sequence[int], pos: np.ndarray, seqs: list[list[str]], targets: Sequence[str],
                 idx: np.ndarray, k: int, *, batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(hit, ndcg) arrays for the events `idx` with one loaded Engine."""
    from server.engine.engine import RecommendQuery

    hit, gain = np.zeros(len(idx)), np.zeros(len(idx))
    for s in range(0, len(idx), batch):
        part = idx[s:s + batch]
        queries = [RecommendQuery(seqs[users[e]][:pos[e]], k, True) for e in part]
        for j, (e, ranked) in enumerate(zip(part, engine.recommend_batch(queries))):
            try:
                r = ranked.item_ids.index(targets[e])
            except ValueError:
                continue
            hit[s + j], gain[s + j] = 1.0, 1.0 / math.log2(r + 2)
    return hit, gain


def score_popularity(users: Sequence[int], pos: np.ndarray, seq_idx: list[np.ndarray], target_idx: np.ndarray,
                     n_items: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(hit, ndcg) per event in stream order with popularity over the events before it."""
    n = len(target_idx)
    counts = np.zeros(n_items)
    first = np.full(n_items, -1.0)
    hit, gain = np.zeros(n), np.zeros(n)
    seen_items = 0
    for e in range(n):
        t = target_idx[e]
        hist = np.unique(seq_idx[users[e]][:pos[e]])
        if counts[t] > 0 and not (hist == t).any():  # a repeat of a seen item is excluded, as for the engines
            score = np.where(counts > 0, counts - first / (n_items + 1), -np.inf)
            st = score[t]
            rank = int((score > st).sum() - (score[hist] > st).sum())
            if rank < k:
                hit[e], gain[e] = 1.0, 1.0 / math.log2(rank + 2)
        if counts[t] == 0:
            first[t] = seen_items
            seen_items += 1
        counts[t] += 1
    return hit, gain


def windows(results: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], ts_ms: np.ndarray,
            version_at: np.ndarray, staleness: np.ndarray, every: int, *, first: int = 0) -> list[dict]:
    """results[series] = (hit, ndcg, defined mask) per event -> one row per window of `every` events from `first`."""
    rows = []
    for s in range(first, len(ts_ms), every):
        sl = slice(s, min(s + every, len(ts_ms)))
        row = {"start": s, "end": sl.stop, "t_start_ms": int(ts_ms[sl][0]), "t_end_ms": int(ts_ms[sl][-1]),
               "engine_versions": [int(version_at[sl].min()), int(version_at[sl].max())]}
        ok = version_at[sl] > 0
        row["staleness_events_mean"] = round(float(staleness[sl][ok].mean()), 1) if ok.any() else None
        for name, (hit, gain, defined) in results.items():
            d = defined[sl]
            row[name] = {"events": int(d.sum()),
                         "recall@10": round(float(hit[sl][d].mean()), 4) if d.any() else None,
                         "ndcg@10": round(float(gain[sl][d].mean()), 4) if d.any() else None}
        rows.append(row)
    return rows


def summary(results: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], common: np.ndarray) -> dict:
    """Means over the common events (after the first engine), and over each half of them (drift)."""
    idx = np.flatnonzero(common)
    halves = {"all": idx, "first_half": idx[:len(idx) // 2], "second_half": idx[len(idx) // 2:]}
    out = {}
    for name, (hit, gain, _) in results.items():
        out[name] = {part: {"events": len(ix),
                            "recall@10": round(float(hit[ix].mean()), 4) if len(ix) else None,
                            "ndcg@10": round(float(gain[ix].mean()), 4) if len(ix) else None}
                     for part, ix in halves.items()}
    return out


def _fmt(m: dict | None) -> str:
    if not m or m.get("recall@10") is None:
        return f"{'-':>15}"
    return f"{m['recall@10']:.4f}/{m['ndcg@10']:.4f}".rjust(15)


def format_table(rows: list[dict], summ: dict, day: Callable[[int], str]) -> str:
    head = f"{'events':>13} {'stream dates':>23} {'engines':>9} {'lag':>6} " + " ".join(
        f"{s + ' R/N@10':>15}" for s in SERIES)
    lines = [head]
    for r in rows:
        v0, v1 = r["engine_versions"]
        lag = "-" if r["staleness_events_mean"] is None else f"{r['staleness_events_mean']:.0f}"
        lines.append(f"{r['start']:>6}-{r['end']:<6} {day(r['t_start_ms']):>11}..{day(r['t_end_ms']):<10} "
                     f"{f'{v0}-{v1}':>9} {lag:>6} " + " ".join(_fmt(r[s]) for s in SERIES))
    for part in ("all", "first_half", "second_half"):
        n = summ[SERIES[0]][part]["events"]
        lines.append(f"{'mean ' + part.replace('_', ' '):>24} ({n} events){'':>14}"
                     + " ".join(_fmt(summ[s][part]) for s in SERIES))
    return "\n".join(lines)


def plot(path: Path, rows: list[dict], publishes: list[dict], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    mid = np.array([(r["t_start_ms"] + r["t_end_ms"]) // 2 for r in rows], dtype="datetime64[ms]")
    fig, axes = plt.subplots(3, 1, figsize=(10, 9), sharex=True, gridspec_kw={"height_ratios": [3, 3, 1.4]})
    style = {"continuous": ("tab:blue", "o"), "frozen": ("tab:orange", "s"), "popularity": ("tab:gray", "^")}
    for ax, metric in zip(axes[:2], ("recall@10", "ndcg@10")):
        for s in SERIES:
            y = [np.nan if r[s][metric] is None else r[s][metric] for r in rows]
            ax.plot(mid, y, label=s, color=style[s][0], marker=style[s][1], ms=4)
        ax.set_ylabel(f"next-event {metric.replace('recall', 'Recall').replace('ndcg', 'NDCG')}")
        ax.grid(alpha=0.3)
    axes[0].legend(loc="best")
    axes[0].set_title(title, fontsize=10)
    if publishes:
        t = np.array([p["t_stream_ms"] for p in publishes], dtype="datetime64[ms]")
        axes[2].step(t, [p["version"] for p in publishes], where="post", color="tab:blue")
    axes[2].set_ylabel("engine version")
    axes[2].set_xlabel("stream time (event time of the events being appended)")
    axes[2].xaxis.set_major_formatter(mdates.DateFormatter("%Y-%m-%d"))
    axes[2].grid(alpha=0.3)
    fig.autofmt_xdate()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
