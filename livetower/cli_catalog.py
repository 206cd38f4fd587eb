"""CLI wiring for the catalogue (contracts/catalog.py): `livetower catalog load FILE`, `livetower catalog show`,
`livetower catalog delete ID...`. livetower/cli.py adds this parser to its own (`add_catalog_parser`).
`catalog_main(argv)` runs the same commands without the rest of the CLI (tests, scripts)."""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

from contracts.catalog import CATALOG_FILE, KINDS, CatalogStore
from contracts.catalog_files import FORMATS, read_records

DEFAULT_DATA_DIR = Path("var/livetower")


def add_catalog_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("catalog", help="the item (and user) catalogue: side features for cold start")
    cmds = p.add_subparsers(dest="catalog_command", required=True)
    load = cmds.add_parser("load", help="upsert the records of a file into <data-dir>/" + CATALOG_FILE)
    load.add_argument("file", type=Path)
    load.add_argument("--format", choices=FORMATS,
                      help="default: from the file name (.csv, .jsonl, .parquet, u.item, u.user). csv/parquet "
                           "columns: id, cat:NAME (values |-separated), num:NAME, text:NAME; jsonl: one "
                           '{"id", "categorical", "numeric", "text"} object per line')
    load.add_argument("--kind", choices=KINDS, help="record kind (default: user for ml100k-users, else item)")
    load.add_argument("--batch", type=int, default=5000,
                      help="records per transaction (each batch commits whole or not at all)")
    load.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    _add_stream_flag(load)
    load.set_defaults(func=cmd_load)
    show = cmds.add_parser("show", help="counts and version; one record (--id); or the changes after a version")
    show.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    show.add_argument("--kind", choices=KINDS, default="item")
    show.add_argument("--id", help="print this record")
    show.add_argument("--since", type=int, help="print the changes after this version")
    show.add_argument("--limit", type=int, default=10, help="records (or changes) printed at most")
    show.add_argument("--json", action="store_true", help="JSON lines instead of text")
    show.set_defaults(func=cmd_show)
    delete = cmds.add_parser("delete", help="delete records by id (one transaction)")
    delete.add_argument("ids", nargs="+")
    delete.add_argument("--kind", choices=KINDS, default="item")
    delete.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    _add_stream_flag(delete)
    delete.set_defaults(func=cmd_delete)
    return p


def _add_stream_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--events", metavar="kafka://HOST:PORT/TOPIC",
                   help="write to the catalogue topic <TOPIC>.catalog that servers with --fleet or --catalog-stream "
                        "follow, instead of --data-dir's file")


def _to_stream(url: str, ops: list, what: str) -> int:
    """Write changes to the catalogue topic; prints the outcome, returns the exit code."""
    import asyncio

    from contracts.catalog_stream import catalog_topic, publish_records
    from contracts.kafka_events import parse_events_url

    try:
        target = parse_events_url(url)
        sent = asyncio.run(publish_records(target, ops, progress=lambda n: print(f"  {n} of {len(ops)} written",
                                                                              file=sys.stderr)))
    except (ValueError, ConnectionError) as e:
        print(f"livetower catalog: {e}", file=sys.stderr)
        return 2
    print(f"{what}: {sent} changes written to Kafka topic {catalog_topic(target)} (acknowledged); every server "
          "following it applies them, the counts of what changed are in its catalogue (livetower catalog show)")
    return 0


def _store(data_dir: Path, must_exist: bool) -> CatalogStore | None:
    if must_exist and not (data_dir / CATALOG_FILE).exists():
        print(f"no catalogue at {data_dir / CATALOG_FILE} (livetower catalog load FILE makes one)", file=sys.stderr)
        return None
    return CatalogStore.in_dir(data_dir)


def cmd_load(args) -> int:
    if args.batch < 1:
        print(f"livetower catalog load: --batch must be >= 1, got {args.batch}", file=sys.stderr)
        return 2
    if args.events:
        from contracts.catalog import CatalogOp

        try:
            ops = [CatalogOp(r.kind, r.id, r) for r in read_records(args.file, args.format, args.kind)]
        except (ValueError, FileNotFoundError) as e:  # nothing written: the file is read whole first
            print(f"livetower catalog load: {e} (nothing was written)", file=sys.stderr)
            return 2
        return _to_stream(args.events, ops, str(args.file))
    store = _store(args.data_dir, must_exist=False)
    totals = [0, 0, 0]
    version = store.version()
    try:
        records = read_records(args.file, args.format, args.kind)
        while batch := list(itertools.islice(records, args.batch)):
            res = store.upsert(batch)
            totals = [t + x for t, x in zip(totals, res[:3])]
            version = res.version
    except (ValueError, FileNotFoundError) as e:  # batches before the bad record stay committed (said below)
        print(f"livetower catalog load: {e}", file=sys.stderr)
        print(f"committed before the error: {totals[0]} inserted, {totals[1]} updated; version {version}",
              file=sys.stderr)
        return 2
    finally:
        store.close()
    print(f"{args.file}: {sum(totals)} records: {totals[0]} inserted, {totals[1]} updated, {totals[2]} unchanged; "
          f"catalogue version {version}")
    return 0


def cmd_show(args) -> int:
    store = _store(args.data_dir, must_exist=True)
    if store is None:
        return 1
    with store:
        if args.id is not None:
            r = store.get(args.id, args.kind)
            if r is None:
                print(f"no {args.kind} {args.id!r} in the catalogue", file=sys.stderr)
                return 1
            print(json.dumps(r.to_dict(), ensure_ascii=False) if args.json else _text(r.to_dict()))
            return 0
        if args.since is not None:
            for c in store.changes_since(args.since, limit=args.limit):
                d = {"version": c.version, "kind": c.kind, "id": c.id,
                     "record": None if c.record is None else c.record.to_dict()}
                print(json.dumps(d, ensure_ascii=False) if args.json else
                      f"v{c.version} {c.kind} {c.id}: " + ("deleted" if c.record is None else _text(d["record"])))
            return 0
        if args.json:
            print(json.dumps({"items": store.count("item"), "users": store.count("user"), "version": store.version()}))
            return 0
        print(f"{store.path}: {store.count('item')} items, {store.count('user')} users, version {store.version()}")
        for r in itertools.islice(store.iterate(args.kind), args.limit):
            print(f"  {_text(r.to_dict())}")
    return 0


def cmd_delete(args) -> int:
    if args.events:
        from contracts.catalog import CatalogOp, CatalogRecord

        try:
            ops = [CatalogOp(args.kind, CatalogRecord(id=i, kind=args.kind).id, None) for i in args.ids]
        except ValueError as e:
            print(f"livetower catalog delete: {e}", file=sys.stderr)
            return 2
        return _to_stream(args.events, ops, "delete")
    store = _store(args.data_dir, must_exist=True)
    if store is None:
        return 1
    with store:
        n, version = store.delete(args.ids, args.kind)
    print(f"deleted {n} of {len(args.ids)} {args.kind} ids; catalogue version {version}")
    return 0


def _text(d: dict) -> str:
    parts = [f"{d['kind']} {d['id']}"]
    parts += [f"{k}={'|'.join(v)}" for k, v in d["categorical"].items()]
    parts += [f"{k}={v:g}" for k, v in d["numeric"].items()]
    parts += [f"{k}={v!r}" for k, v in d["text"].items()]
    return " ".join(parts)


def catalog_main(argv: list[str]) -> int:
    """`livetower catalog ARGV` without the rest of the CLI."""
    p = argparse.ArgumentParser(prog="livetower")
    add_catalog_parser(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(["catalog", *argv])
    return args.func(args)
