"""Server assembly: two gRPC listeners, the servicers, health, reflection, metrics and the engine watcher.

The data listener (config.host:port) serves Recommender, KServe, health and reflection; the admin listener
(config.admin_host:admin_port, loopback by default) serves EngineAdmin with its own health and reflection, so
the data port neither serves nor advertises the admin API. Both use config.tls when set. The transport
refuses a message over the request limit (plus a margin) before it is parsed.

`create_server(config)` returns (server, port) so tests can bind port 0 (`server.admin_port` is the admin
one). `serve(config)` runs until SIGINT/SIGTERM and shuts down gracefully: NOT_SERVING, stop the watcher,
drain, `server.stop(grace)`.
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

from contracts.attribution import read_outcomes, window_counts
from contracts.impressions import ImpressionWriter
from contracts.eventlog import SqliteEventLog
from contracts.kafka_events import parse_events_url
from contracts.object_registry import open_registry
from contracts.catalog import CatalogStore
from contracts.tls import SERVER_KEEPALIVE, TlsConfig, is_loopback
from contracts.tracing import TRACING_OFF, Tracing, start_tracing
from proto import livetower_v1_pb2 as pb
from proto import livetower_v1_pb2_grpc as pb_grpc
from server.auth import AdminAuthInterceptor, load_or_create_token, load_producer_tokens
from server.batching import MicroBatcher
from server.config import ServerConfig
from server.engine.catalog_sync import CatalogWriter, LocalCatalogWriter, StreamCatalogWriter
from server.engine.manager import EngineManager
from server.events.sink import EventSink, KafkaEventProducer, SqliteSink
from server.events.history import RecentHistory
from server.ingest_guard import CallerBuckets, IngestGuardInterceptor
from server.interceptors import ObservabilityInterceptor
from server.events.kafka_feed import KafkaHistoryFeed, OwnEventIds
from server.kserve import KSERVE, add_kserve_to_server
from server.metrics import ServerMetrics
from server.servicer import EngineAdminServicer, RecommenderServicer

log = logging.getLogger("livetower.server")
RECOMMENDER = pb.DESCRIPTOR.services_by_name["Recommender"].full_name
ADMIN = pb.DESCRIPTOR.services_by_name["EngineAdmin"].full_name
HEALTH = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
# The transport refuses larger messages from their length prefix, before buffering or parsing them
# (RESOURCE_EXHAUSTED); the margin lets a request just over max_request_bytes get the friendlier
# INVALID_ARGUMENT naming the limit (server/interceptors.py).
RECEIVE_MARGIN_BYTES = 64 << 10
GRPC_MAX_SEND_BYTES = 16 << 20  # our responses are bounded by RequestLimits (k, candidates): far below this


@dataclass(slots=True)
class LivetowerServer:
    config: ServerConfig
    grpc_server: grpc.aio.Server
    admin_server: grpc.aio.Server
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
    admin_port: int = 0                       # the admin listener's bound port
    tracing: Tracing = TRACING_OFF            # the request spans' tracer and exporter (off: no tracer)
    impressions: ImpressionWriter | None = None  # records answered Recommend requests (attribution.sqlite)
    catalog_writer: CatalogWriter | None = None  # where UpsertItems / DeleteItems write (the file or the stream)

    async def start(self) -> None:
        await self.sink.start()
        if self.impressions is not None:
            self.impressions.start()
        warm = []
        if self.event_log is not None:
            warm = await asyncio.to_thread(self.event_log.latest, self.config.history_warm_events)
        for ev in warm:
            self.history.append(ev.user_id, ev.item_id)
        if self.catalog_writer is not None:  # the stream: caught up before any engine serves
            await self.catalog_writer.start()
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
        await self.admin_server.start()
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self.health.set(ADMIN, health_pb2.HealthCheckResponse.SERVING)
        await self.health.set(RECOMMENDER, health_pb2.HealthCheckResponse.NOT_SERVING)
        self._tasks.append(asyncio.create_task(self.manager.run(self._stop)))
        self.metrics.watch_freshness(lambda: self.manager.current)
        self.metrics.watch_versions(lambda: {e.version for e in self.manager.serving_engines()})
        self.metrics.watch_stages(self.manager.clock)
        if self.batcher is not None:
            self.metrics.watch_batcher(self.batcher)
        if self.impressions is not None:
            path = self.config.attribution_path
            self.metrics.watch_outcomes(lambda: read_outcomes(path))
        self._tasks.append(asyncio.create_task(self._track_health()))
        log.info("gRPC on %s:%d (admin on %s:%d, %s); %d users' history warmed from %d events%s",
                 self.config.host, self.grpc_server_port, self.config.admin_host, self.admin_port,
                 "TLS" if self.config.tls else "plaintext", len(self.history), len(warm),
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
        grace = self.config.grace_s if grace is None else grace
        await asyncio.gather(self.grpc_server.stop(grace), self.admin_server.stop(grace))
        if self.batcher is not None:
            await self.batcher.stop()
        await asyncio.to_thread(self.manager.close)  # nothing computes now: the engines' compute processes go
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
        if self.feed is not None:
            await self.feed.stop()
        await self.sink.stop()
        if self.impressions is not None:  # after the listeners drained: every answered request's impression is queued
            await asyncio.to_thread(self.impressions.close)
        if self.catalog_writer is not None:  # after the listeners drained: no catalogue call is in flight
            await self.catalog_writer.stop()
        if self.manager.catalog is not None:
            self.manager.catalog.close()
        await asyncio.to_thread(self.tracing.shutdown)  # exports the spans still buffered (export_timeout_s)


def create_server(config: ServerConfig, *, admin_token: str | None = None) -> tuple[LivetowerServer, int]:
    """Build (not start) the server bound to config.host:config.port (and the admin listener); returns it and the
    bound data port. admin_token: the EngineAdmin token; None: config.admin_token_path's (created if missing)."""
    registry = open_registry(config.registry, config.data_dir)
    metrics = ServerMetrics()
    history = RecentHistory(max_users=config.history_users, per_user=config.history_len,
                            max_bytes=config.history_max_bytes)
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

    attribution_path = config.attribution_path
    manager = EngineManager(registry, config.engines, on_event=on_engine_event,
                            catalog=CatalogStore.in_dir(config.data_dir),
                            user_histories=lambda: history.sample(1000),
                            outcome_counts=(lambda served_from_ms, served_to_ms: window_counts(
                                attribution_path, served_from_ms, served_to_ms))
                            if config.impressions is not None else None)
    catalog_writer: CatalogWriter = (
        StreamCatalogWriter(parse_events_url(config.events_url), manager.catalog, manager.serving_engines)
        if config.catalog_on_stream else LocalCatalogWriter(manager.catalog, manager.serving_engines))
    if admin_token is not None:
        token, hint = admin_token, "the token the server was started with (LIVETOWER_ADMIN_TOKEN)"
    else:
        token, hint = load_or_create_token(config.admin_token_path), str(config.admin_token_path)
    producers = load_producer_tokens(config.producer_tokens_file) if config.producer_tokens_file else None
    buckets = (CallerBuckets(config.ingest_events_per_s, config.ingest_burst_events)
               if config.ingest_events_per_s is not None else None)
    tracing = start_tracing(config.tracing, "livetower-server")
    batcher = MicroBatcher(config.batching, tracing) if config.batching is not None else None
    options = [("grpc.max_receive_message_length", config.limits.max_request_bytes + RECEIVE_MARGIN_BYTES),
               ("grpc.max_send_message_length", GRPC_MAX_SEND_BYTES),
               ("grpc.so_reuseport", 1 if config.reuse_port else 0), *SERVER_KEEPALIVE]
    observe = ObservabilityInterceptor(metrics, config.limits.max_request_bytes, config.deadlines, tracing)
    grpc_server = grpc.aio.server(
        interceptors=[observe, IngestGuardInterceptor(producer_tokens=producers, buckets=buckets,
                                                      tokens_hint=str(config.producer_tokens_file))],
        options=options, maximum_concurrent_rpcs=config.max_concurrent_rpcs)
    impressions = None
    if config.impressions is not None:
        impressions = ImpressionWriter(config.attribution_path, config.impressions,
                                       on_drop=metrics.impressions_dropped.inc, on_written=metrics.impressions_written.inc)
    pb_grpc.add_RecommenderServicer_to_server(
        RecommenderServicer(manager=manager, history=history, sink=sink, limits=config.limits,
                            metrics=metrics, batcher=batcher, own_event_ids=own_ids,
                            event_limits=config.event_limits, ingest=config.ingest, impressions=impressions),
        grpc_server)
    add_kserve_to_server(grpc_server, manager=manager, registry=registry, limits=config.limits, batcher=batcher)
    health_servicer = health.aio.HealthServicer()  # one instance on both listeners: shutdown drains both
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, grpc_server)
    reflection.enable_server_reflection((RECOMMENDER, KSERVE, HEALTH, reflection.SERVICE_NAME), grpc_server)
    # Admin calls are few: a small concurrency cap keeps a flood of them from starving the event loop.
    admin_server = grpc.aio.server(interceptors=[observe, AdminAuthInterceptor(token, hint)], options=options,
                                   maximum_concurrent_rpcs=64)
    admin = EngineAdminServicer(manager=manager, registry=registry, fleet=config.fleet, catalog=catalog_writer)
    pb_grpc.add_EngineAdminServicer_to_server(admin, admin_server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, admin_server)
    reflection.enable_server_reflection((ADMIN, HEALTH, reflection.SERVICE_NAME), admin_server)
    port = _bind(grpc_server, config.host, config.port, config.tls, "gRPC")
    admin_port = _bind(admin_server, config.admin_host, config.admin_port, config.tls, "admin gRPC")
    manager.admin_address = config.admin_address(admin_port)  # before the watcher's first poll takes the lease
    server = LivetowerServer(config=config, grpc_server=grpc_server, admin_server=admin_server, manager=manager,
                             health=health_servicer, sink=sink, event_log=event_log, feed=feed, history=history,
                             metrics=metrics, batcher=batcher, tracing=tracing, impressions=impressions,
                             catalog_writer=catalog_writer)
    server._port, server.admin_port = port, admin_port
    return server, port


def _bind(server: grpc.aio.Server, host: str, port: int, tls: TlsConfig | None, what: str) -> int:
    if tls is not None:
        bound = server.add_secure_port(f"{host}:{port}", tls.server_credentials())
    else:
        if not is_loopback(host):
            log.warning("%s on %s:%d is PLAINTEXT and reachable from other machines: requests, events and tokens "
                        "cross the network in clear; pass --tls-cert-file/--tls-key-file (and --tls-client-ca-file "
                        "for mTLS)", what, host, port)
        bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"could not bind {what} on {host}:{port}: is another server running there?")
    return bound


async def serve(config: ServerConfig, *, on_started=None, admin_token: str | None = None) -> None:
    import sys

    import torch

    torch.set_num_threads(config.engines.num_threads)  # process-wide: retrieval and the user-tower runners
    sys.setswitchinterval(config.gil_switch_interval_s)  # process-wide: engine loads and shadow scoring run
    # Python in other threads; at the default 5 ms each of their turns could hold the event loop that long
    server, port = create_server(config, admin_token=admin_token)
    await server.start()
    if config.lock_memory:
        from server.memory_lock import lock_memory

        log.info("memory: %s", lock_memory())
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
