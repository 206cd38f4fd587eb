"""The `livetower` command line. Thin: parses flags into config dataclasses and calls the parts."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Callable

from contracts.config_flags import Flag, FlagSet, FlagValueError, config_from_args, flag_set, given_argv
from livetower.cli_engines import (ADMIN_TOKEN_ENV, DEFAULT_TARGET, add_engines_parser, client_tls,
                                   client_tls_flags, read_token)
from livetower.cli_archive import add_archive_parser
from livetower.cli_attribution import add_attribution_parser
from livetower.cli_catalog import add_catalog_parser
from livetower.cli_experiments import add_experiments_parser
from livetower.cli_signing import add_registry_parser

DEFAULT_DATA_DIR = Path("var/livetower")
PRODUCER_TOKEN_ENV = "LIVETOWER_PRODUCER_TOKEN"


def _server_flag_sets() -> tuple[FlagSet, FlagSet, FlagSet, FlagSet, FlagSet]:
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
                      "gc_freeze", "uvloop", Flag("reuse_port", note="set by --workers"),
                      "fleet", Flag("advertise_host", name="advertise"),
                      "admin_host", "admin_port", "admin_token_file", "producer_tokens_file",
                      Flag("ingest_events_per_s", to_field=lambda r: None if r <= 0 else r, note="0: no cap"),
                      "ingest_burst_events",
                      Flag("max_concurrent_rpcs", to_field=lambda n: None if n <= 0 else n, note="0: no cap"))
    engines = flag_set(EngineManagerConfig, "poll_interval_s", Flag("num_threads", name="threads"),
                       "trusted_keys", "require_signature", "replica_id", "lease_s",
                       Flag("use_ann", name="ann"),
                       Flag("leader", name="rollout-follower", negate=True,
                            note="--workers makes every process but the first a follower"))
    batching = flag_set(BatchingConfig, "max_batch", "max_delay_ms", "max_queue", "max_queue_delay_ms",
                        "max_loop_lag_ms", "inline_below_ms")
    return server, engines, batching, flag_set(TlsConfig, prefix="tls-"), flag_set(MethodDeadlines, prefix="deadline-")


def _train_flag_sets() -> tuple[FlagSet, FlagSet]:
    """The TrainConfig and ElasticConfig fields `train` and `up` take as flags."""
    from contracts.registry import BACKENDS
    from trainer.config import ELASTIC_DEVICES, PRECISIONS, ElasticConfig, TrainConfig

    train = flag_set(TrainConfig, Flag("backend", choices=BACKENDS), "round_min_events", "round_interval_s",
                     "max_round_events", Flag("epochs_per_round", name="epochs"), Flag("precision", choices=PRECISIONS),
                     "signing_key", "keep_engines", "item_min_count", "max_new_items_per_round", "item_ttl_s",
                     "max_users", "admission_sketch_width")
    elastic = flag_set(ElasticConfig, "min_workers", "max_workers", "events_per_worker",
                       Flag("device", name="train-device", choices=ELASTIC_DEVICES))
    return train, elastic


def _tracing_flags() -> FlagSet:
    """OpenTelemetry flags, shared by serve, train and up (one set: `up` hands them to its trainer too)."""
    from contracts.tracing import TracingConfig

    return flag_set(TracingConfig, Flag("enabled", name="tracing"), "otlp_endpoint", "sample_ratio", "service_name",
                    "tls", "ca_file", "export_interval_ms", "max_queue_spans", prefix="tracing-")


def _server_config(args):
    server, engines, batching, tls, deadlines = _server_flag_sets()
    return config_from_args(server, args, data_dir=args.data_dir, events_url=args.events, registry=args.registry,
                            engines=config_from_args(engines, args),
                            batching=None if args.no_batching else config_from_args(batching, args),
                            tls=config_from_args(tls, args) if tls.changes(args) else None,
                            deadlines=config_from_args(deadlines, args),
                            tracing=config_from_args(_tracing_flags(), args))


def _admin_token_from_env() -> str | None:
    """LIVETOWER_ADMIN_TOKEN, read here only and handed to the server; None: the server's token file."""
    return os.environ.get(ADMIN_TOKEN_ENV, "").strip() or None


def _train_config(args):
    from trainer.config import TrainConfig

    train, elastic = _train_flag_sets()
    base = TrainConfig.tiny_debug() if args.tiny else TrainConfig()
    return config_from_args(train, args, base, elastic=config_from_args(elastic, args, base.elastic),
                            tracing=config_from_args(_tracing_flags(), args, base.tracing),
                            inductor_cache_dir=args.data_dir / "inductor-cache")


