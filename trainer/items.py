"""Which item ids get a row of the trainer's item table: admission after a minimum count, eviction after a TTL.

Admission: an id not in the vocabulary is counted in a count-min sketch (fixed size, whatever the number of
distinct ids) and joins the vocabulary once its count reaches `item_min_count`, at most
`max_new_items_per_round` ids per round (first seen first). Until then its events are consumed but train
nothing and stay out of the users' sequences (like padding). The sketch's counters (uint16, saturating) are
halved every `width / 2` additions, so ids that stop arriving fade instead of filling it: an id must reach
item_min_count within about that many events of all unknown ids, and a cell holds well under one other id on
average, which keeps false admissions of ids seen once rare (measured: benchmarks/hardening_state.py items).

Eviction (compaction): items whose newest event is older than `item_ttl_s` before the event-time
watermark lose their rows; the live items are renumbered densely 1..n in their old order, the embedding
rows, optimizer moments, weight average, counts and user sequences move with them, and the rows freed at
the end are reinitialised for the items admitted next. The table capacity never shrinks, so the
architecture hash (table rows) stays and a refit of the parent's graph stays possible.

The invariant this relies on: an engine is self-contained. Its item_ids.json and its weights (the table
included) agree row for row; rows mean nothing across engines. Between compactions the vocabulary is
append-only (a child's id list extends its parent's, the server shares one Vocabulary); after one the list
no longer extends the parent's, and the server's VocabularyPool builds a fresh Vocabulary for it (a
one-off parse). The trainer's own gate compares against the serving model by rows, so across a compaction
(`vocab_epoch` differs) that comparison is skipped for one baseline and the gate is the popularity bar alone.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter, OrderedDict, defaultdict
from typing import TYPE_CHECKING, Iterable, NamedTuple

import numpy as np
import torch

from contracts.eventlog import StoredEvent
from trainer import ema
from trainer.checkpoint import TrainerState
from trainer.model import TwoTower
from trainer.model_config import INIT_STD
from trainer.training import grow_table
from trainer.vocab import ItemVocab, table_rows_for

if TYPE_CHECKING:
    from trainer.config import TrainConfig

log = logging.getLogger("livetower.trainer")

SKETCH_DEPTH = 4


class AdmissionSketch:
    """Count-min sketch (conservative update) of events per not-yet-admitted item id."""

    def __init__(self, width: int, table: np.ndarray | None = None, added: int = 0) -> None:
        if table is not None and table.shape != (SKETCH_DEPTH, width):
            table = None  # width changed by configuration: start counting afresh
        self.width = width
        self.table = table if table is not None else np.zeros((SKETCH_DEPTH, width), np.uint16)
        self.added = added  # additions since the last halving

    def _cells(self, ids: list[str]) -> np.ndarray:
        """(len(ids), depth) column of each id in each row (blake2b: stable across processes, unlike hash())."""
        raw = b"".join(hashlib.blake2b(i.encode(), digest_size=4 * SKETCH_DEPTH).digest() for i in ids)
        return (np.frombuffer(raw, np.uint32).reshape(len(ids), SKETCH_DEPTH) % self.width).astype(np.int64)

    def add(self, counts: dict[str, int]) -> dict[str, int]:
        """Count each id `counts[id]` more times; returns each id's estimated total."""
        if not counts:
            return {}
        ids = list(counts)
        cells = self._cells(ids)
        depth = np.arange(SKETCH_DEPTH)
        est = self.table[depth, cells].min(axis=1).astype(np.int64) + np.fromiter(counts.values(), np.int64, len(ids))
        est = np.minimum(est, np.iinfo(np.uint16).max)
        for d in range(SKETCH_DEPTH):  # conservative update: raise each cell to the new estimate, no further
            np.maximum.at(self.table[d], cells[:, d], est.astype(np.uint16))
        self.added += int(sum(counts.values()))
        if self.added >= self.width // 2:
            self.table >>= 1
            self.added = 0
        return dict(zip(ids, est.tolist()))


def admit(vocab: ItemVocab, item_ids: Iterable[str], sketch: AdmissionSketch, *, min_count: int,
          max_new: int) -> list[str]:
    """Count the round's events of unknown ids (in order) and add to `vocab` those that reach min_count, at
    most max_new (first seen first). Returns the ids added."""
    unknown = Counter(i for i in item_ids if i not in vocab.row_of)
    if not unknown:
        return []
    if min_count <= 1:
        eligible = list(unknown)
    else:
        est = sketch.add(unknown)
        eligible = [i for i in unknown if est[i] >= min_count]
    added = eligible[:max_new]
    for i in added:
        vocab.add(i)
    return added


def expired_rows(last_seen_ms: np.ndarray, n_items: int, now_ms: int, ttl_s: float) -> np.ndarray:
    """Rows 1..n_items whose newest event is older than ttl_s before now_ms (none when ttl_s is 0)."""
    if ttl_s <= 0 or n_items == 0:
        return np.zeros(0, np.int64)
    return np.flatnonzero(last_seen_ms[1:n_items + 1] < now_ms - int(ttl_s * 1000)) + 1


