"""MovieLens-100k: the one parser of u.data, and the data as time-ordered events (the data stays in
../shared/data; never copy it here). trainer/data/sequences.py builds its per-user sequences from
`read_udata` too."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from proto import livetower_v1_pb2 as pb

UDATA_COLUMNS = ("user", "item", "rating", "timestamp")


def read_udata(path: Path) -> np.ndarray:
    """u.data (`user \\t item \\t rating \\t unix_ts` per line, integers) -> (A, 4) int64 rows in file order,
    columns UDATA_COLUMNS. The caller checks the path (each loader words its own error)."""
    arr = np.loadtxt(path, dtype=np.int64, delimiter="\t", ndmin=2)
    if arr.size == 0:
        return np.zeros((0, 4), np.int64)
    if arr.shape[1] != 4:
        raise ValueError(f"{path}: expected 4 tab-separated columns {UDATA_COLUMNS}, got {arr.shape[1]}")
    return arr


def load_ml100k(directory: Path) -> list[pb.Event]:
    """u.data (`user \\t item \\t rating \\t unix_ts`) -> events sorted by time, ties kept in file order
    per user (stable). user ids "u<id>", item ids "m<id>", action "rate", weight = rating."""
    path = Path(directory) / "u.data"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: pass the ml-100k directory (e.g. ../shared/data/ml-100k)")
    rows = read_udata(path)
    # by time, then user, then line (so a user's tied events keep file order)
    rows = rows[np.lexsort((np.arange(len(rows)), rows[:, 0], rows[:, 3]))]
    return [pb.Event(event_id=f"ml100k-{u}-{i}", user_id=f"u{u}", item_id=f"m{i}", action="rate",
                     weight=float(r), timestamp_ms=ts * 1000) for u, i, r, ts in rows.tolist()]
