"""`livetower experiments start | show | stop`: A/B/N tests of engine versions on hit rate (admin API).
docs/experiments.md says how they are decided and what the error guarantee is."""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

from livetower.cli_engines import (ADMIN_TOKEN_ENV, DEFAULT_ADMIN_TARGET, DEFAULT_TARGET, DEFAULT_TOKEN_FILE,
                                   client_tls, client_tls_flags, read_token)

ARM = re.compile(r"(?P<name>[^=]+)=(?P<version>\d+):(?P<fraction>[0-9.]+)")


def add_experiments_parser(sub) -> None:
    p = sub.add_parser("experiments", help="A/B/N tests of engine versions on hit rate (admin API)")
    cmds = p.add_subparsers(dest="experiments_command", required=True)
    start = cmds.add_parser("start", help="start an experiment: each arm serves a sticky share of users, the rest "
                                          "get stable (the control)")
    start.add_argument("name")
    start.add_argument("--arm", action="append", required=True, metavar="NAME=VERSION:FRACTION",
                       help="an arm, e.g. --arm b=12:0.2 --arm c=13:0.2 (repeatable; fractions sum below 1)")
    start.add_argument("--test", choices=("sequential", "fixed"), default="sequential",
                       help="sequential: decides as soon as conclusive, valid under continuous looks; fixed: one "
                            "look at --horizon impressions per arm")
    start.add_argument("--alpha", type=float, default=0.05, help="P(any false claim, e.g. a winner in an A/A test)")
    start.add_argument("--effect", type=float, default=0.02, help="hit-rate difference the sequential test is tuned to")
    start.add_argument("--horizon", type=int, default=20_000, help="settled impressions per arm: the fixed test's "
                                                                   "look; the sequential test ends here undecided")
    start.add_argument("--min-impressions", type=int, default=200, help="per arm before any bound is trusted")
    start.add_argument("--settle-s", type=float, default=10.0, help="impressions younger than this are not counted")
    start.add_argument("--promote-winner", action="store_true", help="a winner becomes stable automatically")
    show = cmds.add_parser("show", help="the running experiment (or the last one) with per-arm hit rates")
    show.add_argument("--watch", type=float, default=0.0, metavar="SECONDS",
                      help="print again every SECONDS until it ends")
    stop = cmds.add_parser("stop", help="end the running experiment")
    stop.add_argument("--promote", type=int, default=0, metavar="VERSION", help="make this arm's version stable")
    stop.add_argument("--reason", default="", help="recorded in the rollout history")
    for c in (start, show, stop):
        c.add_argument("--admin-target", default=DEFAULT_ADMIN_TARGET, help="the server's admin listener host:port")
        c.add_argument("--admin-token-file", type=Path, default=DEFAULT_TOKEN_FILE,
                       help=f"file (mode 0600) with the admin token; {ADMIN_TOKEN_ENV}, when set, wins")
        c.add_argument("--json", action="store_true", help="print the Experiment message as JSON")
        client_tls_flags().add_to(c)
        c.set_defaults(func=cmd_experiments)


def parse_arms(specs: list[str]):
    from proto import livetower_v1_pb2 as pb

    arms = []
    for spec in specs:
        m = ARM.fullmatch(spec)
        if m is None:
            raise SystemExit(f"--arm {spec!r}: expected NAME=VERSION:FRACTION, e.g. b=12:0.2")
        arms.append(pb.ExperimentArm(name=m["name"], version=int(m["version"]), fraction=float(m["fraction"])))
    return arms


def print_experiment(x) -> None:
    state = "running" if x.running else f"ended: {x.decision}" + (f" (engine {x.winner_version})"
                                                                   if x.winner_version else "")
    age = ((time.time() * 1000 if x.running else x.ended_ms) - x.id) / 1000
    print(f"experiment {x.name!r} {state} after {age:.0f}s; control = stable {x.control_version}; {x.test} test, "
          f"alpha {x.alpha:g}, horizon {x.horizon}, settle {x.settle_s:g}s"
          f"{', promotes its winner' if x.promote_winner else ''}")
    print(f"  {'arm':<12} {'engine':>6} {'share':>6} {'requests':>9} {'errors':>6} {'impr.':>8} {'hits':>7} "
          f"{'hit rate':>8}  {'vs control [bounds]':<30} state")
    for a in x.arms:
        vs = (f"{100 * a.diff:+.2f} pp [{100 * a.diff_lo:+.2f}, {100 * a.diff_hi:+.2f}]"
              if a.diff_lo or a.diff_hi else "")
        print(f"  {a.name:<12} {a.version:>6} {100 * a.fraction:>5.1f}% {a.requests:>9} {a.errors:>6} "
              f"{a.impressions:>8} {a.hit_impressions:>7} {a.hit_rate:>8.4f}  {vs:<30} {a.state}")
    print(f"  {x.reason}")


def cmd_experiments(args: argparse.Namespace) -> int:
    from google.protobuf import json_format

    from contracts.client import Client
    from proto import livetower_v1_pb2 as pb

    token = read_token(ADMIN_TOKEN_ENV, args.admin_token_file, "admin token", "--admin-token-file")
    c = Client(DEFAULT_TARGET, admin_target=args.admin_target, admin_token=token, tls=client_tls(args))
    if args.experiments_command == "start":
        x = c.start_experiment(pb.StartExperimentRequest(
            name=args.name, arms=parse_arms(args.arm), test=args.test, alpha=args.alpha, effect=args.effect,
            horizon=args.horizon, min_impressions=args.min_impressions, settle_s=args.settle_s,
            promote_winner=args.promote_winner))
    elif args.experiments_command == "stop":
        x = c.stop_experiment(args.reason, args.promote)
    else:
        x = c.experiment()
        while args.watch > 0 and x.running and not args.json:
            print_experiment(x)
            time.sleep(args.watch)
            x = c.experiment()
    if args.json:
        print(json_format.MessageToJson(x, preserving_proto_field_name=True))
    else:
        print_experiment(x)
    return 0
