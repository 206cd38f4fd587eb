"""The gRPC servicers. They depend on the engine interface only and know nothing of backends."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Awaitable, Callable, TypeVar

import grpc

from contracts.attribution import Impression
from contracts.impressions import ImpressionWriter, new_impression_id
from contracts.catalog import CatalogRecord
from contracts.client import LEASE_HOLDER_KEY
from contracts.events import DEFAULT_LIMITS, EventLimits, event_problem
from contracts.registry import Registry
from contracts.outcome import ExperimentDecision, OutcomeTest
from contracts.rollout import CanaryPolicy, Experiment, ExperimentArm, RolloutError
from proto import livetower_v1_pb2 as pb
from proto import livetower_v1_pb2_grpc as pb_grpc
from server.batching import DeadlineExpired, MicroBatcher, Overloaded
from server.config import RequestLimits
from server.engine.catalog_sync import CatalogWriter
from server.engine.engine import Engine, Ranked, RecommendQuery
from server.engine.experiments import CONTROL, ArmLive
from server.engine.lease import holder_address
from server.engine.manager import EngineManager
from server.events.sink import Backpressure, EventSink, IngestConfig
from server.events.history import RecentHistory
from server.events.kafka_feed import OwnEventIds
from server.metrics import ServerMetrics
from server.validation import recommend_problem, score_problem

log = logging.getLogger("livetower.rpc")
T = TypeVar("T")


async def _routed_engine(manager: EngineManager, context: grpc.aio.ServicerContext,
                         user_id: str) -> tuple[Engine, str]:
    engine, arm = manager.route(user_id)  # hold this reference for the whole request
    if engine is None:
        await context.abort(grpc.StatusCode.UNAVAILABLE,
                            "no engine is serving yet: the trainer has not published one; retry shortly")
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed before the request was handled")
    return engine, arm


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
    def __init__(self, *, manager: EngineManager, history: RecentHistory, sink: EventSink,
                 limits: RequestLimits, metrics: ServerMetrics, batcher: MicroBatcher | None,
                 own_event_ids: OwnEventIds | None = None, event_limits: EventLimits = DEFAULT_LIMITS,
                 ingest: IngestConfig = IngestConfig(), impressions: ImpressionWriter | None = None) -> None:
        """own_event_ids: ids of events this process accepted, so the Kafka history feed skips them.
        event_limits: what an event may hold (ids, weight, clock skew); ingest: per-request dead-letter cap.
        impressions: where answered Recommend requests are recorded for attribution (None: off)."""
        self.manager = manager
        self.batcher = batcher  # None: compute inline on the event loop (the naive baseline)
        self.history = history
        self.sink = sink
        self.own_event_ids = own_event_ids
        self.limits = limits
        self.event_limits = event_limits
        self.ingest = ingest
        self.metrics = metrics
        self.impressions = impressions
        metrics.watch_history(history)

    def _history(self, request) -> list[str]:
        return list(request.history) or self.history.get(request.user_id)

    async def _on_routed_engine(self, context, user_id: str, work: Callable[[Engine], Awaitable[T]],
                                query: RecommendQuery | None = None) -> tuple[T, Engine, str]:
        """Run `work` on the engine this user is routed to (its arm: "stable", "canary" or an experiment's).
        A canary or experiment arm that fails is recorded as that arm's error and the request is answered by
        stable: only stable can fail a request."""
        engine, arm = await _routed_engine(self.manager, context, user_id)
        t0 = time.perf_counter()
        try:
            result = await work(engine)
        except grpc.aio.AbortError:
            raise
        except Exception as e:
            stable = self.manager.stable
            if arm == CONTROL or stable is None:
                raise
            self.manager.observe(engine, arm, 0.0, error=True)
            log.warning("%s engine %d failed (%s: %s); answered by stable %d", arm, engine.version,
                        type(e).__name__, e, stable.version)
            return await work(stable), stable, CONTROL
        self.manager.observe(engine, arm, time.perf_counter() - t0, error=False, query=query)
        return result, engine, arm

    async def Recommend(self, request: pb.RecommendRequest, context) -> pb.RecommendResponse:
        if problem := recommend_problem(request, self.limits):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        query = RecommendQuery(self._history(request), request.k, request.exclude_seen, request.user_id)

        async def recommend(engine: Engine) -> Ranked:
            if self.batcher is None:
                return engine.recommend_batch([query])[0]
            return await through_batcher(context, self.batcher.recommend(engine, query, deadline_of(context)))

        ranked, engine, arm = await self._on_routed_engine(context, request.user_id, recommend, query)
        impression_id = ""
        if self.impressions is not None:  # only answered requests: an abort above never gets here
            served_ms = int(time.time() * 1000)
            impression_id = new_impression_id(served_ms)
            # submit() only queues (never blocks, never touches the disk); a full queue drops it, counted
            self.impressions.submit(Impression(impression_id, request.user_id, arm, engine.version,
                                               list(ranked.item_ids), served_ms))
        return pb.RecommendResponse(item_ids=ranked.item_ids, scores=ranked.scores, engine_version=engine.version,
                                    source=ranked.source, canary=arm == "canary", impression_id=impression_id,
                                    arm=arm)

    async def Score(self, request: pb.ScoreRequest, context) -> pb.ScoreResponse:
        if problem := score_problem(request, self.limits):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        history, candidates = self._history(request), list(request.candidate_ids)

        async def score(engine: Engine):
            if self.batcher is None:
                return engine.score(history, candidates, request.user_id)
            return await through_batcher(context, self.batcher.run(
                engine, lambda: engine.score(history, candidates, request.user_id), deadline_of(context)))

        (scores, unknown, source), engine, arm = await self._on_routed_engine(context, request.user_id, score)
        return pb.ScoreResponse(scores=scores, engine_version=engine.version,
                                unknown_candidate_ids=unknown, source=source, canary=arm == "canary", arm=arm)

    async def LogEvents(self, request: pb.LogEventsRequest, context) -> pb.LogEventsResponse:
        n = len(request.events)
        if n > self.limits.max_events:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"events has {n} entries; the limit is {self.limits.max_events} per request")
        now_ms = int(time.time() * 1000)
        accepted: list[pb.Event] = []
        rejected: list[pb.EventRejection] = []
        for i, ev in enumerate(request.events):
            if problem := event_problem(ev, now_ms, self.event_limits):
                rejected.append(pb.EventRejection(index=i, event_id=ev.event_id, reason=problem))
            else:
                accepted.append(ev)

        if self.own_event_ids is not None:  # before the write: the feed may read the event back at once
            for ev in accepted:
                self.own_event_ids.add(ev.event_id)
        # Dead letters beyond the cap are reported, not stored: a request of invalid events costs one bounded write.
        stored = rejected[:self.ingest.max_dead_letters_per_request]
        try:
            is_new = await self.sink.append_new(accepted) if accepted else []
            await self.sink.dead_letter_many([(request.events[r.index].SerializeToString(), r.reason) for r in stored])
        except Backpressure as e:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"event stream is backed up: {e}")
        except Exception as e:  # noqa: BLE001 - the client must retry; nothing was acknowledged
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"event log write failed ({e!r}); retry the request")
        new = [ev for ev, fresh in zip(accepted, is_new) if fresh]
        for ev in new:  # an event whose id was taken first by someone else changes nobody's history
            self.history.append(ev.user_id, ev.item_id)
        duplicates, dropped = len(accepted) - len(new), len(rejected) - len(stored)
        self.metrics.events_accepted.inc(len(new))
        self.metrics.events_duplicate.inc(duplicates)
        self.metrics.dead_letters_dropped.inc(dropped)
        for r in rejected:
            self.metrics.events_rejected.labels(r.reason.split(" ", 1)[0]).inc()
        return pb.LogEventsResponse(accepted=len(new), rejected=rejected, duplicates=duplicates,
                                    dead_letters_dropped=dropped)


class EngineAdminServicer(pb_grpc.EngineAdminServicer):
    """Engine listing and rollout control. Authentication is the AdminAuthInterceptor's job.

    fleet: rollout changes are made by the replica holding the decision lease; on any other replica they are
    refused with FAILED_PRECONDITION and the holder's admin address (message and LEASE_HOLDER_KEY trailing
    metadata), which contracts.client.Client follows. Reads (ListEngines, GetRollout, GetExperiment) answer here.
    """

    def __init__(self, *, manager: EngineManager, registry: Registry, catalog: CatalogWriter,
                 fleet: bool = False) -> None:
        self.manager = manager
        self.registry = registry
        self.catalog = catalog  # UpsertItems / DeleteItems: the catalogue file, or the catalogue stream (fleet)
        self.fleet = fleet

    async def _at_holder(self, context) -> None:
        """Fleet mode: abort unless this replica holds the decision lease (as of its last poll; were it lost
        since, the change is still safe: every change is a compare-and-swap on rollout.json). The holder is read
        afresh from the registry: this replica's own view may be as old as a load its watcher is busy with."""
        if not self.fleet or self.manager.leading:
            return
        try:
            st = await asyncio.to_thread(self.manager.registry.read_rollout)
        except Exception as e:  # noqa: BLE001 - the registry cannot be reached from here
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"this replica cannot read the registry to find the "
                                                             f"decision lease's holder ({e}); try another replica")
        address = holder_address(st)
        if address is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                f"no replica holds the decision lease right now (it lapsed; one takes it within "
                                f"{self.manager.config.poll_interval_s:g} s): retry in a few seconds")
        if not address:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"replica {self.manager.replica} does not make rollout decisions; {st.leader} holds "
                                f"the decision lease but recorded no admin address: call it directly")
        context.set_trailing_metadata(((LEASE_HOLDER_KEY, address),))
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                            f"replica {self.manager.replica} does not make rollout decisions: send this call to the "
                            f"decision lease's holder {st.leader} at {address}")

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
        current = self.manager.stable
        return pb.ListEnginesResponse(engines=engines, serving_version=current.version if current else 0)

    async def GetRollout(self, request, context) -> pb.GetRolloutResponse:
        return await asyncio.to_thread(rollout_response, self.manager)

    async def _operate(self, context, op: Callable[[], object], respond: Callable[[EngineManager], T] | None = None,
                       *, change: bool = True):
        """Run a rollout operation off the event loop (RolloutError -> its status), then answer with
        respond(manager): the rollout by default. change: it changes the rollout (fleet: the holder's job)."""
        if change:
            await self._at_holder(context)
        try:
            await asyncio.to_thread(op)
        except RolloutError as e:
            await context.abort(getattr(grpc.StatusCode, e.code), str(e))
        return await asyncio.to_thread(respond or rollout_response, self.manager)

    async def StartCanary(self, request: pb.StartCanaryRequest, context) -> pb.GetRolloutResponse:
        if request.version <= 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"version must be > 0, got {request.version}")
        if not 0 <= request.fraction < 1:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"fraction must be in (0, 1) (0: the policy's), got {request.fraction}")
        return await self._operate(context, lambda: self.manager.start_canary(request.version, request.fraction))

    async def Promote(self, request: pb.PromoteRequest, context) -> pb.GetRolloutResponse:
        return await self._operate(context, lambda: self.manager.promote(reason=request.reason))

    async def Rollback(self, request: pb.RollbackRequest, context) -> pb.GetRolloutResponse:
        return await self._operate(context, lambda: self.manager.rollback(reason=request.reason))

    async def SetPolicy(self, request: pb.SetPolicyRequest, context) -> pb.GetRolloutResponse:
        try:
            policy = CanaryPolicy.from_proto(request.policy)
        except (ValueError, TypeError) as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"policy: {e}")
        return await self._operate(context, lambda: self.manager.set_policy(policy))

    async def StartExperiment(self, request: pb.StartExperimentRequest, context) -> pb.Experiment:
        given = {"test": request.test, "alpha": request.alpha, "effect": request.effect, "horizon": request.horizon,
                 "min_impressions": request.min_impressions}
        try:  # proto3: 0 / "" is unset and takes the default
            test = OutcomeTest(**{k: v for k, v in given.items() if v})
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if request.settle_s < 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"settle_s must be >= 0, got {request.settle_s}")
        arms = [ExperimentArm(name=a.name, version=a.version, fraction=a.fraction) for a in request.arms]
        settle_s = request.settle_s or 10.0
        return await self._experiment(context, lambda: self.manager.start_experiment(
            request.name, arms, test, settle_s=settle_s, promote_winner=request.promote_winner))

    async def GetExperiment(self, request, context) -> pb.Experiment:
        return await self._experiment(context, lambda: None, change=False)

    async def StopExperiment(self, request: pb.StopExperimentRequest, context) -> pb.Experiment:
        v = request.promote_version
        return await self._experiment(context, lambda: self.manager.stop_experiment(
            reason=request.reason, winner_version=v, promote=bool(v), decision="stopped"))

    async def UpsertItems(self, request: pb.UpsertItemsRequest, context) -> pb.CatalogChangeResponse:
        return await self._upsert(context, request.items, "item", "items")

    async def DeleteItems(self, request: pb.DeleteItemsRequest, context) -> pb.CatalogChangeResponse:
        return await self._delete(context, request.item_ids, "item", "item_ids")

    async def UpsertUsers(self, request: pb.UpsertUsersRequest, context) -> pb.CatalogChangeResponse:
        return await self._upsert(context, request.users, "user", "users")

    async def DeleteUsers(self, request: pb.DeleteUsersRequest, context) -> pb.CatalogChangeResponse:
        return await self._delete(context, request.user_ids, "user", "user_ids")

    async def _upsert(self, context, entries, kind: str, field: str) -> pb.CatalogChangeResponse:
        await self._catalog_allowed(context, len(entries), field)
        try:
            records = [catalog_record(e, kind, field) for e in entries]
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if len({r.id for r in records}) != len(records):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: ids must be distinct within one call")
        result = await self._catalog_write(context, self.catalog.upsert(records))
        return self._catalog_response(self.manager.serving_engines(), kind, inserted=result.inserted,
                                      updated=result.updated, unchanged=result.unchanged,
                                      catalog_version=result.version)

    async def _delete(self, context, ids, kind: str, field: str) -> pb.CatalogChangeResponse:
        await self._catalog_allowed(context, len(ids), field)
        for i, rid in enumerate(ids):
            try:
                CatalogRecord(id=rid, kind=kind)  # the id rules of the catalogue (length, characters)
            except ValueError as e:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{field}[{i}]: {e}")
        deleted, version = await self._catalog_write(context, self.catalog.delete(list(ids), kind))
        return self._catalog_response(self.manager.serving_engines(), kind, deleted=deleted, catalog_version=version)

    @staticmethod
    async def _catalog_write(context, write: Awaitable[T]) -> T:
        try:
            return await write
        except TimeoutError as e:  # the stream took the change; this replica has not applied it yet
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(e))
        except ConnectionError as e:  # the stream did not acknowledge the change
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"catalogue stream: {e}")
        except ValueError as e:  # the file follows a stream this server was not started to write
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"{e}; or restart the server with "
                                                                     "--catalog-stream")

    async def _catalog_allowed(self, context, n: int, field: str) -> None:
        if not 1 <= n <= MAX_CATALOG_ITEMS:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"{field}: 1..{MAX_CATALOG_ITEMS} per call, got {n}")

    @staticmethod
    def _catalog_response(engines: list[Engine], kind: str, **counts) -> pb.CatalogChangeResponse:
        if kind == "user":
            blind = [e.version for e in engines if e.user_encoder is None]
            note = (f"engine(s) {blind} have no user feature encoder (built from a model without user features): "
                    "they serve these users by their history alone" if blind else "")
        else:
            blind = [e.version for e in engines if e.encoder is None]
            note = (f"engine(s) {blind} have no item feature encoder (built from an id-only model): they serve new "
                    "items only once an engine trained on them is promoted; deletions apply to every engine"
                    if blind else "")
        return pb.CatalogChangeResponse(serving_engines=[e.version for e in engines], note=note, **counts)

    async def _experiment(self, context, op: Callable[[], object], *, change: bool = True) -> pb.Experiment:
        status = await self._operate(context, op, EngineManager.experiment_status, change=change)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "no experiment has run on this registry; start one with "
                                                           "StartExperiment (livetower experiments start)")
        return experiment_message(*status)