@torch.no_grad()
def compact(model: TwoTower, opt: torch.optim.Optimizer, vocab: ItemVocab, evict: np.ndarray,
            per_row: list[np.ndarray], user_seqs: dict[str, list[int]]) -> np.ndarray:
    """Drop the rows `evict`, renumber the live ones densely (order kept) in place: the embedding weight (the
    Parameter object stays, so the optimizer's references hold), its optimizer moments and weight average,
    each array of `per_row` (zeros for the freed rows), the vocabulary and the user sequences (evicted items
    leave them). Returns old row -> new row (0: evicted)."""
    n = len(vocab)
    live = np.ones(n + 1, bool)
    live[0] = False
    live[evict] = False
    keep = np.flatnonzero(live)                       # old rows kept, ascending
    remap = np.zeros(model.num_rows, np.int64)
    remap[keep] = np.arange(1, len(keep) + 1)
    src = torch.from_numpy(keep)
    m, tail = len(keep), slice(len(keep) + 1, n + 1)  # freed rows: m+1 .. n
    weight = model.item_embedding.weight
    weight[1:m + 1] = weight[src].clone()
    torch.nn.init.normal_(weight[tail], std=INIT_STD)
    state = opt.state.get(weight, {})
    for key in ("exp_avg", "exp_avg_sq"):
        if key in state:
            state[key][1:m + 1] = state[key][src].clone()
            state[key][tail] = 0
    if ema.EMA_KEY in state:
        avg = state[ema.EMA_KEY]
        avg[1:m + 1] = avg[src].clone()
        avg[tail] = weight[tail]
    for arr in per_row:
        arr[1:m + 1] = arr[keep]
        arr[m + 1:] = 0
    for buf in model.row_buffers():  # item features and has-id flags of a feature item tower
        buf[1:m + 1] = buf[src].clone()
        buf[m + 1:] = 0
    ids = vocab.ids
    vocab.ids = [ids[r - 1] for r in keep]
    vocab.row_of = {item: row for row, item in enumerate(vocab.ids, start=1)}
    for u, seq in user_seqs.items():
        user_seqs[u] = [int(remap[r]) for r in seq if remap[r]]
    return remap


class ItemRound(NamedTuple):
    rows_by_user: dict[str, list[int]]  # each user's item rows of the round, in order (unadmitted items left out);
                                        # users ordered by their last event, least recent first
    admitted: int                       # ids added to the vocabulary
    evicted: int                        # rows freed by the TTL
    unadmitted_events: int              # events of ids without a row (counted toward admission)


def place_items(events: list[StoredEvent], *, state: TrainerState, vocab: ItemVocab, sketch: AdmissionSketch,
                model: TwoTower, opt: torch.optim.Optimizer, cfg: TrainConfig, now_ms: int) -> ItemRound:
    """A round's items: refresh the last-seen times of known items, evict the expired ones (compaction), admit
    new ids, grow the table if they need it, and map every event of an item with a row to that row."""
    last_seen = state.item_last_seen_ms
    clamp = lambda ts: min(ts, now_ms)  # noqa: E731 - a future-stamped event must not keep an item alive
    for ev in events:
        if row := vocab.row_of.get(ev.item_id):
            last_seen[row] = max(last_seen[row], clamp(ev.timestamp_ms))
    now_event_ms = max(state.watermark_ms, clamp(max(ev.timestamp_ms for ev in events)))
    evict = expired_rows(last_seen, len(vocab), now_event_ms, cfg.item_ttl_s)
    if len(evict):
        compact(model, opt, vocab, evict, [state.item_counts, last_seen], state.user_seqs)
        state.vocab_epoch += 1
    admitted = admit(vocab, (ev.item_id for ev in events), sketch, min_count=cfg.item_min_count,
                     max_new=cfg.max_new_items_per_round)
    rows_needed = table_rows_for(len(vocab))
    if rows_needed > model.num_rows:
        log.info("growing the item table %d -> %d rows", model.num_rows, rows_needed)
        grow_table(model, opt, rows_needed)
        pad = np.zeros(rows_needed - len(state.item_counts), np.int64)
        state.item_counts = np.concatenate([state.item_counts, pad])
        state.item_last_seen_ms = last_seen = np.concatenate([last_seen, pad])
    for ev in events:
        if row := vocab.row_of.get(ev.item_id):
            last_seen[row] = max(last_seen[row], clamp(ev.timestamp_ms))
    rows_by_user, unadmitted = map_rows(events, vocab)
    return ItemRound(rows_by_user, len(admitted), len(evict), unadmitted)


def map_rows(events: list[StoredEvent], vocab: ItemVocab) -> tuple[dict[str, list[int]], int]:
    """({user: rows of its events' items, in order}, events whose item has no row). Users least recently active
    first (the LRU order of TrainerState.user_seqs)."""
    rows_by_user: dict[str, list[int]] = defaultdict(list)
    last_event: dict[str, int] = {}
    unadmitted = 0
    for i, ev in enumerate(events):
        if row := vocab.row_of.get(ev.item_id):
            rows_by_user[ev.user_id].append(row)
            last_event[ev.user_id] = i
        else:
            unadmitted += 1
    by_recency = sorted(rows_by_user, key=last_event.__getitem__)
    return {u: rows_by_user[u] for u in by_recency}, unadmitted


def remember_users(user_seqs: OrderedDict[str, list[int]], seqs: dict[str, list[int]], *, T: int,
                   max_users: int) -> int:
    """Keep each user's newest T rows, most recently active last; drop the least recently active beyond
    max_users. Returns how many were dropped."""
    for u, seq in seqs.items():
        user_seqs[u] = seq[-T:]
        user_seqs.move_to_end(u)
    dropped = 0
    while len(user_seqs) > max_users:
        user_seqs.popitem(last=False)
        dropped += 1
    return dropped
