"""CLI wiring for attribution: `livetower attribution join` (the joiner) and `livetower attribution show` (the
outcomes per arm and engine version). livetower/cli.py adds this parser to its own; `livetower up` runs the
joiner on a thread (`joiner_thread`)."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import threading
from pathlib import Path

from contracts.attribution import ATTRIBUTION_FILE, JoinConfig, Joiner, JoinStep, read_joiner_state, read_outcomes
from contracts.config_flags import FlagSet, config_from_args, flag_set

DEFAULT_DATA_DIR = Path("var/livetower")
log = logging.getLogger("livetower.attribution")


def _join_flags() -> FlagSet:
    return flag_set(JoinConfig, "window_s", "grace_s", "batch_events", "poll_interval_s")


def add_attribution_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("attribution", help="impressions (Recommend responses) joined to the events they led to")
    cmds = p.add_subparsers(dest="attribution_command", required=True)
    join = cmds.add_parser("join", help="run the joiner over the event stream (exactly once; resumes)")
    join.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    join.add_argument("--events", default=None, metavar="URL",
                      help="kafka://HOST:PORT/TOPIC: join the topic the server produces to (the server's --events); "
                           "default: the data dir's SQLite event log")
    join.add_argument("--once", action="store_true", help="join what the log holds now and exit")
    _join_flags().add_to(join)
    join.set_defaults(func=cmd_join)
    show = cmds.add_parser("show", help="outcomes per arm and engine version")
    show.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    show.add_argument("--json", action="store_true", help="print JSON instead of a table")
    show.set_defaults(func=cmd_show)
    return p


def _progress(step: JoinStep) -> None:
    log.info("joined %d events; positions %s%s", step.events, step.positions,
             " (waiting for an impression the server has not flushed yet)" if step.waiting else "")


def open_joiner(data_dir: Path, cfg: JoinConfig, events_url: str | None) -> Joiner:
    """A joiner over the SQLite log (events_url None) or the Kafka topic of `events_url`."""
    if events_url is None:
        return Joiner(data_dir, cfg)
    from contracts.attribution_sources import KafkaJoinSource
    from contracts.kafka_events import parse_events_url

    source = KafkaJoinSource(parse_events_url(events_url))
    try:
        return Joiner(data_dir, cfg, source=source, owns_source=True)
    except BaseException:
        source.close()
        raise


def cmd_join(args) -> int:
    joiner = open_joiner(args.data_dir, config_from_args(_join_flags(), args), args.events)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    log.info("attribution joiner on %s from %s", args.data_dir, joiner.positions())
    try:
        joiner.run(stop, once=args.once, progress=_progress)
    finally:
        log.info("attribution joiner stopped at %s", joiner.positions())
        joiner.close()
    return 0


def cmd_show(args) -> int:
    path = args.data_dir / ATTRIBUTION_FILE
    if not path.exists():
        print(f"no attribution store at {path} (the server writes it once it answers Recommend)")
        return 1
    outcomes = read_outcomes(path)
    position, unknown = read_joiner_state(path)
    if args.json:
        print(json.dumps({"outcomes": [{"arm": arm, "engine_version": v, **o._asdict()} for (arm, v), o in
                                       outcomes.items()], "joiner_next_offset": position, "unknown_events": unknown},
                         indent=1))
        return 0
    head = ("version", "arm", "impressions", "hit_impr", "hit_rate", "hit_events", "joined", "late", "mismatch")
    print(" ".join(f"{h:>11}" for h in head))
    for (arm, v), o in outcomes.items():
        rate = f"{o.hit_impressions / o.impressions:.4f}" if o.impressions else "-"
        print(" ".join(f"{x:>11}" for x in (v, arm, o.impressions, o.hit_impressions, rate, o.hit_events,
                                             o.joined_events, o.late_events, o.user_mismatch_events)))
    print(f"joiner at event offset {position}; {unknown} events named an impression the store does not have")
    return 0


def joiner_thread(data_dir: Path, cfg: JoinConfig = JoinConfig(), events_url: str | None = None
                  ) -> tuple[threading.Thread, threading.Event]:
    """The joiner on a daemon thread (for `livetower up`); set the event to stop it. It restarts itself after an
    error (each step is one transaction, so a failed step changed nothing)."""
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            joiner = None
            try:
                joiner = open_joiner(data_dir, cfg, events_url)
                joiner.run(stop, progress=lambda s: log.debug("joined %d events; positions %s", s.events,
                                                                s.positions))
            except Exception:  # noqa: BLE001 - attribution must not take the server down
                log.exception("attribution joiner failed; restarting in 5 s")
                stop.wait(5.0)
            finally:
                if joiner is not None:
                    joiner.close()

    t = threading.Thread(target=run, name="attribution-joiner", daemon=True)
    t.start()
    return t, stop