def _add_events_flag(p: argparse.ArgumentParser) -> list[argparse.Action]:
    """--events and --registry: where events and engines live (shared by serve, train and up's sidecar)."""
    return [p.add_argument("--events", metavar="kafka://HOST:PORT/TOPIC",
                           help="event stream on Kafka (topic created with ?partitions=N, default 4, when missing); "
                                "default: the embedded SQLite log in --data-dir"),
            p.add_argument("--registry", metavar="PATH|s3://BUCKET/PREFIX",
                           help="engine registry: a directory, or object storage (s3://BUCKET/PREFIX[?endpoint=URL&"
                                "region=R], AWS credentials as usual; downloads cached in --data-dir/registry-cache); "
                                "default: --data-dir/registry")]


def _add_server_flags(p: argparse.ArgumentParser) -> None:
    _add_events_flag(p)
    server, engines, batching, tls, deadlines = _server_flag_sets()
    server.add_to(p)
    engines.add_to(p)
    p.add_argument("--no-batching", action="store_true", help="compute inline on the event loop (baseline)")
    batching.add_to(p)
    tls.add_to(p)
    deadlines.add_to(p)


def _priority_flags() -> FlagSet:
    """How the trainer yields the CPU to a server beside it (trainer/priority.py): on by default."""
    from trainer.priority import SidecarPriority

    return flag_set(SidecarPriority, Flag("nice", name="trainer-nice"), Flag("cpu_weight", name="trainer-cpu-weight"),
                    Flag("idle_policy", name="trainer-idle-policy"))


def _add_train_flags(p: argparse.ArgumentParser) -> list[argparse.Action]:
    train, elastic = _train_flag_sets()
    return [*train.add_to(p), *elastic.add_to(p), *_priority_flags().add_to(p), *_tracing_flags().add_to(p),
            p.add_argument("--tiny", action="store_true", help="tiny debug model and fast rounds (tests)"),
            p.add_argument("--trainer-metrics-port", type=int, default=9465,
                           help="the trainer's Prometheus port (consumer lag per partition; 0 = any free, -1 = off)")]


def _add_serve_flags(p: argparse.ArgumentParser) -> None:
    _add_server_flags(p)
    _tracing_flags().add_to(p)


def _add_up_flags(p: argparse.ArgumentParser) -> None:
    _add_server_flags(p)
    _add_train_flags(p)  # with the tracing flags, which `up` hands to its trainer as well


def _trainer_argv(args) -> list[str]:
    """The events and train flags given to `up`, for its `livetower train` sidecar."""
    p = argparse.ArgumentParser(add_help=False)
    return given_argv([*_add_events_flag(p), *_add_train_flags(p)], args)


class _LazyParser(argparse.ArgumentParser):
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


def _serve_workers(args, config) -> int:
    """--workers N: N server processes sharing the port with SO_REUSEPORT; the kernel spreads connections."""
    import subprocess

    if config.port == 0:
        raise SystemExit("--workers needs an explicit --port (processes must share one port)")
    argv = [a for a in sys.argv[1:] if a != "--reuse-port"]
    i = argv.index("--workers") if "--workers" in argv else None
    if i is not None:
        del argv[i:i + 2]
    argv = [a for a in argv if not a.startswith("--workers=")]
    procs = []
    for w in range(args.workers):
        metrics = -1 if config.metrics_port is None else (0 if config.metrics_port == 0 else config.metrics_port + w)
        follower = ["--rollout-follower"] if w > 0 else []
        procs.append(subprocess.Popen([sys.executable, "-m", "livetower", *argv, "--reuse-port", *follower,
                                       "--metrics-port", str(metrics)]))
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.is_set() and all(p.poll() is None for p in procs):
        stop.wait(0.5)
    for p in procs:
        if p.poll() is None:
            p.terminate()
    return max(p.wait() for p in procs)


def cmd_serve(args) -> int:
    from server.app import run, serve

    config = _server_config(args)
    if args.workers > 1:
        return _serve_workers(args, config)
    run(serve(config, admin_token=_admin_token_from_env(), on_started=lambda s, port: print(
        f"serving gRPC on {config.host}:{port} (admin on {config.admin_host}:{s.admin_port}, metrics port "
        f"{s.metrics_port})", flush=True)), use_uvloop=config.uvloop)
    return 0


