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

from livetower.cli_engines import DEFAULT_TARGET, add_engines_parser
from livetower.cli_archive import add_archive_parser

DEFAULT_DATA_DIR = Path("var/livetower")


def _server_config(args):
    from server.batching import BatchingConfig
    from server.config import ServerConfig
    from server.engine.manager import EngineManagerConfig

    batching = None if args.no_batching else BatchingConfig(
        max_batch=args.max_batch, max_delay_ms=args.max_delay_ms, max_queue=args.max_queue,
        max_queue_delay_ms=args.max_queue_delay_ms, max_loop_lag_ms=args.max_loop_lag_ms,
        inline_below_ms=args.inline_below_ms)
    return ServerConfig(data_dir=args.data_dir, host=args.host, port=args.port, events_url=args.events,
                        metrics_port=None if args.metrics_port < 0 else args.metrics_port,
                        engines=EngineManagerConfig(poll_interval_s=args.poll_interval_s, num_threads=args.threads,
                                                    leader=not args.rollout_follower, use_ann=not args.no_ann),
                        batching=batching, uvloop=not args.no_uvloop, reuse_port=args.reuse_port,
                        gil_switch_interval_s=args.gil_switch_interval_ms / 1e3, gc_freeze=not args.no_gc_freeze)


def _train_config(args):
    from trainer.config import TrainConfig

    base = TrainConfig.tiny_debug() if args.tiny else TrainConfig()
    changes = {k: v for k, v in dict(backend=args.backend, round_min_events=args.round_min_events,
                                      max_round_events=args.max_round_events,
                                      round_interval_s=args.round_interval_s, epochs_per_round=args.epochs,
                                      precision=args.precision).items() if v is not None}
    elastic = {k: v for k, v in dict(min_workers=args.min_workers, max_workers=args.max_workers,
                                      events_per_worker=args.events_per_worker, device=args.train_device).items()
               if v is not None}
    if elastic:
        changes["elastic"] = base.elastic.replace(**elastic)
    changes["inductor_cache_dir"] = args.data_dir / "inductor-cache"
    return base.replace(**changes)


def _add_events_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--events", metavar="kafka://HOST:PORT/TOPIC",
                   help="event stream on Kafka (topic created with ?partitions=N, default 4, when missing); "
                        "default: the embedded SQLite log in --data-dir")


def _add_server_flags(p: argparse.ArgumentParser) -> None:
    _add_events_flag(p)
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=50051, help="gRPC port (0 = any free port)")
    p.add_argument("--metrics-port", type=int, default=9464, help="Prometheus port (0 = any free, -1 = off)")
    p.add_argument("--poll-interval-s", type=float, default=1.0, help="registry check interval")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads for serving")
    p.add_argument("--no-batching", action="store_true", help="compute inline on the event loop (baseline)")
    p.add_argument("--max-batch", type=int, default=32, help="Recommend queries per engine call")
    p.add_argument("--max-delay-ms", type=float, default=0.0, help="wait for a batch to fill")
    p.add_argument("--max-queue", type=int, default=512, help="queued requests before shedding")
    p.add_argument("--max-queue-delay-ms", type=float, default=20.0,
                   help="shed a request that would wait longer than this for the compute thread")
    p.add_argument("--max-loop-lag-ms", type=float, default=50.0,
                   help="shed new requests while the event loop runs this far behind (0: never)")
    p.add_argument("--inline-below-ms", type=float, default=0.0,
                   help="compute a Recommend on the event loop (no compute-thread hand-off) when its engine's "
                        "measured cost is below this and nothing is queued: lower P99 up to capacity, no "
                        "overload protection past it (default 0: always the compute thread)")
    p.add_argument("--gil-switch-interval-ms", type=float, default=1.0,
                   help="longest a Python thread keeps the GIL from the event loop (Python's default: 5)")
    p.add_argument("--no-gc-freeze", action="store_true",
                   help="leave long-lived objects in the cyclic GC's scans (gc.freeze() is on by default)")
    p.add_argument("--no-uvloop", action="store_true", help="default asyncio loop instead of uvloop")
    p.add_argument("--reuse-port", action="store_true", help="SO_REUSEPORT (set by --workers)")
    p.add_argument("--rollout-follower", action="store_true",
                   help="mirror rollout.json, make no automatic rollout decisions (set by --workers for all "
                        "but the first process)")
    p.add_argument("--no-ann", action="store_true", help="exact top-k even when the engine has an HNSW index")


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=("aoti", "onnx", "torch"), help="engine backend (default aoti)")
    p.add_argument("--round-min-events", type=int, help="start a round at this backlog (default 1000)")
    p.add_argument("--round-interval-s", type=float, help="or after this long with any backlog (default 30)")
    p.add_argument("--max-round-events", type=int, help="events one round consumes at most (default 200000)")
    p.add_argument("--epochs", type=int, help="passes over each round's events (default 10)")
    p.add_argument("--precision", choices=("bf16", "fp16", "fp32"),
                   help="training precision: bf16 autocast (default), fp16 autocast + loss scaling, fp32")
    p.add_argument("--min-workers", type=int, help="fewest training workers a round runs on (default 1)")
    p.add_argument("--max-workers", type=int,
                   help="most training workers a round may get, chosen from the backlog (default 1: in-process)")
    p.add_argument("--events-per-worker", type=int, help="backlog per worker before another is added (default 50000)")
    p.add_argument("--train-device", choices=("auto", "cpu", "cuda"),
                   help="where workers train: cuda (one GPU each), cpu (gloo), auto (default: cuda when visible)")
    p.add_argument("--tiny", action="store_true", help="tiny debug model and fast rounds (tests)")
    p.add_argument("--trainer-metrics-port", type=int, default=9465,
                   help="the trainer's Prometheus port (consumer lag per partition; 0 = any free, -1 = off)")


