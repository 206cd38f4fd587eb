"""`livetower registry keygen | gc`: the manifest signing key pair, and deleting old engines by hand."""

from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_REGISTRY = Path("var/livetower/registry")


def add_registry_parser(sub) -> None:
    p = sub.add_parser("registry", help="engine registry upkeep: signing keys, garbage collection")
    rsub = p.add_subparsers(dest="registry_cmd", required=True)
    kg = rsub.add_parser("keygen", help="a new Ed25519 key pair for signing engine manifests")
    kg.add_argument("--private-key", type=Path, required=True,
                    help="where the private key goes (PEM, mode 600, never overwritten): the trainer's --signing-key")
    kg.add_argument("--public-key", type=Path, required=True,
                    help="where the public key goes (PEM): the server's --trusted-keys (append it to rotate keys)")
    kg.set_defaults(func=cmd_keygen)
    gc = rsub.add_parser("gc", help="delete old engines (never stable, canary, the previous stable, nor their "
                                    "graph versions)")
    gc.add_argument("--registry", type=Path, default=DEFAULT_REGISTRY, help="the registry root")
    gc.add_argument("--keep", type=int, required=True, help="newest engines kept (>= 1)")
    gc.set_defaults(func=cmd_gc)


def cmd_keygen(args: argparse.Namespace) -> int:
    from contracts.signing import generate_keypair

    try:
        hex_key = generate_keypair(args.private_key, args.public_key)
    except FileExistsError:
        raise SystemExit(f"{args.private_key} exists; not overwriting a private key") from None
    print(f"private key: {args.private_key} (mode 600)\npublic key:  {args.public_key} ({hex_key})")
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    from contracts.registry import Registry

    if args.keep < 1:
        raise SystemExit(f"--keep must be >= 1, got {args.keep}")
    if not (args.registry / "engines").is_dir():
        raise SystemExit(f"{args.registry} is not a registry (no engines/ directory)")
    removed = Registry(args.registry).collect_garbage(keep_newest=args.keep)
    print(f"removed {len(removed)} engine(s): {', '.join(map(str, removed)) or 'none'}")
    return 0