def cmd_train(args) -> int:
    import torch

    from prometheus_client import start_http_server

    from contracts.object_registry import open_registry
    from trainer.loop import Trainer
    from trainer.priority import lower_priority

    cfg = _train_config(args)
    lower_priority(config_from_args(_priority_flags(), args))  # before any thread or worker starts: they inherit it
    torch.set_num_threads(args.train_threads)
    if args.backfill:
        if args.events:
            raise SystemExit("--backfill trains from the archive: drop --events (a later run with --events continues)")
        from trainer.sources.archive import ArchiveError
        from livetower.cli_archive import backfill_source

        try:
            event_log = backfill_source(args.backfill)
        except ArchiveError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    elif args.events:
        from contracts.kafka_events import parse_events_url
        from trainer.sources.kafka import KafkaEventSource

        event_log = KafkaEventSource(parse_events_url(args.events), group_id=args.group_id)
    else:
        from contracts.eventlog import SqliteEventLog

        event_log = SqliteEventLog(args.data_dir / "events.sqlite")
    registry = open_registry(args.registry, args.data_dir)
    trainer = Trainer(cfg, event_log, registry, args.data_dir / "trainer",
                      ledger_path=args.ledger)
    if args.trainer_metrics_port >= 0:
        httpd, _ = start_http_server(args.trainer_metrics_port, addr="127.0.0.1", registry=trainer.metrics.registry)
        logging.getLogger("livetower.trainer").info("trainer metrics on http://127.0.0.1:%d/metrics",
                                                    httpd.server_port)
    if args.backfill:
        from livetower.cli_archive import run_backfill

        try:
            return run_backfill(trainer)
        finally:
            trainer.close()
            event_log.close()
    if args.once:
        try:
            result = trainer.run_round()
        finally:
            trainer.close()
        print(json.dumps(None if result is None else dataclasses.asdict(result), indent=1))
        return 0
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    logging.getLogger("livetower.trainer").info("trainer running on %s (backend %s, backlog %d events)",
                                                args.data_dir, cfg.backend, trainer.backlog())
    try:
        trainer.run(stop)
    finally:
        trainer.close()
        event_log.close()
    return 0


def cmd_up(args) -> int:
    from livetower.up import run_up

    config = _server_config(args)
    _train_config(args)  # a bad train flag stops `up` here instead of failing in the restarted sidecar
    run_up(config, train_args=_trainer_argv(args), bootstrap_users=args.bootstrap_users,
           admin_token=_admin_token_from_env())
    return 0


def cmd_ingest(args) -> int:
    from contracts.eventlog import SqliteEventLog

    if args.source == "synthetic":
        from trainer.data.synthetic import SyntheticConfig, generate

        events = list(generate(SyntheticConfig(n_users=args.users, seed=args.seed)))
    else:
        from trainer.data.movielens import load_ml100k

        events = load_ml100k(args.path)
    log = SqliteEventLog(args.data_dir / "events.sqlite")
    added = log.append_all(events)
    print(f"appended {added} new events ({len(events) - added} already present) to {log.path}")
    return 0


def cmd_query(args) -> int:
    from google.protobuf import json_format

    from contracts.client import Client

    producer_token = None
    if args.what == "log" and (os.environ.get(PRODUCER_TOKEN_ENV) or args.producer_token_file):
        producer_token = read_token(PRODUCER_TOKEN_ENV, args.producer_token_file, "producer token",
                                    "--producer-token-file")
    c = Client(args.target, tls=client_tls(args), producer_token=producer_token)
    history = args.history.split(",") if args.history else None
    if args.what == "recommend":
        resp = c.recommend(args.user, k=args.k, history=history, exclude_seen=args.exclude_seen)
    elif args.what == "score":
        resp = c.score(args.user, args.candidates.split(","), history=history)
    else:
        resp = c.log_event(args.user, args.item)
    print(json_format.MessageToJson(resp, preserving_proto_field_name=True))
    return 0


