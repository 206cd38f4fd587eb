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

from contracts.config_flags import FlagValueError, config_from_args
from livetower.cli_engines import (ADMIN_TOKEN_ENV, DEFAULT_TARGET, add_engines_parser, client_tls,
                                   client_tls_flags, read_token)
from livetower.cli_archive import add_archive_parser
from livetower.cli_attribution import add_attribution_parser
from livetower.cli_catalog import add_catalog_parser
from livetower.cli_experiments import add_experiments_parser
from livetower.cli_flags import (LazyParser, add_events_flag, add_serve_flags, add_train_flags, add_up_flags,
                                 priority_flags, server_config, train_config, trainer_argv)
from livetower.cli_signing import add_registry_parser

DEFAULT_DATA_DIR = Path("var/livetower")
PRODUCER_TOKEN_ENV = "LIVETOWER_PRODUCER_TOKEN"


def _admin_token_from_env() -> str | None:
    """LIVETOWER_ADMIN_TOKEN, read here only and handed to the server; None: the server's token file."""
    return os.environ.get(ADMIN_TOKEN_ENV, "").strip() or None


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

    config = server_config(args)
    if args.workers > 1:
        return _serve_workers(args, config)
    run(serve(config, admin_token=_admin_token_from_env(), on_started=lambda s, port: print(
        f"serving gRPC on {config.host}:{port} (admin on {config.admin_host}:{s.admin_port}, metrics port "
        f"{s.metrics_port})", flush=True)), use_uvloop=config.uvloop)
    return 0


def cmd_train(args) -> int:
    from trainer.priority import lower_priority, prefer_passive_openmp

    priority = config_from_args(priority_flags(), args)
    prefer_passive_openmp(priority)  # before torch (and faiss) load libgomp, which reads it once

    import torch

    from prometheus_client import start_http_server

    from contracts.object_registry import open_registry
    from trainer.loop import Trainer

    cfg = train_config(args)
    lower_priority(priority)  # before any thread or worker starts: they inherit it
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
    catalog = follow = None
    if args.catalog_stream:
        follow = _follow_catalog_stream(args)
    if cfg.item_features or cfg.user_features or (args.data_dir / "catalog.sqlite").exists():  # a feature checkpoint needs it too
        from contracts.catalog import CatalogStore

        catalog = CatalogStore(args.data_dir / "catalog.sqlite")
    trainer = Trainer(cfg, event_log, registry, args.data_dir / "trainer",
                      ledger_path=args.ledger, catalog=catalog)
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
        if follow is not None:
            follow.stop()
    return 0


def _follow_catalog_stream(args):
    """`train --catalog-stream`: keep --data-dir/catalog.sqlite following the catalogue topic (a fleet's trainer)."""
    from contracts.catalog import CatalogStore
    from contracts.catalog_stream import CatalogFollowThread, catalog_topic
    from contracts.kafka_events import parse_events_url

    if not args.events:
        raise SystemExit("--catalog-stream follows <events topic>.catalog: pass --events kafka://HOST:PORT/TOPIC")
    target = parse_events_url(args.events)
    try:
        follow = CatalogFollowThread(target, CatalogStore(args.data_dir / "catalog.sqlite"))
        follow.start()
    except (ValueError, RuntimeError, ConnectionError) as e:
        raise SystemExit(f"--catalog-stream: {e}") from None
    logging.getLogger("livetower.trainer").info("catalogue follows Kafka topic %s (offset %d)", catalog_topic(target),
                                                follow.follower.next_offset)
    return follow


def cmd_up(args) -> int:
    from livetower.up import run_up

    config = server_config(args)
    train_config(args)  # a bad train flag stops `up` here instead of failing in the restarted sidecar
    run_up(config, train_args=trainer_argv(args), bootstrap_users=args.bootstrap_users,
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
    "gil": ("gil_handoffs", "the compute thread's calls alone and beside a thread busy in Python: GIL hand-offs"),
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
    sub = p.add_subparsers(dest="command", required=True, parser_class=LazyParser)

    up = sub.add_parser("up", help="server + trainer sidecar on embedded defaults", add_flags=add_up_flags)
    up.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    up.add_argument("--bootstrap-users", type=int, default=2000, help="synthetic users when the log is empty")
    up.set_defaults(func=cmd_up)

    serve = sub.add_parser("serve", help="the gRPC server alone", add_flags=add_serve_flags)
    serve.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    serve.add_argument("--workers", type=int, default=1, help="server processes sharing the port (SO_REUSEPORT)")
    serve.set_defaults(func=cmd_serve)

    train = sub.add_parser("train", help="the trainer alone", add_flags=add_train_flags)
    train.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    train.add_argument("--once", action="store_true", help="run one round and exit")
    train.add_argument("--train-threads", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    train.add_argument("--group-id", default="livetower-trainer", help="Kafka consumer group (with --events)")
    train.add_argument("--ledger", type=Path, help="append '<round> <pid> <event_id>' per trained event (audits)")
    train.add_argument("--backfill", metavar="PATH",
                       help="train from a Delta archive (livetower archive) until it is drained, then exit; "
                            "a later plain run continues after the archived events")
    train.add_argument("--catalog-stream", action="store_true",
                       help="keep --data-dir/catalog.sqlite following the catalogue topic <events topic>.catalog "
                            "(the trainer of a fleet, whose servers take UpsertItems; needs --events)")
    add_events_flag(train)
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
