"""Seeded workload for `livetower bench load`: arrival schedules, a Zipf user population, and request kinds.

Everything here is a pure function of its arguments (numpy ``Generator`` seeded by the caller), so two runs
with the same seed send the same users, histories, candidate lists and kinds at the same offsets.

Request kinds
-------------
A kind is two functions: ``make(rng, workload) -> request message`` and ``bind(channel) -> unary-unary
multicallable`` (awaited as ``await call(request, timeout=...)``). Adding one is a single call, e.g. a KServe
``ModelInfer`` through ``inference.GRPCInferenceService``::

    from tritonclient.grpc import service_pb2 as kserve

    def make_infer(rng, wl):
        user = wl.sample_user(rng)
        req = kserve.ModelInferRequest(model_name="user_tower")
        ...  # fill inputs from wl.history_ids(user)
        return req

    register_kind(RequestKind(
        name="infer", make=make_infer,
        bind=lambda ch: ch.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                       request_serializer=kserve.ModelInferRequest.SerializeToString,
                                       response_deserializer=kserve.ModelInferResponse.FromString)))

and then ``--mix recommend=0.8,infer=0.2``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

ARRIVALS = ("fixed", "poisson")


# ---------------------------------------------------------------- schedules

def schedule(rate: float, duration_s: float, arrival: str, rng: np.random.Generator,
             phase_s: float = 0.0, chunk: int = 4096) -> Iterator[float]:
    """Send offsets in seconds (ascending, in ``[0, duration_s)``) for an open-loop stream at ``rate`` per second.

    ``fixed``: one request every ``1/rate`` s, starting at ``phase_s`` (workers sharing a total rate use
    staggered phases so they do not fire in lock-step). ``poisson``: exponential gaps with mean ``1/rate``.
    Produced lazily in chunks, so an hour at 10k QPS does not sit in memory.
    """
    if rate <= 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    if arrival not in ARRIVALS:
        raise ValueError(f"arrival must be one of {ARRIVALS}, got {arrival!r}")
    gap = 1.0 / rate
    if arrival == "fixed":
        i = 0
        while True:
            offs = phase_s + gap * np.arange(i, i + chunk, dtype=np.float64)
            for t in offs.tolist():
                if t >= duration_s:
                    return
                yield t
            i += chunk
    else:
        t = phase_s
        while True:
            offs = t + np.cumsum(rng.exponential(gap, chunk))
            for x in offs.tolist():
                if x >= duration_s:
                    return
                yield x
            t = float(offs[-1])


# ---------------------------------------------------------------- users and items

def zipf_cdf(n: int, s: float) -> np.ndarray:
    """Cumulative probabilities of ranks 1..n with P(rank r) proportional to ``1 / r**s`` (s = 0: uniform)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    w = np.arange(1, n + 1, dtype=np.float64) ** -float(s)
    cdf = np.cumsum(w)
    cdf /= cdf[-1]
    return cdf


def user_history(user: int, *, items: int, history_len: int, seed: int) -> np.ndarray:
    """The deterministic history (item indices, oldest first) of user number ``user``: the same for every worker."""
    return np.random.default_rng([seed, 0x5EED, user]).integers(0, items, history_len)


@dataclass(frozen=True, slots=True)
class Workload:
    """The population a run draws from. Build with :func:`make_workload`; share across request kinds."""
    users: int
    zipf_s: float
    items: int
    item_prefix: str
    history_len: int
    k: int
    exclude_seen: bool
    score_candidates: tuple[int, int]
    seed: int
    cdf: np.ndarray

    def sample_user(self, rng: np.random.Generator) -> int:
        """A user number (0 = most popular) drawn from the Zipf population."""
        return min(int(np.searchsorted(self.cdf, rng.random(), side="right")), self.users - 1)

    def user_id(self, user: int) -> str:
        return f"user-{user}"

    def item_ids(self, idx: np.ndarray) -> list[str]:
        p = self.item_prefix
        return [f"{p}{i}" for i in idx.tolist()]

    def history_ids(self, user: int) -> list[str]:
        return self.item_ids(user_history(user, items=self.items, history_len=self.history_len, seed=self.seed))

    def sample_candidates(self, rng: np.random.Generator) -> list[str]:
        lo, hi = self.score_candidates
        n = int(rng.integers(lo, hi + 1))
        return self.item_ids(rng.integers(0, self.items, n))


def make_workload(*, users: int, zipf_s: float, items: int, item_prefix: str = "item-", history_len: int = 50,
                  k: int = 100, exclude_seen: bool = False, score_candidates: tuple[int, int] = (100, 1000),
                  seed: int = 0) -> Workload:
    return Workload(users=users, zipf_s=zipf_s, items=items, item_prefix=item_prefix, history_len=history_len,
                    k=k, exclude_seen=exclude_seen, score_candidates=tuple(score_candidates), seed=seed,
                    cdf=zipf_cdf(users, zipf_s))


