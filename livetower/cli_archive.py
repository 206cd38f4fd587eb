"""CLI wiring for the event archive: `livetower archive`, and the source behind `livetower train --backfill PATH`.
livetower/cli.py adds this parser to its own."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from pathlib import Path

from contracts.config_flags import Flag, FlagSet, config_from_args, flag_set

DEFAULT_DATA_DIR = Path("var/livetower")
log = logging.getLogger("livetower.archive")


def _archive_flags() -> FlagSet:
    from trainer.sources.archive import ArchiveConfig

    return flag_set(ArchiveConfig, "batch_events", "poll_interval_s", Flag("partition_by_date", name="partition"))


def add_archive_parser(sub) -> argparse.ArgumentParser:
    """`livetower archive --data-dir D --table PATH [--once]`."""
    p = sub.add_parser("archive", help="copy accepted events from the event log into a Delta Lake table "
                                       "(exactly once; resumes after the last committed batch)")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="data directory of the event log")
    p.add_argument("--table", required=True, help="Delta table path or URI (created by the first batch)")
    p.add_argument("--once", action="store_true", help="archive what the log holds now and exit")
    _archive_flags().add_to(p)
    p.set_defaults(func=cmd_archive)
    return p


def cmd_archive(args) -> int:
    from trainer.sources.archive import ArchiveError, DeltaArchiver
    from contracts.eventlog import SqliteEventLog

    db = Path(args.data_dir) / "events.sqlite"
    if not db.is_file():
        print(f"error: no event log at {db}: pass the --data-dir of a livetower server "
              "(or fill one with `livetower ingest`)", file=sys.stderr)
        return 2
    cfg = config_from_args(_archive_flags(), args)  # FlagValueError: livetower.cli.main reports it
    source = SqliteEventLog(db)
    try:
        archiver = DeltaArchiver(source, args.table, cfg)
        if args.once:
            total = {"batches": 0, "events": 0}
            while True:  # archive_once stops after max_batches_per_pass commits: go on until drained
                p = archiver.archive_once()
                total["batches"] += p.batches
                total["events"] += p.events
                if p.batches < cfg.max_batches_per_pass:
                    break
            print(json.dumps({**total, "positions": archiver.positions, "table_version": p.table_version,
                              "archived_rows": archiver.next_seq, "lag": archiver.lag()}, indent=1))
            return 0
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        log.info("archiving %s -> %s every %.1f s (lag %s)", db, args.table, cfg.poll_interval_s, archiver.lag())
        archiver.run(stop)
        return 0
    except ArchiveError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        source.close()


def backfill_source(path: str | Path, *, handoff: bool = True):
    """The EventSource for `livetower train --backfill PATH`: a DeltaEventSource over the archive. With handoff
    (default), the trainer's positions also move to the archived source's positions of each finished batch, so a
    later plain `livetower train` on the same data dir continues after the archived events instead of training
    them twice. Raises ArchiveError (with what to do) when PATH is not an archive."""
    from trainer.sources.archive import DeltaEventSource

    return DeltaEventSource(path, handoff=handoff)


def run_backfill(trainer) -> int:
    """Rounds until the archive is drained (lag 0), then a JSON summary. For `train --backfill`."""
    rounds, events, published = 0, 0, []
    log.info("backfill: %d archived events to train", trainer.backlog())
    while (r := trainer.run_round()) is not None:
        rounds += 1
        events += r.events
        if r.published_version:
            published.append(r.published_version)
        log.info("backfill round %d: %d events, gate %s, %d left", rounds, r.events, r.gate, trainer.backlog())
    print(json.dumps({"rounds": rounds, "events": events, "published_versions": published,
                      "positions": trainer.state.offsets}, indent=1))
    return 0
