"""Server configuration: one typed, validated dataclass passed explicitly."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from server.batching import BatchingConfig
from server.engine.manager import EngineManagerConfig


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
class ServerConfig:
    data_dir: Path                        # holds events.sqlite and registry/
    events_url: str | None = None         # kafka://HOST:PORT/TOPIC[?partitions=N]; None: data_dir/events.sqlite
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
    history_warm_events: int = 200_000    # newest logged events replayed into the history at start
    grace_s: float = 5.0                  # drain time for in-flight requests at shutdown
    gc_freeze: bool = True                # gc.freeze() after start-up and after each engine load: long-lived
                                          # objects (histories, vocabularies) leave the cyclic GC's scans, whose
                                          # full passes otherwise stalled every thread 40-300 ms under load
    gil_switch_interval_s: float = 0.001  # sys.setswitchinterval: how long a thread running Python may keep
                                          # others (the event loop) waiting for the GIL; Python's default is 5 ms
    admin_token: str | None = None        # EngineAdmin bearer token; None: read admin_token_path
    admin_token_file: Path | None = None  # token file; None: <data_dir>/admin.token (created, 0600, if missing)

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port must be in 0..65535 or None, got {self.metrics_port}")
        for name in ("history_users", "history_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.history_warm_events < 0:
            raise ValueError(f"history_warm_events must be >= 0, got {self.history_warm_events}")
        if self.admin_token is not None and len(self.admin_token) < 16:
            raise ValueError("admin_token must be at least 16 characters")
        if self.events_url is not None:
            from contracts.kafka_events import parse_events_url

            parse_events_url(self.events_url)  # ValueError naming what is wrong
        if self.max_inflight_events < 1:
            raise ValueError(f"max_inflight_events must be >= 1, got {self.max_inflight_events}")
        if self.grace_s < 0:
            raise ValueError(f"grace_s must be >= 0, got {self.grace_s}")
        if not 0 < self.gil_switch_interval_s <= 0.1:
            raise ValueError(f"gil_switch_interval_s must be in (0, 0.1], got {self.gil_switch_interval_s}")

    @property
    def events_path(self) -> Path:
        return Path(self.data_dir) / "events.sqlite"

    @property
    def admin_token_path(self) -> Path:
        return Path(self.admin_token_file) if self.admin_token_file else Path(self.data_dir) / "admin.token"

    @property
    def registry_path(self) -> Path:
        return Path(self.data_dir) / "registry"
