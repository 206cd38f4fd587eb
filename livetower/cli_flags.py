"""The flags of `livetower serve`, `train` and `up`: which config dataclass fields each takes
(contracts/config_flags.py FlagSets), how the parsed flags become ServerConfig / TrainConfig, the flags `up` hands
its trainer sidecar, and the parser that adds them only when its subcommand is used (their modules import torch).
"""

from __future__ import annotations

import argparse
from typing import Callable

from contracts.config_flags import Flag, FlagSet, config_from_args, flag_set, given_argv


def server_flag_sets() -> tuple[FlagSet, FlagSet, FlagSet, FlagSet, FlagSet]:
    """The ServerConfig, EngineManagerConfig, BatchingConfig, TlsConfig and MethodDeadlines fields `serve` and
    `up` take as flags."""
    from contracts.tls import TlsConfig
    from server.batching import BatchingConfig
    from server.config import MethodDeadlines, ServerConfig
    from server.engine.manager import EngineManagerConfig

    server = flag_set(ServerConfig, "host", "port", "history_max_bytes",
                      Flag("metrics_port", to_field=lambda port: None if port < 0 else port, note="-1: off"),
                      Flag("gil_switch_interval_s", name="gil-switch-interval-ms", to_field=lambda ms: ms / 1e3,
                           shown=lambda s: s * 1e3, note="in ms"),
                      "gc_freeze", "lock_memory", "uvloop", Flag("reuse_port", note="set by --workers"),
                      "fleet", "catalog_stream", Flag("advertise_host", name="advertise"),
                      "admin_host", "admin_port", "admin_token_file", "producer_tokens_file",
                      Flag("ingest_events_per_s", to_field=lambda r: None if r <= 0 else r, note="0: no cap"),
                      "ingest_burst_events",
                      Flag("max_concurrent_rpcs", to_field=lambda n: None if n <= 0 else n, note="0: no cap"))
    engines = flag_set(EngineManagerConfig, "poll_interval_s", Flag("num_threads", name="threads"),
                       "trusted_keys", "require_signature", "replica_id", "lease_s", "load_nice",
                       Flag("use_ann", name="ann"), "compute_process",
                       Flag("leader", name="rollout-follower", negate=True,
                            note="--workers makes every process but the first a follower"))
    batching = flag_set(BatchingConfig, "max_batch", "max_delay_ms", "max_queue", "max_queue_delay_ms",
                        "standing_queue_ms", "burst_queue_delay_ms", "max_loop_lag_ms", "inline_below_ms",
                        "inline_max_loop_busy")
    return server, engines, batching, flag_set(TlsConfig, prefix="tls-"), flag_set(MethodDeadlines, prefix="deadline-")


def train_flag_sets() -> tuple[FlagSet, FlagSet]:
    """The TrainConfig and ElasticConfig fields `train` and `up` take as flags."""
    from contracts.registry import BACKENDS
    from trainer.config import ELASTIC_DEVICES, PRECISIONS, ElasticConfig, TrainConfig

    train = flag_set(TrainConfig, Flag("backend", choices=BACKENDS), "round_min_events", "round_interval_s",
                     "max_round_events", Flag("epochs_per_round", name="epochs"), Flag("precision", choices=PRECISIONS),
                     "signing_key", "keep_engines", "item_min_count", "max_new_items_per_round", "item_ttl_s",
                     "max_users", "admission_sketch_width", "short_round_max_events", "short_round_interval_s",
                     "short_round_epochs", "item_features", "user_features")
    elastic = flag_set(ElasticConfig, "min_workers", "max_workers", "events_per_worker",
                       Flag("device", name="train-device", choices=ELASTIC_DEVICES))
    return train, elastic


def tracing_flags() -> FlagSet:
    """OpenTelemetry flags, shared by serve, train and up (one set: `up` hands them to its trainer too)."""
    from contracts.tracing import TracingConfig

    return flag_set(TracingConfig, Flag("enabled", name="tracing"), "otlp_endpoint", "sample_ratio", "service_name",
                    "tls", "ca_file", "export_interval_ms", "max_queue_spans", prefix="tracing-")


