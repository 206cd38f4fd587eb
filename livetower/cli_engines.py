"""`livetower engines list | status | canary VERSION --fraction F | promote | rollback | policy`."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from contracts.config_flags import FlagSet, config_from_args, flag_set
from contracts.tls import ClientTls

DEFAULT_TARGET = "localhost:50051"
DEFAULT_ADMIN_TARGET = "localhost:50052"
DEFAULT_TOKEN_FILE = Path("var/livetower/admin.token")
ADMIN_TOKEN_ENV = "LIVETOWER_ADMIN_TOKEN"  # read here, in the command line only, and passed on explicitly


def client_tls_flags() -> FlagSet:
    """--tls-ca-file, --tls-cert-file, --tls-key-file, --tls-server-name: how a command's client reaches a TLS server."""
    return flag_set(ClientTls, prefix="tls-")


def client_tls(args: argparse.Namespace) -> ClientTls | None:
    """ClientTls from the --tls-* flags; None (plaintext) when none was given."""
    flags = client_tls_flags()
    return config_from_args(flags, args) if flags.changes(args) else None


def read_token(env: str, path: Path, what: str, flag: str) -> str:
    """The token in environment variable `env`, else in the private file `path` (never a command-line argument:
    argv is visible to every user of the machine and lands in shell history)."""
    from contracts.secret_files import read_secret

    if os.environ.get(env):
        return os.environ[env].strip()
    try:
        return read_secret(path, what)
    except ValueError as e:
        raise SystemExit(f"no {what}: {e}; set {env} or pass {flag} FILE") from None


def add_engines_parser(sub) -> None:
    p = sub.add_parser("engines", help="engine registry and rollout (admin API; needs the admin token)")
    p.add_argument("what", choices=("list", "status", "canary", "promote", "rollback", "policy"),
                   help="list: published engines; status: rollout state, analysis and history; canary VERSION: "
                        "put VERSION in front of --fraction of users; promote / rollback: decide the canary "
                        "(rollback with no canary returns to the previous stable); policy: show or change it")
    p.add_argument("version", nargs="?", type=int, help="engine version (canary)")
    p.add_argument("--admin-target", default=DEFAULT_ADMIN_TARGET,
                   help="the server's admin listener host:port (livetower serve --admin-host/--admin-port)")
    p.add_argument("--fraction", type=float, default=0.0, help="canary share of users, (0, 1); 0: the policy's")
    p.add_argument("--reason", default="", help="recorded in the rollout history")
    p.add_argument("--admin-token-file", type=Path, default=DEFAULT_TOKEN_FILE,
                   help=f"file (mode 0600) with the server's admin token (default var/livetower/admin.token); "
                        f"the environment variable {ADMIN_TOKEN_ENV}, when set, wins")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="policy: change a field, e.g. --set mode=manual --set min_requests=500 (repeatable)")
    p.add_argument("--json", action="store_true", help="status/policy: print the raw response as JSON")
    client_tls_flags().add_to(p)
    p.set_defaults(func=cmd_engines)


def _policy_with(current, changes: list[str]):
    from proto import livetower_v1_pb2 as pb

    policy = pb.CanaryPolicy()
    policy.CopyFrom(current)
    for change in changes:
        name, sep, value = change.partition("=")
        field = pb.CanaryPolicy.DESCRIPTOR.fields_by_name.get(name)
        if not sep or field is None:
            known = ", ".join(f.name for f in pb.CanaryPolicy.DESCRIPTOR.fields)
            raise SystemExit(f"--set {change!r}: expected FIELD=VALUE with FIELD one of {known}")
        kind = type(getattr(policy, name))
        setattr(policy, name, kind(value))
    return policy


