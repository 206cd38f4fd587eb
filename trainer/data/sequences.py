"""Per-user item sequences from the public data sets used for offline quality evaluation.

The data stays in ../shared/data (research-only licences): loaders take a path and never copy it.
Items keep the data set's own 1-based integer ids, so row r of a model trained here is item r.

- `games`: SASRec's Amazon "Games" file (`sasrec/Video.txt`, lines `user item`, 1-based ids, each
  user's lines contiguous and in time order; no timestamps).
- `ml100k`: MovieLens-100k `u.data` (`user \\t item \\t rating \\t unix_ts`), parsed by movielens.read_udata
  (as the event loader is), sorted per user by (timestamp, line number) so timestamp ties keep file order.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainer.data.movielens import read_udata

# Relative to the repository root (the data is never committed; pass --data to override).
DEFAULT_PATHS = {"games": Path("../shared/data/sasrec/Video.txt"),
                 "ml100k": Path("../shared/data/ml-100k/u.data")}
DATASETS = tuple(DEFAULT_PATHS)


@dataclass(kw_only=True, slots=True)
class SequenceData:
    name: str                                 # data set name ("games", "ml100k", or a test name)
    items: list[np.ndarray]                   # per user: int64 item ids in 1..n_items, oldest first
    times: list[np.ndarray] | None = None     # per user: int64 unix seconds aligned with items; None if absent
    n_items: int                              # largest item id (ids are 1..n_items; 0 is padding)

    def __post_init__(self) -> None:
        if self.n_items < 1:
            raise ValueError(f"SequenceData.n_items must be >= 1, got {self.n_items}")
        if self.times is not None and len(self.times) != len(self.items):
            raise ValueError(f"SequenceData.times has {len(self.times)} users, items has {len(self.items)}")
        for u, seq in enumerate(self.items):
            if len(seq) and (seq.min() < 1 or seq.max() > self.n_items):
                raise ValueError(f"SequenceData.items[{u}] holds ids outside 1..{self.n_items}")

    @property
    def n_users(self) -> int:
        return len(self.items)

    @property
    def n_actions(self) -> int:
        return int(sum(len(s) for s in self.items))

    def summary(self) -> dict:
        return {"dataset": self.name, "users": self.n_users, "items": self.n_items, "actions": self.n_actions,
                "has_timestamps": self.times is not None}


def load_sasrec_txt(path: Path, name: str = "games") -> SequenceData:
    """SASRec-format file: `user item` per line, 1-based, each user's lines contiguous and time-ordered."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: pass the SASRec data file (e.g. ../shared/data/sasrec/Video.txt)")
    arr = np.loadtxt(path, dtype=np.int64, ndmin=2)  # (A, 2)
    users, items = arr[:, 0], arr[:, 1]
    order = np.argsort(users, kind="stable")  # keeps each user's file (= time) order
    users, items = users[order], items[order]
    n_users = int(users.max())
    bounds = np.searchsorted(users, np.arange(1, n_users + 2))
    seqs = [items[bounds[u]:bounds[u + 1]].copy() for u in range(n_users)]
    return SequenceData(name=name, items=[s for s in seqs if len(s)], n_items=int(items.max()))


def load_ml100k_sequences(path: Path) -> SequenceData:
    """u.data file (or the ml-100k directory holding it) -> per-user sequences with timestamps."""
    path = Path(path)
    if path.is_dir():
        path = path / "u.data"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: pass ml-100k/u.data (e.g. ../shared/data/ml-100k/u.data)")
    arr = read_udata(path)  # (A, 4): user, item, rating, ts in file order (the parser load_ml100k uses too)
    line_A = np.arange(len(arr))
    order = np.lexsort((line_A, arr[:, 3], arr[:, 0]))  # by user, then time, then line (stable ties)
    arr = arr[order]
    users = arr[:, 0]
    bounds = np.flatnonzero(np.diff(users)) + 1
    starts, ends = np.r_[0, bounds], np.r_[bounds, len(arr)]
    return SequenceData(name="ml100k", items=[arr[a:b, 1].copy() for a, b in zip(starts, ends)],
                        times=[arr[a:b, 3].copy() for a, b in zip(starts, ends)], n_items=int(arr[:, 1].max()))


def load_dataset(name: str, path: Path | None = None) -> SequenceData:
    if name not in DEFAULT_PATHS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {name!r}")
    path = Path(path) if path is not None else DEFAULT_PATHS[name]
    return load_sasrec_txt(path) if name == "games" else load_ml100k_sequences(path)