# ---------------------------------------------------------------- request kinds

@dataclass(frozen=True, slots=True)
class RequestKind:
    """One kind of request: how to build it from the rng + workload and which RPC sends it."""
    name: str
    make: Callable[[np.random.Generator, Workload], Any]
    bind: Callable[[Any], Callable[..., Awaitable[Any]]]  # grpc.aio.Channel -> multicallable


KINDS: dict[str, RequestKind] = {}


def register_kind(kind: RequestKind) -> RequestKind:
    KINDS[kind.name] = kind
    return kind


def _make_recommend(rng: np.random.Generator, wl: Workload):
    from proto import livetower_v1_pb2 as pb

    user = wl.sample_user(rng)
    return pb.RecommendRequest(user_id=wl.user_id(user), history=wl.history_ids(user), k=wl.k,
                               exclude_seen=wl.exclude_seen)


def _make_score(rng: np.random.Generator, wl: Workload):
    from proto import livetower_v1_pb2 as pb

    user = wl.sample_user(rng)
    return pb.ScoreRequest(user_id=wl.user_id(user), history=wl.history_ids(user),
                           candidate_ids=wl.sample_candidates(rng))


def _make_log(rng: np.random.Generator, wl: Workload):
    """One click event: a user of the population on an item near the end of their history (what they engage
    with next), event id random (unique across workers without coordination)."""
    import time

    from proto import livetower_v1_pb2 as pb

    user = wl.sample_user(rng)
    item = wl.history_ids(user)[-1 - int(rng.integers(0, 5))]
    return pb.LogEventsRequest(events=[pb.Event(event_id=f"load-{rng.integers(1 << 62):x}", user_id=wl.user_id(user),
                                                item_id=item, action="click", weight=1.0,
                                                timestamp_ms=int(time.time() * 1000))])


def _bind_recommender(method: str):
    def bind(channel):
        from proto import livetower_v1_pb2_grpc as pb_grpc

        return getattr(pb_grpc.RecommenderStub(channel), method)
    return bind


def _make_infer_recommend(rng: np.random.Generator, wl: Workload):
    """The same Recommend as `recommend`, sent as KServe v2 ModelInfer on model "recommend" (raw inputs,
    as tritonclient sends them)."""
    import struct

    from proto import grpc_service_pb2 as kpb

    user = wl.sample_user(rng)
    history = [h.encode() for h in wl.history_ids(user)]
    raw_history = b"".join(struct.pack("<I", len(h)) + h for h in history)
    return kpb.ModelInferRequest(
        model_name="recommend",
        inputs=[kpb.ModelInferRequest.InferInputTensor(name="HISTORY", datatype="BYTES", shape=[len(history)]),
                kpb.ModelInferRequest.InferInputTensor(name="K", datatype="INT32", shape=[1])],
        raw_input_contents=[raw_history, struct.pack("<i", wl.k)])


def _bind_infer(channel):
    from proto import grpc_service_pb2_grpc as kpb_grpc

    return kpb_grpc.GRPCInferenceServiceStub(channel).ModelInfer


register_kind(RequestKind(name="recommend", make=_make_recommend, bind=_bind_recommender("Recommend")))
register_kind(RequestKind(name="score", make=_make_score, bind=_bind_recommender("Score")))
register_kind(RequestKind(name="log", make=_make_log, bind=_bind_recommender("LogEvents")))
register_kind(RequestKind(name="infer_recommend", make=_make_infer_recommend, bind=_bind_infer))


# ---------------------------------------------------------------- mix

def parse_mix(text: str) -> tuple[tuple[str, float], ...]:
    """``"recommend=0.9,score=0.1"`` -> ``(("recommend", 0.9), ("score", 0.1))`` (weights need not sum to 1)."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, w = part.partition("=")
        if not sep:
            raise ValueError(f"mix entry {part!r} is not name=weight")
        out.append((name.strip(), float(w)))
    return tuple(out)


def parse_range(text: str) -> tuple[int, int]:
    """``"100:1000"`` -> ``(100, 1000)``; ``"500"`` -> ``(500, 500)``."""
    lo, _, hi = text.partition(":")
    return int(lo), int(hi or lo)


class KindPicker:
    """Draws a kind name per request from normalised mix weights."""

    def __init__(self, mix: tuple[tuple[str, float], ...]):
        self.names = [n for n, _ in mix]
        w = np.array([w for _, w in mix], np.float64)
        self.cdf = np.cumsum(w / w.sum())

    def __call__(self, rng: np.random.Generator) -> str:
        if len(self.names) == 1:
            return self.names[0]
        return self.names[min(int(np.searchsorted(self.cdf, rng.random(), side="right")), len(self.names) - 1)]
