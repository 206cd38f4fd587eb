"""Server assembly: gRPC server with the servicers, health, reflection, metrics and the engine watcher.

`create_server(config)` returns (server, port) so tests can bind port 0. `serve(config)` runs until
SIGINT/SIGTERM and shuts down gracefully: NOT_SERVING, stop the watcher, drain, `server.stop(grace)`.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import time
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from contracts.eventlog import SqliteEventLog
from contracts.kafka_events import parse_events_url
from contracts.registry import Registry
from proto import livetower_v1_pb2 as pb
from proto import livetower_v1_pb2_grpc as pb_grpc
from server.auth import AdminAuthInterceptor, load_or_create_token
from server.batching import MicroBatcher
from server.config import ServerConfig
from server.engine.manager import EngineManager
from server.events.sink import EventSink, KafkaEventProducer, SqliteSink
from server.events.history import RecentHistory
from server.interceptors import ObservabilityInterceptor
from server.events.kafka_feed import KafkaHistoryFeed, OwnEventIds
from server.kserve import KSERVE, add_kserve_to_server
from server.metrics import ServerMetrics
from server.servicer import EngineAdminServicer, RecommenderServicer

log = logging.getLogger("livetower.server")
RECOMMENDER = pb.DESCRIPTOR.services_by_name["Recommender"].full_name
ADMIN = pb.DESCRIPTOR.services_by_name["EngineAdmin"].full_name
GRPC_MAX_MESSAGE_BYTES = 64 << 20  # transport cap; the friendlier per-request limit is in RequestLimits


@dataclass(slots=True)
class LivetowerServer:
    config: ServerConfig
    grpc_server: grpc.aio.Server
    manager: EngineManager
    health: health.aio.HealthServicer
    sink: EventSink
    history: RecentHistory
    metrics: ServerMetrics
    batcher: MicroBatcher | None = None
    event_log: SqliteEventLog | None = None   # the embedded log (None with Kafka)
    feed: KafkaHistoryFeed | None = None      # Kafka: keeps histories current from the topic
    metrics_port: int | None = None
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task] = field(default_factory=list)
    _metrics_http: object | None = None
    _port: int = 0

    async def start(self) -> None:
        await self.sink.start()
        warm = []
        if self.event_log is not None:
            warm = await asyncio.to_thread(self.event_log.latest, self.config.history_warm_events)
        for ev in warm:
            self.history.append(ev.user_id, ev.item_id)
        if self.feed is not None:
            await self.feed.start()
            self._tasks.append(asyncio.create_task(self.feed.run(self._stop)))
        if self.config.metrics_port is not None:
            httpd, _ = start_http_server(self.config.metrics_port, addr=self.config.host,
                                         registry=self.metrics.registry)
            self._metrics_http = httpd
            self.metrics_port = httpd.server_port
        if self.batcher is not None:
            self.batcher.start()
        if self.config.gc_freeze:
            gc.collect()
            gc.freeze()  # everything so far (modules, warmed histories) outlives every request
        await self.grpc_server.start()
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self.health.set(RECOMMENDER, health_pb2.HealthCheckResponse.NOT_SERVING)
        self._tasks.append(asyncio.create_task(self.manager.run(self._stop)))
        self.metrics.watch_freshness(lambda: self.manager.current)
        self.metrics.watch_stages(self.manager.clock)
        self._tasks.append(asyncio.create_task(self._track_health()))
        log.info("gRPC on %s:%d; %d users' history warmed from %d events%s", self.config.host,
                 self.grpc_server_port, len(self.history), len(warm),
                 f"; the rest follow from Kafka topic {self.feed.target.topic}" if self.feed else "")

    @property
    def grpc_server_port(self) -> int:
        return self._port

    async def _track_health(self) -> None:
        serving = False
        while not self._stop.is_set():
            now = self.manager.current is not None
            if now != serving:
                serving = now
                await self.health.set(RECOMMENDER, health_pb2.HealthCheckResponse.SERVING if now
                                      else health_pb2.HealthCheckResponse.NOT_SERVING)
            try:
                await asyncio.wait_for(self._stop.wait(), timeout=0.2)
            except TimeoutError:
                pass

    async def stop(self, grace: float | None = None) -> None:
        await self.health.enter_graceful_shutdown()  # every service NOT_SERVING: balancers drain us
        self._stop.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.grpc_server.stop(self.config.grace_s if grace is None else grace)
        if self.batcher is not None:
            await self.batcher.stop()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
        if self.feed is not None:
            await self.feed.stop()
        await self.sink.stop()


def create_server(config: ServerConfig) -> tuple[LivetowerServer, int]:
    """Build (not start) the server bound to config.host:config.port; returns it and the bound port."""
    registry = Registry(config.registry_path)
    metrics = ServerMetrics()
    history = RecentHistory(max_users=config.history_users, per_user=config.history_len)
    event_log = feed = own_ids = None
    if config.events_url is None:
        event_log = SqliteEventLog(config.events_path)
        sink: EventSink = SqliteSink(event_log)
    else:
        target = parse_events_url(config.events_url)
        sink = KafkaEventProducer(target, max_inflight_events=config.max_inflight_events)
        own_ids = OwnEventIds()
        feed = KafkaHistoryFeed(target, history.append, own_ids, warm_events=config.history_warm_events,
                                on_record=metrics.on_feed_record)
    def on_engine_event(kind: str, version: int, value: float) -> None:
        metrics.on_engine_event(kind, version, value)
        if kind == "load" and config.gc_freeze:
            # The new engine's objects (vocabulary, index wrappers) live for many requests. Collect first:
            # cyclic garbage frozen now would never be freed. Everything older is frozen already, so this
            # pass covers only what was allocated since the last freeze.
            t0 = time.perf_counter()
            gc.collect()
            gc.freeze()
            log.info("gc collect + freeze after loading engine %d: %.1f ms", version, (time.perf_counter() - t0) * 1e3)

    manager = EngineManager(registry, config.engines, on_event=on_engine_event,
                            user_histories=lambda: history.sample(1000))
    if config.admin_token is not None:
        token, hint = config.admin_token, "the server's configuration (admin_token)"
    else:
        token, hint = load_or_create_token(config.admin_token_path), str(config.admin_token_path)
    batcher = MicroBatcher(config.batching) if config.batching is not None else None
    grpc_server = grpc.aio.server(
        interceptors=[ObservabilityInterceptor(metrics, config.limits.max_request_bytes),
                      AdminAuthInterceptor(token, hint)],
        options=[("grpc.max_receive_message_length", GRPC_MAX_MESSAGE_BYTES),
                 ("grpc.max_send_message_length", GRPC_MAX_MESSAGE_BYTES),
                 ("grpc.so_reuseport", 1 if config.reuse_port else 0)])
    pb_grpc.add_RecommenderServicer_to_server(
        RecommenderServicer(manager=manager, history=history, sink=sink, limits=config.limits,
                            metrics=metrics, batcher=batcher, own_event_ids=own_ids), grpc_server)
    pb_grpc.add_EngineAdminServicer_to_server(EngineAdminServicer(manager=manager, registry=registry), grpc_server)
    add_kserve_to_server(grpc_server, manager=manager, registry=registry, limits=config.limits, batcher=batcher)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, grpc_server)
    reflection.enable_server_reflection(
        (RECOMMENDER, ADMIN, KSERVE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        grpc_server)
    port = grpc_server.add_insecure_port(f"{config.host}:{config.port}")
    if port == 0:
        raise OSError(f"could not bind gRPC on {config.host}:{config.port}: is another server running there?")
    server = LivetowerServer(config=config, grpc_server=grpc_server, manager=manager, health=health_servicer,
                             sink=sink, event_log=event_log, feed=feed, history=history, metrics=metrics,
                             batcher=batcher)
    server._port = port
    return server, port


async def serve(config: ServerConfig, *, on_started=None) -> None:
    import sys

    import torch

    torch.set_num_threads(config.engines.num_threads)  # process-wide: retrieval and the user-tower runners
    sys.setswitchinterval(config.gil_switch_interval_s)  # process-wide: engine loads and shadow scoring run
    # Python in other threads; at the default 5 ms each of their turns could hold the event loop that long
    server, port = create_server(config)
    await server.start()
    if on_started is not None:
        on_started(server, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down: draining for up to %.1fs", config.grace_s)
    await server.stop()


def run(main, *, use_uvloop: bool) -> None:
    """Run a coroutine on uvloop when asked for and installed, else on the default asyncio loop."""
    if use_uvloop:
        try:
            import uvloop
        except ImportError:
            log.warning("uvloop is not installed; using the default asyncio loop")
        else:
            uvloop.run(main)
            return
    asyncio.run(main)