MAX_CATALOG_ITEMS = 10_000  # records (items or users) per UpsertItems / DeleteItems / UpsertUsers / DeleteUsers call


def catalog_record(item: pb.CatalogItem, kind: str = "item", field: str = "items") -> CatalogRecord:
    """The API's record (an item, or a user) as a validated CatalogRecord; ValueError naming it and the field."""
    try:
        return CatalogRecord(id=item.id, kind=kind,
                             categorical={k: tuple(v.values) for k, v in item.categorical.items()},
                             numeric=dict(item.numeric), text=dict(item.text))
    except ValueError as e:
        raise ValueError(f"{field}[id={item.id[:64]!r}]: {e}") from None


def experiment_message(x: Experiment, decision: ExperimentDecision | None, live: dict[str, ArmLive]) -> pb.Experiment:
    verdicts = {v.name: v for v in decision.arms} if decision else {}

    def arm(name: str, version: int, fraction: float) -> pb.ExperimentArmStatus:
        counts = (decision.control if name == CONTROL else verdicts[name].counts) if decision else None
        v = verdicts.get(name)
        b = v.vs_control if v else None
        lv = live.get(name)
        return pb.ExperimentArmStatus(
            name=name, version=version, fraction=fraction, requests=lv.requests if lv else 0,
            errors=lv.errors if lv else 0, impressions=counts.impressions if counts else 0,
            hit_impressions=counts.hits if counts else 0, hit_rate=counts.rate if counts else 0.0,
            diff=b.diff if b else 0.0, diff_lo=b.lo if b else 0.0, diff_hi=b.hi if b else 0.0,
            state="control" if name == CONTROL else v.state if v else "running")

    t = x.test
    return pb.Experiment(
        name=x.name, id=x.id, control_version=x.control_version,
        arms=[arm(CONTROL, x.control_version, 1 - sum(a.fraction for a in x.arms)),
              *(arm(a.name, a.version, a.fraction) for a in x.arms)],
        test=t.test, alpha=t.alpha, effect=t.effect, horizon=t.horizon, min_impressions=t.min_impressions,
        settle_s=x.settle_s, promote_winner=x.promote_winner, running=x.running, ended_ms=x.ended_ms,
        decision=x.decision, winner_version=x.winner_version,
        reason=x.reason or (decision.reason if decision else "no analysis yet"))


def rollout_response(manager: EngineManager) -> pb.GetRolloutResponse:
    st, v, policy = manager.rollout, manager.last_verdict, manager.policy
    return pb.GetRolloutResponse(
        stable_version=manager.stable.version if manager.stable else 0,
        canary_version=manager.canary.version if manager.canary else 0, state=manager.state,
        refused_versions=sorted(st.refused), refused_reasons=st.refused, canary_fraction=manager.canary_fraction,
        policy=policy.to_proto(),
        analysis=pb.CanaryAnalysis(verdict=v.action, reason=v.reason, **v.figures) if v else None,
        history=[pb.RolloutEvent(**dataclasses.asdict(e)) for e in st.history[-50:]],
        rolled_back=st.rolled_back, pending_versions=manager.pending_versions(),
        canary_started_ms=st.canary_started_ms, leader=st.leader, leader_until_ms=st.leader_until_ms,
        leader_address=st.leader_address, replica=manager.replica,
        experiment=experiment_message(*status) if (status := manager.experiment_status()) else None)
