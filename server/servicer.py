"""The gRPC servicers. They depend on the engine interface only and know nothing of backends."""

from __future__ import annotations

import asyncio
import time

import grpc

from livetower.eventlog import EventLog
from livetower.events import event_problem
from livetower.registry import Registry
from proto import livetower_v1_pb2 as pb
from proto import livetower_v1_pb2_grpc as pb_grpc
from server.batching import DeadlineExpired, MicroBatcher, Overloaded
from server.config import RequestLimits
from server.engine.engine import Engine, RecommendQuery
from server.engine.manager import EngineManager
from server.history import RecentHistory
from server.metrics import ServerMetrics
from server.validation import recommend_problem, score_problem


async def _serving_engine(manager: EngineManager, context: grpc.aio.ServicerContext) -> Engine:
    engine = manager.current  # hold this reference for the whole request
    if engine is None:
        await context.abort(grpc.StatusCode.UNAVAILABLE,
                            "no engine is serving yet: the trainer has not published one; retry shortly")
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed before the request was handled")
    return engine


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


async def through_batcher(context, submit):
    """Run work through the batcher, mapping its shedding onto gRPC status codes."""
    try:
        return await submit
    except Overloaded as e:
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
    except DeadlineExpired as e:
        await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(e))


class RecommenderServicer(pb_grpc.RecommenderServicer):
    def __init__(self, *, manager: EngineManager, history: RecentHistory, event_log: EventLog,
                 limits: RequestLimits, metrics: ServerMetrics, batcher: MicroBatcher | None) -> None:
        self.manager = manager
        self.batcher = batcher  # None: compute inline on the event loop (the naive baseline)
        self.history = history
        self.event_log = event_log
        self.limits = limits
        self.metrics = metrics

    def _history(self, request) -> list[str]:
        return list(request.history) or self.history.get(request.user_id)

    async def Recommend(self, request: pb.RecommendRequest, context) -> pb.RecommendResponse:
        if problem := recommend_problem(request, self.limits):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        engine = await _serving_engine(self.manager, context)
        query = RecommendQuery(self._history(request), request.k, request.exclude_seen)
        if self.batcher is None:
            ranked = engine.recommend_batch([query])[0]
        else:
            ranked = await through_batcher(context, self.batcher.recommend(engine, query, deadline_of(context)))
        return pb.RecommendResponse(item_ids=ranked.item_ids, scores=ranked.scores,
                                    engine_version=engine.version, source=ranked.source)

    async def Score(self, request: pb.ScoreRequest, context) -> pb.ScoreResponse:
        if problem := score_problem(request, self.limits):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        engine = await _serving_engine(self.manager, context)
        history, candidates = self._history(request), list(request.candidate_ids)
        if self.batcher is None:
            scores, unknown, source = engine.score(history, candidates)
        else:
            scores, unknown, source = await through_batcher(
                context, self.batcher.run(engine, lambda: engine.score(history, candidates), deadline_of(context)))
        return pb.ScoreResponse(scores=scores, engine_version=engine.version,
                                unknown_candidate_ids=unknown, source=source)

    async def LogEvents(self, request: pb.LogEventsRequest, context) -> pb.LogEventsResponse:
        n = len(request.events)
        if n > self.limits.max_events:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"events has {n} entries; the limit is {self.limits.max_events} per request")
        now_ms = int(time.time() * 1000)
        accepted: list[pb.Event] = []
        rejected: list[pb.EventRejection] = []
        for i, ev in enumerate(request.events):
            if problem := event_problem(ev, now_ms):
                rejected.append(pb.EventRejection(index=i, event_id=ev.event_id, reason=problem))
            else:
                accepted.append(ev)

        def persist() -> None:
            if accepted:
                self.event_log.append(accepted)
            for r in rejected:
                self.event_log.dead_letter(request.events[r.index].SerializeToString(), r.reason)

        try:
            await asyncio.to_thread(persist)
        except Exception as e:  # noqa: BLE001 - the client must retry; nothing was acknowledged
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"event log write failed ({e}); retry the request")
        for ev in accepted:
            self.history.append(ev.user_id, ev.item_id)
        self.metrics.events_accepted.inc(len(accepted))
        for r in rejected:
            self.metrics.events_rejected.labels(r.reason.split(" ", 1)[0]).inc()
        return pb.LogEventsResponse(accepted=len(accepted), rejected=rejected)


class EngineAdminServicer(pb_grpc.EngineAdminServicer):
    def __init__(self, *, manager: EngineManager, registry: Registry) -> None:
        self.manager = manager
        self.registry = registry

    async def ListEngines(self, request, context) -> pb.ListEnginesResponse:
        def read() -> list[pb.EngineManifest]:
            out = []
            for v in reversed(self.registry.versions()):
                try:
                    out.append(self.registry.read_manifest(v))
                except Exception:  # noqa: BLE001 - a broken manifest is listed by version only
                    out.append(pb.EngineManifest(version=v))
            return out

        engines = await asyncio.to_thread(read)
        current = self.manager.current
        return pb.ListEnginesResponse(engines=engines, serving_version=current.version if current else 0)

    async def GetRollout(self, request, context) -> pb.GetRolloutResponse:
        rollout = await asyncio.to_thread(self.registry.read_rollout)
        return pb.GetRolloutResponse(stable_version=rollout.stable, candidate_version=rollout.candidate,
                                     state=self.manager.state, refused_versions=sorted(rollout.refused),
                                     refused_reasons=rollout.refused)
