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
    """All events of all users, in event-time order. Vectorised over (user, step): millions of
    events take seconds."""
    U, J, C = cfg.n_users, cfg.events_per_user, cfg.n_clusters
    item_cluster = np.random.default_rng(cfg.world_seed).permutation(cfg.n_items) % C  # balanced
    rng = np.random.default_rng(cfg.seed)
    # members_CS[c, r]: the r-th most popular item of cluster c (clusters differ in size by <= 1).
    sizes_C = np.bincount(item_cluster, minlength=C)
    members_CS = np.zeros((C, sizes_C.max()), np.int64)
    for c in range(C):
        m = np.flatnonzero(item_cluster == c)
        members_CS[c, :len(m)] = m
    cdf_by_size = {int(n): np.cumsum(_zipf_probs(int(n), cfg.zipf_a)) for n in np.unique(sizes_C)}
    global_cdf = np.cumsum(_zipf_probs(cfg.n_items, cfg.zipf_a))

    c0_U = rng.integers(C, size=U)
    step_UJ = (rng.random((U, J)) < cfg.drift_prob) * np.where(rng.random((U, J)) < 0.5, 1, -1)
    cluster_UJ = (c0_U[:, None] + np.cumsum(step_UJ, axis=1)) % C
    in_cluster_UJ = rng.random((U, J)) < cfg.in_cluster_prob
    u_UJ = rng.random((U, J))
    rank_UJ = np.zeros((U, J), np.int64)
    size_UJ = sizes_C[cluster_UJ]
    for n, cdf in cdf_by_size.items():
        sel = size_UJ == n
        rank_UJ[sel] = np.minimum(np.searchsorted(cdf, u_UJ[sel]), n - 1)
    global_UJ = np.minimum(np.searchsorted(global_cdf, rng.random((U, J))), cfg.n_items - 1)
    item_UJ = np.where(in_cluster_UJ, members_CS[cluster_UJ, rank_UJ], global_UJ)
    t0_U = cfg.start_ms + rng.integers(cfg.step_ms * J, size=U)
    gaps_UJ = 1 + rng.exponential(cfg.step_ms, (U, J)).astype(np.int64)
    t_UJ = t0_U[:, None] + np.cumsum(gaps_UJ, axis=1)
    user_UJ, j_UJ = np.meshgrid(np.arange(U), np.arange(J), indexing="ij")
    order = np.lexsort((j_UJ.ravel(), user_UJ.ravel(), t_UJ.ravel()))
    t_N, user_N, j_N, item_N = (a.ravel()[order].tolist() for a in (t_UJ, user_UJ, j_UJ, item_UJ))
    for t, u, j, item in zip(t_N, user_N, j_N, item_N):
        yield pb.Event(event_id=f"syn{cfg.seed}-{cfg.user_prefix}{u}-{j}", user_id=f"{cfg.user_prefix}{u}",
                       item_id=f"item-{item}", action="click", weight=1.0, timestamp_ms=t)
