"""Users' feature vectors computed at build time and shipped in the engine (USER_VECTORS_FILE), so that a server
loading an engine with a new user encoder does not encode every user record itself (1M users: ~35 s of encoder
calls per server, per full round's engine, on this machine's CPU).

The build encodes its catalogue store's live user records with the exported user encoder (the same program the
server runs) and stores, per user, the vector and a digest of the record's stored body. The server takes a shipped
vector only for a user whose record in *its own* store has the same digest; every other user (changed since the
build, or unknown to the build's store) is encoded as before, and users the build knew but the server's store
does not are dropped. So a table is right however the two stores' histories differ (one shared file, replicas
following the catalogue stream, a replica that joined late).

File: an uncompressed .npz (np.load with allow_pickle=False) of
- `vecs`: (N, D) float32, the encoder's output for user i;
- `digests`: (N,) uint64, body_digest of user i's stored record body;
- `ids`: (B,) uint8, the N user ids in UTF-8 joined by "\\n" (ids hold no control characters);
- `encoder`: (H,) uint8, the weights_sha256 of the encoder that computed them (ASCII): a table is used only
  by an engine whose encoder hashes alike.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np

from contracts.atomic import save_file


def body_digest(body: str) -> int:
    """64 bits of BLAKE2b over a record's stored body (the canonical JSON the catalogue store keeps)."""
    return int.from_bytes(hashlib.blake2b(body.encode(), digest_size=8).digest(), "little")


class ShippedUserVectors(NamedTuple):
    ids: list[str]
    digests_N: np.ndarray  # (N,) uint64
    vecs_ND: np.ndarray    # (N, D) float32
    encoder_key: str


def write_user_vectors(path: Path, ids: Sequence[str], digests_N: np.ndarray, vecs_ND: np.ndarray,
                       encoder_key: str) -> None:
    if vecs_ND.ndim != 2 or len(ids) != vecs_ND.shape[0] or digests_N.shape != (len(ids),):
        raise ValueError(f"user vectors: {len(ids)} ids, digests {digests_N.shape}, vecs {vecs_ND.shape} disagree")
    save_file(path, lambda f: np.savez(f, vecs=np.ascontiguousarray(vecs_ND, dtype=np.float32),
                                       digests=np.asarray(digests_N, dtype=np.uint64),
                                       ids=np.frombuffer("\n".join(ids).encode(), dtype=np.uint8),
                                       encoder=np.frombuffer(encoder_key.encode(), dtype=np.uint8)))


def read_user_vectors(path: Path, dim: int) -> ShippedUserVectors:
    """The shipped table; ValueError if it is malformed or its vectors are not `dim` wide."""
    with np.load(path, allow_pickle=False) as z:
        missing = {"vecs", "digests", "ids", "encoder"} - set(z.files)
        if missing:
            raise ValueError(f"{Path(path).name}: missing {sorted(missing)}")
        vecs_ND, digests_N = z["vecs"], z["digests"]
        raw = z["ids"].tobytes().decode()
        key = z["encoder"].tobytes().decode()
    ids = raw.split("\n") if raw else []
    if vecs_ND.dtype != np.float32 or vecs_ND.ndim != 2 or (len(ids) and vecs_ND.shape[1] != dim):
        raise ValueError(f"{Path(path).name}: vecs {vecs_ND.dtype} {vecs_ND.shape}, expected float32 (N, {dim})")
    if len(ids) != vecs_ND.shape[0] or digests_N.shape != (len(ids),) or digests_N.dtype != np.uint64:
        raise ValueError(f"{Path(path).name}: {len(ids)} ids, digests {digests_N.dtype} {digests_N.shape}, "
                         f"vecs {vecs_ND.shape} disagree")
    return ShippedUserVectors(ids, digests_N, vecs_ND, key)