def print_rollout(r) -> None:
    print(f"stable: {r.stable_version or '-'}   state: {r.state}   policy: {r.policy.mode}   answered by: {r.replica}")
    if r.leader:
        left = r.leader_until_ms / 1000 - time.time()
        at = f" at {r.leader_address}" if r.leader_address else ""
        print(f"decisions: {r.leader}{at} ({'lease ' + format(left, '.1f') + ' s left' if left > 0 else 'lease lapsed'})")
    if r.canary_version:
        age = time.time() - r.canary_started_ms / 1000 if r.canary_started_ms else 0.0
        print(f"canary: {r.canary_version} on {100 * r.canary_fraction:g}% of users for {age:.0f}s")
    if r.HasField("analysis"):
        a = r.analysis
        print(f"analysis: {a.verdict} ({a.reason})")
        print(f"  live: canary {a.canary_requests} req, {a.canary_errors} err, P99 {a.canary_p99_ms:.2f} ms | "
              f"stable {a.stable_requests} req, P99 {a.stable_p99_ms:.2f} ms | ratio {a.p99_ratio:.2f}")
        print(f"  shadow: {a.shadow_samples} samples, top-k overlap {a.topk_overlap:.3f}, "
              f"score drift {a.score_drift:.3f}, engine CPU time ratio {a.shadow_latency_ratio:.2f}")
        if r.policy.outcome_test not in ("", "off"):
            print(f"  hit rate ({r.policy.outcome_test}): canary {a.canary_hit_rate:.4f} on {a.canary_impressions} | "
                  f"stable {a.stable_hit_rate:.4f} on {a.stable_impressions} | difference {a.hit_rate_diff:+.4f} "
                  f"in [{a.hit_rate_lo:+.4f}, {a.hit_rate_hi:+.4f}], margin {r.policy.outcome_margin:g}")
    if r.HasField("experiment") and r.experiment.running:
        print(f"experiment {r.experiment.name!r} running: livetower experiments show")
    if r.pending_versions:
        print(f"pending (published, not tried): {list(r.pending_versions)}")
    for v, why in sorted(r.refused_reasons.items()):
        print(f"refused {v}: {why}")
    for v, why in sorted(r.rolled_back.items()):
        print(f"rolled back {v}: {why}")
    for e in r.history[-10:]:
        when = time.strftime("%H:%M:%S", time.localtime(e.time_ms / 1000))
        who = f"{e.actor}@{e.replica}" if e.replica else e.actor
        print(f"  {when} {e.action:<8} v{e.version:<4} (stable {e.stable_version}) by {who}: {e.reason}")


def cmd_engines(args: argparse.Namespace) -> int:
    from google.protobuf import json_format

    from contracts.client import Client

    token = read_token(ADMIN_TOKEN_ENV, args.admin_token_file, "admin token", "--admin-token-file")
    c = Client(DEFAULT_TARGET, admin_target=args.admin_target, admin_token=token, tls=client_tls(args))
    if args.what == "list":
        resp = c.list_engines()
        print(f"serving: {resp.serving_version}")
        for m in resp.engines:
            metrics = {k: round(v, 4) for k, v in m.eval_metrics.items() if "recall" in k}
            refit = f" refit-of={m.graph_version}" if m.graph_version else ""
            print(f"v{m.version} parent={m.parent} backend={m.backend}{refit} items={m.item_count} "
                  f"events={m.trained_events} parity={m.parity_max_abs_diff:.1e} build={m.build_seconds:.1f}s {metrics}")
        return 0
    if args.what == "canary":
        if args.version is None:
            raise SystemExit("engines canary needs a VERSION (see `livetower engines list`)")
        resp = c.start_canary(args.version, args.fraction)
    elif args.what == "promote":
        resp = c.promote(args.reason)
    elif args.what == "rollback":
        resp = c.rollback(args.reason)
    elif args.what == "policy" and args.set:
        resp = c.set_policy(_policy_with(c.rollout().policy, args.set))
    else:
        resp = c.rollout()
    if args.json:
        print(json_format.MessageToJson(resp, preserving_proto_field_name=True))
    elif args.what == "policy":
        print(json_format.MessageToJson(resp.policy, preserving_proto_field_name=True,
                                        always_print_fields_with_no_presence=True))
    else:
        print_rollout(resp)
    return 0
