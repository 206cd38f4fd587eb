"""The engine registry: `root/engines/<version>/manifest.json` + files, and `root/rollout.json`.

Publish = build into a dot-prefixed staging dir, hash every file into the manifest, fsync, rename
to the version number. A published version is never modified. Which version is stable lives in
rollout.json, written atomically, so a restarted server serves what was promoted.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator

from google.protobuf import json_format

from contracts.atomic import fsync_dir, fsync_tree, write_atomic
from contracts.rollout import RolloutState
from proto import livetower_v1_pb2 as pb

MANIFEST = "manifest.json"
STAGING_PREFIX = ".tmp-"


class EngineCorrupt(Exception):
    """A published engine whose files do not match its manifest."""


def sha256_file(path: Path, pause_s: float = 0.0) -> str:
    """pause_s: sleep after each MiB hashed (a serving process verifying an engine leaves the CPU to
    requests in between)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
            if pause_s:
                time.sleep(pause_s)
    return h.hexdigest()


def manifest_to_json(m: pb.EngineManifest) -> str:
    return json_format.MessageToJson(m, preserving_proto_field_name=True, indent=1, sort_keys=True)


def manifest_from_json(text: str) -> pb.EngineManifest:
    return json_format.Parse(text, pb.EngineManifest())


class Registry:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.engines_dir = self.root / "engines"
        self.engines_dir.mkdir(parents=True, exist_ok=True)
        self.rollout_path = self.root / "rollout.json"
        # (path, size, mtime_ns, inode) -> sha256 of files this object has hashed and found right: a refit's
        # load re-verifies its graph engine's package (36 MB at 100k items), unchanged since it was hashed.
        self._verified: dict[tuple[str, int, int, int], str] = {}

    # ---- reading
    def versions(self) -> list[int]:
        """Published versions, ascending. Staging dirs and dirs without a manifest are not versions."""
        out = []
        for p in self.engines_dir.iterdir():
            if p.name.isdigit() and (p / MANIFEST).is_file():
                out.append(int(p.name))
        return sorted(out)

    def latest(self) -> int:
        v = self.versions()
        return v[-1] if v else 0

    def engine_dir(self, version: int) -> Path:
        return self.engines_dir / str(version)

    def read_manifest(self, version: int) -> pb.EngineManifest:
        return manifest_from_json((self.engine_dir(version) / MANIFEST).read_text())

    def verify(self, version: int, *, pause_s: float = 0.0) -> pb.EngineManifest:
        """Check size and sha256 of every file the manifest lists; raise EngineCorrupt otherwise. A file this
        Registry hashed before is not hashed again while its size, mtime and inode are unchanged.
        pause_s: see sha256_file."""
        d = self.engine_dir(version)
        try:
            m = self.read_manifest(version)
        except (OSError, json_format.ParseError) as e:
            raise EngineCorrupt(f"engine {version}: unreadable manifest: {e}") from e
        if m.version != version:
            raise EngineCorrupt(f"engine {version}: manifest says version {m.version}")
        for f in m.files:
            p = d / f.path
            if not p.is_file():
                raise EngineCorrupt(f"engine {version}: missing file {f.path}")
            st = p.stat()
            if st.st_size != f.size:
                raise EngineCorrupt(f"engine {version}: {f.path} is {st.st_size} bytes, manifest says {f.size}")
            key = (str(p), st.st_size, st.st_mtime_ns, st.st_ino)
            if self._verified.get(key) == f.sha256:
                continue  # hashed before and not written since (published files are never modified in place)
            if sha256_file(p, pause_s) != f.sha256:
                raise EngineCorrupt(f"engine {version}: {f.path} sha256 mismatch")
            self._verified[key] = f.sha256
        return m

    # ---- publishing
    def staging_dir(self) -> Path:
        return Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=self.engines_dir))

    def remove_stale_staging(self) -> int:
        """Delete staging dirs left by a publisher that died mid-build. Call only when no build runs."""
        stale = [p for p in self.engines_dir.iterdir() if p.name.startswith(STAGING_PREFIX)]
        for p in stale:
            shutil.rmtree(p, ignore_errors=True)
        return len(stale)

    def publish(self, staging: Path, manifest: pb.EngineManifest) -> int:
        """Hash the staged files into `manifest`, give it the next version and rename it into place."""
        staging = Path(staging)
        del manifest.files[:]
        for p in sorted(staging.rglob("*")):
            if p.is_file() and p.name != MANIFEST:
                manifest.files.add(path=str(p.relative_to(staging)), sha256=sha256_file(p), size=p.stat().st_size)
        manifest.created_ms = int(time.time() * 1000)
        for _ in range(100):
            # Above every numbered dir, published or not (a stray one must not block publishing).
            taken = [int(p.name) for p in self.engines_dir.iterdir() if p.name.isdigit()]
            version = max(taken, default=0) + 1
            manifest.version = version
            write_atomic(staging / MANIFEST, manifest_to_json(manifest).encode())
            fsync_tree(staging)
            try:
                os.rename(staging, self.engine_dir(version))  # atomic; fails if the version exists
            except OSError:
                continue  # another publisher took this version; take the next
            fsync_dir(self.engines_dir)
            return version
        raise RuntimeError(f"could not publish into {self.engines_dir}: no free version after 100 tries")

    # ---- rollout state (written by servers only)
    def read_rollout(self) -> RolloutState:
        try:
            return RolloutState.from_json(self.rollout_path.read_text())
        except FileNotFoundError:
            return RolloutState()

    def write_rollout(self, state: RolloutState) -> None:
        write_atomic(self.rollout_path, state.to_json().encode())

    @contextlib.contextmanager
    def rollout_lock(self) -> Iterator[None]:
        """Exclusive across processes (servers sharing a port and registry): hold it for a whole
        read-modify-write of rollout.json so no decision overwrites another."""
        with open(self.root / "rollout.lock", "a+b") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)


# Engine directory layout (written by trainer/export, read by server/engine).
USER_TOWER_FILE = {"aoti": "user_tower.pt2", "onnx": "user_tower.onnx", "torch": "user_tower.ep.pt2"}
BACKENDS = tuple(USER_TOWER_FILE)  # "aoti", "onnx", "torch": the one list of engine backends
ITEMS_FILE = "items.npy"            # (N, out_dim) float32, L2-normalised; row i <-> vocab row i + 1
ITEM_IDS_FILE = "item_ids.json"     # N item ids, row order
POPULARITY_FILE = "popularity.json"  # {"item_ids": [...], "scores": [...]}, most popular first
# Metadata keys inside the user-tower file (AOTI package metadata / ONNX metadata_props). AOTI does
# not check input shapes at run time, so the runner checks T and the batch bound from these.
META_HISTORY_LEN = "livetower.history_len"
META_MAX_BATCH = "livetower.max_batch"
WEIGHTS_FILE = "weights.pt"         # refit engines: {constant fqn: tensor} for the graph version's compiled tower
ANN_FILE = "items.index"            # optional FAISS index over items.npy chosen at build (contracts/engine_format/
                                    # item_index.py); absent when exact search won
LEGACY_ANN_FILE = "items.hnsw"      # the same, as engines built before the method choice named it (HNSW only)
ANN_META_FILE = "ann.json"          # the retrieval choice: kind, search settings, recall, every candidate measured
ANN_CHECK_FILE = "ann_queries.npy"  # (Q, D) float32 held-out user embeddings: recall re-checked at load