def _serve_workers(args) -> int:
    """--workers N: N server processes sharing the port with SO_REUSEPORT; the kernel spreads connections."""
    import subprocess

    if args.port == 0:
        raise SystemExit("--workers needs an explicit --port (processes must share one port)")
    argv = [a for a in sys.argv[1:] if a != "--reuse-port"]
    i = argv.index("--workers") if "--workers" in argv else None
    if i is not None:
        del argv[i:i + 2]
    argv = [a for a in argv if not a.startswith("--workers=")]
    procs = []
    for w in range(args.workers):
        metrics = -1 if args.metrics_port < 0 else (0 if args.metrics_port == 0 else args.metrics_port + w)
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

    if args.workers > 1:
        return _serve_workers(args)
    config = _server_config(args)
    run(serve(config, on_started=lambda s, port: print(
        f"serving gRPC on {args.host}:{port} (metrics port {s.metrics_port})", flush=True)), use_uvloop=config.uvloop)
    return 0


def cmd_train(args) -> int:
    import torch

    from prometheus_client import start_http_server

    from contracts.registry import Registry
    from trainer.loop import Trainer

    torch.set_num_threads(args.train_threads)
    cfg = _train_config(args)
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
    trainer = Trainer(cfg, event_log, Registry(args.data_dir / "registry"), args.data_dir / "trainer",
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
            event_log.close()
    if args.once:
        result = trainer.run_round()
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
        event_log.close()
    return 0


def cmd_up(args) -> int:
    from livetower.up import run_up

    train_args = []
    for flag in ("backend", "round_min_events", "round_interval_s", "max_round_events", "epochs", "precision", "events",
                 "trainer_metrics_port", "min_workers", "max_workers", "events_per_worker", "train_device"):
        if getattr(args, flag) is not None:
            train_args += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    if args.tiny:
        train_args.append("--tiny")
    run_up(_server_config(args), train_args=train_args, bootstrap_users=args.bootstrap_users)
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

    c = Client(args.target)
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


def cmd_bench(args) -> int:
    import importlib

    module = {"build": "engine_build", "catalog": "catalog", "load": "loadgen", "slo": "slo", "swap": "swap",
              "kill": "kill_campaign", "stream": "stream", "kernels": "kernels", "train": "train_bench",
              "replay": "replay"}[args.what]
    return importlib.import_module(f"benchmarks.{module}").main(args.rest)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="livetower", description=__doc__)
    p.add_argument("--log-level", default=os.environ.get("LIVETOWER_LOG_LEVEL", "INFO"))
    sub = p.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="server + trainer sidecar on embedded defaults")
    up.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    up.add_argument("--bootstrap-users", type=int, default=2000, help="synthetic users when the log is empty")
    _add_server_flags(up)
    _add_train_flags(up)
    up.set_defaults(func=cmd_up)

    serve = sub.add_parser("serve", help="the gRPC server alone")
    serve.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    serve.add_argument("--workers", type=int, default=1, help="server processes sharing the port (SO_REUSEPORT)")
    _add_server_flags(serve)
    serve.set_defaults(func=cmd_serve)

    train = sub.add_parser("train", help="the trainer alone")
    train.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    train.add_argument("--once", action="store_true", help="run one round and exit")
    train.add_argument("--train-threads", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    train.add_argument("--group-id", default="livetower-trainer", help="Kafka consumer group (with --events)")
    train.add_argument("--ledger", type=Path, help="append '<round> <pid> <event_id>' per trained event (audits)")
    train.add_argument("--backfill", metavar="PATH",
                       help="train from a Delta archive (livetower archive) until it is drained, then exit; "
                            "a later plain run continues after the archived events")
    _add_events_flag(train)
    _add_train_flags(train)
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
    query.set_defaults(func=cmd_query)

    add_engines_parser(sub)
    add_archive_parser(sub)

    broker = sub.add_parser("broker", help="a local Kafka-protocol broker (tansu, memory only) for trying --events")
    broker.add_argument("--port", type=int, default=9092)
    broker.set_defaults(func=cmd_broker)

    ev = sub.add_parser("eval", help="offline quality on a named protocol (sasrec, full, time) vs popularity")
    from trainer.studies.eval_cli import add_eval_flags

    add_eval_flags(ev)
    ev.set_defaults(func=cmd_eval)
    bench = sub.add_parser("bench", help="benchmarks (JSON + PNG under bench-results/)")
    bench.add_argument("what", choices=("build", "catalog", "load", "slo", "swap", "kill", "stream", "kernels", "train", "replay"),
                       help="build: engine backends compared; catalog: a trained catalogue for load tests; "
                            "load: open-loop load generator; slo: baseline vs optimised serving at fixed rates; "
                            "swap: canary, promote and rollback under load, memory over swap cycles; "
                            "kill: kill -9 the Kafka-fed trainer many times, count lost events; "
                            "stream: event -> history latency and event -> serving freshness on Kafka; "
                            "kernels: Triton retrieval kernel vs torch on a GPU; "
                            "train: training throughput per worker count and precision, elastic scaling events; "
                            "replay: ml-100k in time order, continuous vs frozen engines vs popularity")
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
    except KeyboardInterrupt:
        return 130
    except grpc.RpcError as e:
        print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
