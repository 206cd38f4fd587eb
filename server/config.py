"""Server configuration: one typed, validated dataclass passed explicitly."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from contracts.attribution import ATTRIBUTION_FILE
from contracts.impressions import ImpressionConfig
from contracts.events import EventLimits
from contracts.tls import TlsConfig
from contracts.tracing import TracingConfig
from server.batching import BatchingConfig
from server.engine.manager import EngineManagerConfig
from server.events.sink import IngestConfig


@dataclass(kw_only=True, frozen=True, slots=True)
class RequestLimits:
    max_k: int = 1000                    # Recommend.k must be in 1..max_k
    max_candidates: int = 10_000         # Score.candidate_ids per request
    max_history: int = 512               # items in a request's history
    max_id_chars: int = 256              # user/item id length
    max_events: int = 10_000             # LogEvents.events per request
    max_request_bytes: int = 4 << 20     # serialized request size; larger gets INVALID_ARGUMENT

    def __post_init__(self) -> None:
        for name in ("max_k", "max_candidates", "max_history", "max_id_chars", "max_events", "max_request_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass(kw_only=True, frozen=True, slots=True)
class MethodDeadlines:
    """Server-side deadlines per kind of method: applied when the client sent no deadline or a longer one."""

    query_s: float = 10.0     # Recommend, Score and KServe ModelInfer
    ingest_s: float = 30.0    # LogEvents
    admin_s: float = 300.0    # EngineAdmin (StartCanary and Rollback load and check an engine inside the call)
    other_s: float = 30.0     # everything else (KServe metadata, reflection)

    def __post_init__(self) -> None:
        for name in ("query_s", "ingest_s", "admin_s", "other_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"deadline {name} must be > 0, got {getattr(self, name)}")


@dataclass(kw_only=True, frozen=True, slots=True)
class ServerConfig:
    data_dir: Path                        # holds events.sqlite and registry/
    events_url: str | None = None         # kafka://HOST:PORT/TOPIC[?partitions=N]; None: data_dir/events.sqlite
    registry: str | None = None           # engine registry: a directory, or s3://BUCKET/PREFIX (cached in
                                          # data_dir/registry-cache; contracts/object_registry.py);
                                          # None: data_dir/registry
    fleet: bool = False                   # one replica of many on one registry and one Kafka topic: events must
                                          # be on Kafka and the registry shared (s3:// or a shared directory);
                                          # rollout changes go to the decision lease's holder (others refuse
                                          # them, naming its admin address)
    catalog_stream: bool = False          # the catalogue (UpsertItems / DeleteItems) on the Kafka topic
                                          # <events topic>.catalog, followed into data_dir/catalog.sqlite
                                          # (contracts/catalog_stream.py); fleet implies it; False: that file only
    advertise_host: str = ""              # host other replicas and operators reach this admin listener at;
                                          # "": admin_host, or this machine's hostname when that is a wildcard
    max_inflight_events: int = 50_000     # Kafka: events awaiting acks before LogEvents sheds (RESOURCE_EXHAUSTED)
    host: str = "127.0.0.1"               # interface the gRPC server binds
    port: int = 50051                     # gRPC port (0 = pick a free one)
    metrics_port: int | None = 9464       # Prometheus /metrics port (0 = a free one, None = off)
    limits: RequestLimits = field(default_factory=RequestLimits)  # bounds on one request (k, candidates, history, ids, bytes)
    engines: EngineManagerConfig = field(default_factory=EngineManagerConfig)  # engine loading, rollout and canary
    batching: BatchingConfig | None = field(default_factory=BatchingConfig)  # None: inline, no batching
    uvloop: bool = True                   # run the server on uvloop when it is installed
    reuse_port: bool = False              # SO_REUSEPORT: several server processes share one port
    history_users: int = 100_000          # users whose recent history is kept in memory (LRU)
    history_len: int = 50                 # recent items kept per user
    history_max_bytes: int = 256 << 20    # estimated bytes all recent histories may hold (least recently active
                                          # users evicted first): bounds memory whatever ids callers send
    event_limits: EventLimits = field(default_factory=EventLimits)  # what one event may hold: id lengths, |weight|, clock skew
    ingest: IngestConfig = field(default_factory=IngestConfig)      # per-request dead-letter cap
    history_warm_events: int = 200_000    # newest logged events replayed into the history at start
    grace_s: float = 5.0                  # drain time for in-flight requests at shutdown
    gc_freeze: bool = True                # gc.freeze() after start-up and after each engine load: long-lived
                                          # objects (histories, vocabularies) leave the cyclic GC's scans, whose
                                          # full passes otherwise stalled every thread 40-300 ms under load
    lock_memory: bool = False             # `serve`: keep the process's pages in RAM once touched (mlockall, Linux;
                                          # server/memory_lock.py), so no request waits on a page read back from
                                          # disk. Off: beside the trainer it did not separate from the run-to-run
                                          # spread (docs/serving.md section 7)
    gil_switch_interval_s: float = 0.001  # sys.setswitchinterval: how long a thread running Python may keep
                                          # others (the event loop) waiting for the GIL; Python's default is 5 ms
    admin_host: str = "127.0.0.1"         # interface the admin listener (EngineAdmin only) binds
    admin_port: int = 50052               # admin listener port (0 = pick a free one)
    admin_token_file: Path | None = None  # admin token file, mode 0600; None: <data_dir>/admin.token (created if missing)
    tls: TlsConfig | None = None          # TLS (and mTLS with a client CA) on both listeners; None: plaintext
    producer_tokens_file: Path | None = None  # "name:token" lines, mode 0600; set: LogEvents needs
                                          # 'authorization: Bearer <token>' of one producer
    ingest_events_per_s: float | None = 20_000.0  # LogEvents events/s per caller (producer, else peer host); None: no cap
    ingest_burst_events: int = 50_000     # events a caller may send at once above its rate (>= limits.max_events)
    max_concurrent_rpcs: int | None = 2048  # RPCs in progress on the data listener; beyond: RESOURCE_EXHAUSTED
    deadlines: MethodDeadlines = field(default_factory=MethodDeadlines)  # server-side deadline per kind of method
    tracing: TracingConfig = field(default_factory=TracingConfig)  # OpenTelemetry request spans over OTLP (off)
    impressions: ImpressionConfig | None = field(default_factory=ImpressionConfig)  # Recommend responses recorded
                                          # in data_dir/attribution.sqlite for attribution; None: off (no impression_id)

    @property
    def catalog_on_stream(self) -> bool:
        """The catalogue follows the Kafka stream: asked for, or a fleet (one host's file cannot serve it)."""
        return self.catalog_stream or self.fleet

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port must be in 0..65535 or None, got {self.metrics_port}")
        for name in ("history_users", "history_len", "history_max_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.history_warm_events < 0:
            raise ValueError(f"history_warm_events must be >= 0, got {self.history_warm_events}")
        if not 0 <= self.admin_port <= 65535:
            raise ValueError(f"admin_port must be in 0..65535, got {self.admin_port}")
        if self.admin_port != 0 and self.admin_port == self.port and self.admin_host == self.host:
            raise ValueError(f"admin_port {self.admin_port} is the data port: the admin listener needs its own")
        if self.ingest_events_per_s is not None and not self.ingest_events_per_s > 0:
            raise ValueError(f"ingest_events_per_s must be > 0 or None, got {self.ingest_events_per_s}")
        if self.ingest_burst_events < self.limits.max_events:
            raise ValueError(f"ingest_burst_events ({self.ingest_burst_events}) must be >= limits.max_events "
                             f"({self.limits.max_events}): a full LogEvents request must be able to pass")
        if self.max_concurrent_rpcs is not None and self.max_concurrent_rpcs < 1:
            raise ValueError(f"max_concurrent_rpcs must be >= 1 or None, got {self.max_concurrent_rpcs}")
        if self.events_url is not None:
            from contracts.kafka_events import parse_events_url

            parse_events_url(self.events_url)  # ValueError naming what is wrong
        if self.registry is not None and self.registry.startswith("s3://"):
            from contracts.object_registry import s3_store

            s3_store(self.registry)  # ValueError naming what is wrong
        if self.fleet and self.events_url is None:
            raise ValueError("fleet needs the events on Kafka: pass --events kafka://HOST:PORT/TOPIC (the SQLite "
                             "log is one host's file, and SQLite's WAL does not work on a network filesystem)")
        if self.catalog_stream and self.events_url is None:
            raise ValueError("catalog_stream needs the events on Kafka (the catalogue topic is <events topic>.catalog): "
                             "pass --events kafka://HOST:PORT/TOPIC")
        if self.fleet and self.registry is None:
            raise ValueError("fleet needs one registry shared by every replica: pass --registry s3://BUCKET/PREFIX "
                             "(or a directory every replica mounts)")
        if self.advertise_host and (":" in self.advertise_host or "/" in self.advertise_host):
            raise ValueError(f"advertise_host must be a bare host name or IPv4 address, got {self.advertise_host!r}")
        if self.max_inflight_events < 1:
            raise ValueError(f"max_inflight_events must be >= 1, got {self.max_inflight_events}")
        if self.grace_s < 0:
            raise ValueError(f"grace_s must be >= 0, got {self.grace_s}")
        if not 0 < self.gil_switch_interval_s <= 0.1:
            raise ValueError(f"gil_switch_interval_s must be in (0, 0.1], got {self.gil_switch_interval_s}")

    def admin_address(self, bound_port: int) -> str:
        """HOST:PORT where other replicas and operators reach the admin listener bound on bound_port."""
        import socket

        host = self.advertise_host or (self.admin_host if self.admin_host not in ("0.0.0.0", "::", "", "[::]")
                                       else socket.gethostname())
        return f"{host}:{bound_port}"

    @property
    def events_path(self) -> Path:
        return Path(self.data_dir) / "events.sqlite"

    @property
    def attribution_path(self) -> Path:
        return Path(self.data_dir) / ATTRIBUTION_FILE

    @property
    def admin_token_path(self) -> Path:
        return Path(self.admin_token_file) if self.admin_token_file else Path(self.data_dir) / "admin.token"

