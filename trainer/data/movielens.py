"""MovieLens-100k as time-ordered events (the data stays in ../shared/data; never copy it here)."""

from __future__ import annotations

from pathlib import Path

from proto import livetower_v1_pb2 as pb


def load_ml100k(directory: Path) -> list[pb.Event]:
    """u.data (`user \\t item \\t rating \\t unix_ts`) -> events sorted by time, ties kept in file order
    per user (stable). user ids "u<id>", item ids "m<id>", action "rate", weight = rating."""
    path = Path(directory) / "u.data"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: pass the ml-100k directory (e.g. ../shared/data/ml-100k)")
    rows = []
    with open(path) as f:
        for line_no, line in enumerate(f):
            user, item, rating, ts = line.split("\t")
            rows.append((int(ts), int(user), line_no, int(item), float(rating)))
    rows.sort()
    return [pb.Event(event_id=f"ml100k-{u}-{i}", user_id=f"u{u}", item_id=f"m{i}", action="rate",
                     weight=r, timestamp_ms=ts * 1000) for ts, u, _, i, r in rows]