def cmd_broker(args) -> int:
    from benchmarks.tansu import LocalBroker

    broker = LocalBroker(args.port).start()
    print(f"tansu Kafka-protocol broker on {broker.bootstrap} (memory storage: topics vanish when it stops); "
          f"use --events kafka://{broker.bootstrap}/events. Ctrl-C stops it.", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.is_set() and broker.proc.poll() is None:
        stop.wait(0.5)
    broker.stop()
    return 0


def cmd_eval(args) -> int:
    from trainer.studies.eval_cli import run_eval_command

    return run_eval_command(args)


# `livetower bench X`: benchmarks/<module>.py's main(argv), and what it measures.
BENCHES = {
    "build": ("engine_build", "engine backends compared"),
    "catalog": ("catalog", "a trained catalogue for load tests"),
    "load": ("loadgen", "open-loop load generator"),
    "slo": ("slo", "baseline vs optimised serving at fixed rates, capacity, CPU per request by component"),
    "peers": ("peers", "livetower vs Ray Serve serving the same engine: P99 at 200 QPS, capacity"),
    "swap": ("swap", "canary, promote and rollback under load, memory over swap cycles"),
    "kill": ("kill_campaign", "kill -9 the Kafka-fed trainer many times, count lost events"),
    "stream": ("stream", "event -> history latency and event -> serving freshness on Kafka"),
    "kernels": ("kernels", "Triton retrieval kernel vs torch on a GPU"),
    "train": ("train_bench", "training throughput per worker count and precision, elastic scaling events"),
    "replay": ("replay", "ml-100k in time order, continuous vs frozen engines vs popularity"),
    "hardening-limits": ("hardening_limits", "16 concurrent 60 MiB requests: status codes, server RSS growth"),
    "hardening-state": ("hardening_state", "dead-letter fsyncs and a concurrent LogEvents' latency; "
                                           "1M new item ids through the trainer's admission"),
}


def cmd_bench(args) -> int:
    import importlib

    module = BENCHES[args.what][0]
    return importlib.import_module(f"benchmarks.{module}").main(args.rest)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="livetower", description=__doc__)
    p.add_argument("--log-level", default=os.environ.get("LIVETOWER_LOG_LEVEL", "INFO"))
    sub = p.add_subparsers(dest="command", required=True, parser_class=_LazyParser)

    up = sub.add_parser("up", help="server + trainer sidecar on embedded defaults", add_flags=_add_up_flags)
    up.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    up.add_argument("--bootstrap-users", type=int, default=2000, help="synthetic users when the log is empty")
    up.set_defaults(func=cmd_up)

    serve = sub.add_parser("serve", help="the gRPC server alone", add_flags=_add_serve_flags)
    serve.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    serve.add_argument("--workers", type=int, default=1, help="server processes sharing the port (SO_REUSEPORT)")
    serve.set_defaults(func=cmd_serve)

    train = sub.add_parser("train", help="the trainer alone", add_flags=_add_train_flags)
    train.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    train.add_argument("--once", action="store_true", help="run one round and exit")
    train.add_argument("--train-threads", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    train.add_argument("--group-id", default="livetower-trainer", help="Kafka consumer group (with --events)")
    train.add_argument("--ledger", type=Path, help="append '<round> <pid> <event_id>' per trained event (audits)")
    train.add_argument("--backfill", metavar="PATH",
                       help="train from a Delta archive (livetower archive) until it is drained, then exit; "
                            "a later plain run continues after the archived events")
    _add_events_flag(train)
    train.set_defaults(func=cmd_train)

    ingest = sub.add_parser("ingest", help="append events to the log from a generator or data set")
    ingest.add_argument("source", choices=("synthetic", "ml100k"))
    ingest.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    ingest.add_argument("--path", type=Path, default=Path("../shared/data/ml-100k"))
    ingest.add_argument("--users", type=int, default=2000)
    ingest.add_argument("--seed", type=int, default=0)
    ingest.set_defaults(func=cmd_ingest)

    query = sub.add_parser("query", help="call the native API")
    query.add_argument("what", choices=("recommend", "score", "log"))
    query.add_argument("--target", default=DEFAULT_TARGET)
    query.add_argument("--user", required=True)
    query.add_argument("--k", type=int, default=10)
    query.add_argument("--history", help="comma-separated item ids, newest last")
    query.add_argument("--candidates", default="", help="comma-separated item ids (score)")
    query.add_argument("--item", help="item id (log)")
    query.add_argument("--exclude-seen", action="store_true")
    query.add_argument("--producer-token-file", type=Path,
                       help=f"log: file (mode 0600) with this producer's token, for a server with "
                            f"--producer-tokens-file; the environment variable {PRODUCER_TOKEN_ENV} wins")
    client_tls_flags().add_to(query)
    query.set_defaults(func=cmd_query)

    add_engines_parser(sub)
    add_registry_parser(sub)
    add_archive_parser(sub)
    add_attribution_parser(sub)
    add_experiments_parser(sub)
    add_catalog_parser(sub)

    broker = sub.add_parser("broker", help="a local Kafka-protocol broker (tansu, memory only) for trying --events")
    broker.add_argument("--port", type=int, default=9092)
    broker.set_defaults(func=cmd_broker)

    ev = sub.add_parser("eval", help="offline quality on a named protocol (sasrec, full, time) vs popularity")
    from trainer.studies.eval_cli import add_eval_flags

    add_eval_flags(ev)
    ev.set_defaults(func=cmd_eval)
    bench = sub.add_parser("bench", help="benchmarks (JSON + PNG under bench-results/)")
    bench.add_argument("what", choices=tuple(BENCHES),
                       help="; ".join(f"{name}: {what}" for name, (_, what) in BENCHES.items()))
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="the benchmark's own flags (see --help after it)")
    bench.set_defaults(func=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("livetower").setLevel(args.log_level.upper())  # third-party libraries stay at WARNING
    import grpc

    try:
        return args.func(args)
    except FlagValueError as e:
        print(f"livetower {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except grpc.RpcError as e:
        print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
