"""Synthetic behaviour with planted structure, to bootstrap and to test the loop.

Items belong to clusters arranged on a ring. Each user's interest sits in one cluster and drifts to
a neighbouring cluster now and then; most actions pick an item of the current cluster (Zipf within
it), the rest a globally popular item. So the last few items predict the next far better than
popularity does, and a model that follows recent actions beats one that does not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from proto import livetower_v1_pb2 as pb


@dataclass(kw_only=True, frozen=True, slots=True)
class SyntheticConfig:
    n_users: int = 2000           # users
    n_items: int = 1000           # items (ids "item-<n>")
    n_clusters: int = 25          # interest clusters on a ring
    events_per_user: int = 30     # events generated per user
    drift_prob: float = 0.08      # chance per event that interest moves to a neighbouring cluster
    in_cluster_prob: float = 0.85  # chance an action picks from the current cluster
    zipf_a: float = 1.2           # skew of item popularity within a cluster and globally
    start_ms: int = 1_767_225_600_000  # first event time (2026-01-01)
    step_ms: int = 60_000         # mean gap between a user's events
    seed: int = 0                 # RNG seed of the users' behaviour; also namespaces event ids
    world_seed: int = 0           # RNG seed of the item clusters: keep it to add users to the same world
    user_prefix: str = "user-"    # user id prefix (lets a stream add users distinct from the bootstrap)

    def __post_init__(self) -> None:
        for name in ("n_users", "n_items", "n_clusters", "events_per_user", "step_ms"):
            if getattr(self, name) < 1:
                raise ValueError(f"SyntheticConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_clusters > self.n_items:
            raise ValueError(f"SyntheticConfig.n_clusters ({self.n_clusters}) must be <= n_items ({self.n_items})")
        for name in ("drift_prob", "in_cluster_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"SyntheticConfig.{name} must be in [0, 1], got {getattr(self, name)}")


def _zipf_probs(n: int, a: float) -> np.ndarray:
    p = 1.0 / np.arange(1, n + 1) ** a
    return p / p.sum()


def generate(cfg: SyntheticConfig) -> Iterator[pb.Event]:
    """All events of all users, in event-time order."""
    item_cluster = np.random.default_rng(cfg.world_seed).permutation(cfg.n_items) % cfg.n_clusters  # balanced
    rng = np.random.default_rng(cfg.seed)
    members = [np.flatnonzero(item_cluster == c) for c in range(cfg.n_clusters)]
    member_p = [_zipf_probs(len(m), cfg.zipf_a) for m in members]
    global_p = _zipf_probs(cfg.n_items, cfg.zipf_a)
    rows = []  # (time, user, j, item)
    for u in range(cfg.n_users):
        c = int(rng.integers(cfg.n_clusters))
        t = cfg.start_ms + int(rng.integers(cfg.step_ms * cfg.events_per_user))
        for j in range(cfg.events_per_user):
            if rng.random() < cfg.drift_prob:
                c = (c + (1 if rng.random() < 0.5 else -1)) % cfg.n_clusters
            if rng.random() < cfg.in_cluster_prob:
                item = int(rng.choice(members[c], p=member_p[c]))
            else:
                item = int(rng.choice(cfg.n_items, p=global_p))
            t += 1 + int(rng.exponential(cfg.step_ms))
            rows.append((t, u, j, item))
    rows.sort()
    for t, u, j, item in rows:
        yield pb.Event(event_id=f"syn{cfg.seed}-{cfg.user_prefix}{u}-{j}", user_id=f"{cfg.user_prefix}{u}",
                       item_id=f"item-{item}", action="click", weight=1.0, timestamp_ms=t)