def server_config(args):
    server, engines, batching, tls, deadlines = server_flag_sets()
    return config_from_args(server, args, data_dir=args.data_dir, events_url=args.events, registry=args.registry,
                            engines=config_from_args(engines, args),
                            batching=None if args.no_batching else config_from_args(batching, args),
                            tls=config_from_args(tls, args) if tls.changes(args) else None,
                            deadlines=config_from_args(deadlines, args),
                            tracing=config_from_args(tracing_flags(), args))


def train_config(args):
    from trainer.config import TrainConfig

    train, elastic = train_flag_sets()
    base = TrainConfig.tiny_debug() if args.tiny else TrainConfig()
    return config_from_args(train, args, base, elastic=config_from_args(elastic, args, base.elastic),
                            tracing=config_from_args(tracing_flags(), args, base.tracing),
                            inductor_cache_dir=args.data_dir / "inductor-cache")


def add_events_flag(p: argparse.ArgumentParser) -> list[argparse.Action]:
    """--events and --registry: where events and engines live (shared by serve, train and up's sidecar)."""
    return [p.add_argument("--events", metavar="kafka://HOST:PORT/TOPIC",
                           help="event stream on Kafka (topic created with ?partitions=N, default 4, when missing); "
                                "default: the embedded SQLite log in --data-dir"),
            p.add_argument("--registry", metavar="PATH|s3://BUCKET/PREFIX",
                           help="engine registry: a directory, or object storage (s3://BUCKET/PREFIX[?endpoint=URL&"
                                "region=R], AWS credentials as usual; downloads cached in --data-dir/registry-cache); "
                                "default: --data-dir/registry")]


def _add_server_flags(p: argparse.ArgumentParser) -> None:
    add_events_flag(p)
    server, engines, batching, tls, deadlines = server_flag_sets()
    server.add_to(p)
    engines.add_to(p)
    p.add_argument("--no-batching", action="store_true", help="compute inline on the event loop (baseline)")
    batching.add_to(p)
    tls.add_to(p)
    deadlines.add_to(p)


def priority_flags() -> FlagSet:
    """How the trainer yields the CPU to a server beside it (trainer/priority.py): on by default."""
    from trainer.priority import SidecarPriority

    return flag_set(SidecarPriority, Flag("nice", name="trainer-nice"), Flag("cpu_weight", name="trainer-cpu-weight"),
                    Flag("cpu_max", name="trainer-cpu-max"), Flag("cpus", name="trainer-cpus"),
                    Flag("idle_policy", name="trainer-idle-policy"), Flag("passive_wait", name="trainer-passive-wait"))


def add_train_flags(p: argparse.ArgumentParser) -> list[argparse.Action]:
    train, elastic = train_flag_sets()
    return [*train.add_to(p), *elastic.add_to(p), *priority_flags().add_to(p), *tracing_flags().add_to(p),
            p.add_argument("--tiny", action="store_true", help="tiny debug model and fast rounds (tests)"),
            p.add_argument("--trainer-metrics-port", type=int, default=9465,
                           help="the trainer's Prometheus port (consumer lag per partition; 0 = any free, -1 = off)")]


def add_serve_flags(p: argparse.ArgumentParser) -> None:
    _add_server_flags(p)
    tracing_flags().add_to(p)


def add_up_flags(p: argparse.ArgumentParser) -> None:
    _add_server_flags(p)
    add_train_flags(p)  # with the tracing flags, which `up` hands to its trainer as well


def trainer_argv(args) -> list[str]:
    """The events and train flags given to `up`, for its `livetower train` sidecar."""
    p = argparse.ArgumentParser(add_help=False)
    return given_argv([*add_events_flag(p), *add_train_flags(p)], args)


class LazyParser(argparse.ArgumentParser):
    """A subcommand parser whose flags are added when it is first used: serve/train/up read theirs from config
    dataclasses whose modules import torch, which the other commands should not wait for."""

    def __init__(self, *args, add_flags: Callable[[argparse.ArgumentParser], None] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._add_flags = add_flags

    def _populate(self) -> None:
        add, self._add_flags = self._add_flags, None
        if add is not None:
            add(self)

    def parse_known_args(self, args=None, namespace=None):
        self._populate()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self._populate()
        return super().format_help()
