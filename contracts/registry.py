"""The engine registry: `root/engines/<version>/manifest.json` + files, and `root/rollout.json`.

Publish = build into a dot-prefixed staging dir, hash every file into the manifest, sign it (optional,
contracts/signing.py), fsync, rename to the version number. A published version is never modified. Which
version is stable lives in rollout.json, written atomically, so a restarted server serves what was promoted.

Engines are flat directories. `verify` accepts one only when every entry is a regular file (no symlink, no
subdirectory) listed in the manifest under a plain name, every file the loader will open for its backend is
listed, and each listed file has its size and sha256; readers then open listed names only.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import secrets
import shutil
import stat
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from google.protobuf import json_format

from contracts.atomic import fsync_dir, fsync_tree, write_atomic
from contracts.rollout import RolloutState
from contracts.signing import ManifestTrust, sign
from proto import livetower_v1_pb2 as pb

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"         # detached Ed25519 signature of manifest.json's bytes (contracts/signing.py)
STAGING_PREFIX = ".tmp-"
GC_PREFIX = STAGING_PREFIX + "gc-"  # an engine being deleted: renamed out of the version namespace first


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

    def verify(self, version: int, *, pause_s: float = 0.0, trust: ManifestTrust | None = None) -> pb.EngineManifest:
        """The engine's manifest once it is proven whole; EngineCorrupt naming the problem otherwise.

        Checked: the signature (when `trust` has keys or requires one) over the exact manifest bytes; every
        manifest path a plain name; every entry of the directory a regular file the manifest lists; every
        file the loader opens for this engine listed; size and sha256 of every listed file. A file this
        Registry hashed before is not hashed again while its size, mtime and inode are unchanged.
        pause_s: see sha256_file."""
        d = self.engine_dir(version)
        if d.is_symlink() or not d.is_dir():
            raise EngineCorrupt(f"engine {version}: {d.name} is not a directory")
        try:
            raw = (d / MANIFEST).read_bytes()
            sig = (d / SIGNATURE).read_bytes() if (d / SIGNATURE).is_file() else None
        except OSError as e:
            raise EngineCorrupt(f"engine {version}: unreadable manifest: {e}") from e
        why = (trust or ManifestTrust()).check(raw, sig)
        if why:
            raise EngineCorrupt(f"engine {version}: {why}")
        try:
            m = manifest_from_json(raw.decode())
        except (UnicodeDecodeError, json_format.ParseError) as e:
            raise EngineCorrupt(f"engine {version}: unreadable manifest: {e}") from e
        if m.version != version:
            raise EngineCorrupt(f"engine {version}: manifest says version {m.version}")
        listed = check_listing(m, f"engine {version}")
        for entry in os.scandir(d):
            if entry.is_symlink():
                raise EngineCorrupt(f"engine {version}: {entry.name!r} is a symlink; engines hold regular files only")
            if not entry.is_file(follow_symlinks=False):
                raise EngineCorrupt(f"engine {version}: {entry.name!r} is not a regular file")
            if entry.name not in listed and entry.name not in (MANIFEST, SIGNATURE):
                raise EngineCorrupt(f"engine {version}: file {entry.name!r} is not listed in the manifest")
        for f in m.files:
            p = d / f.path
            try:
                st = p.lstat()
            except FileNotFoundError:
                raise EngineCorrupt(f"engine {version}: missing file {f.path}") from None
            if not stat.S_ISREG(st.st_mode):
                raise EngineCorrupt(f"engine {version}: {f.path} is not a regular file")
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

    def publish(self, staging: Path, manifest: pb.EngineManifest, *,
                signing_key: Ed25519PrivateKey | None = None) -> int:
        """Hash the staged files into `manifest`, give it the next version, sign it (with `signing_key`) and
        rename it into place. The staging dir must be flat: engines hold regular files under plain names."""
        staging = Path(staging)
        hash_into(staging, manifest)
        for _ in range(100):
            # Above every numbered dir, published or not (a stray one must not block publishing).
            taken = [int(p.name) for p in self.engines_dir.iterdir() if p.name.isdigit()]
            version = max(taken, default=0) + 1
            manifest.version = version
            raw = manifest_to_json(manifest).encode()
            write_atomic(staging / MANIFEST, raw)
            if signing_key is not None:  # before the rename: the engine appears signed or not at all
                write_atomic(staging / SIGNATURE, sign(signing_key, raw))
            else:
                (staging / SIGNATURE).unlink(missing_ok=True)  # one copied in with the files signs other bytes
            fsync_tree(staging)
            try:
                os.rename(staging, self.engine_dir(version))  # atomic; fails if the version exists
            except OSError:
                continue  # another publisher took this version; take the next
            fsync_dir(self.engines_dir)
            return version
        raise RuntimeError(f"could not publish into {self.engines_dir}: no free version after 100 tries")

    # ---- garbage collection
    def collect_garbage(self, keep_newest: int, protected: set[int] = frozenset()) -> list[int]:
        """Delete old engines; returns the versions removed. Kept: the newest `keep_newest`, `protected`, the
        rollout's stable and canary and the stable it was promoted from (a rollback's target), and for each
        kept engine its graph version (a refit runs that version's compiled tower) and the engine whose users'
        vectors it points to (manifest.user_vectors_version). Parents are lineage, not
        dependencies: each engine's parent is the one published before it, so keeping parents would keep
        every engine; a refit built from a parent that is gone is a full build (trainer/export/build.py).

        A reader holding an engine's files open keeps them (POSIX); one that is about to open a version sees
        it vanish whole: each dir is renamed out of the version namespace (not a number: `versions()` skips
        it) before it is deleted."""
        if keep_newest < 1:
            raise ValueError(f"keep_newest must be >= 1, got {keep_newest}")
        versions = self.versions()
        st = self.read_rollout()
        keep = set(versions[-keep_newest:]) | set(protected) | {st.stable, st.canary}
        keep |= {e.stable_version for e in st.history if e.action == "promote" and e.version == st.stable}
        todo = [v for v in keep if v in versions]
        while todo:  # what kept engines depend on: their graph versions and users' vectors, and theirs
            v = todo.pop()
            try:
                m = self.read_manifest(v)
            except (OSError, json_format.ParseError):
                continue  # unreadable: nothing to follow; it stays while protected
            for dep in (int(m.graph_version), int(m.user_vectors_version)):
                if dep and dep not in keep:
                    keep.add(dep)
                    todo.append(dep)
        removed = [v for v in versions if v not in keep and self._remove_engine(v)]
        if removed:
            fsync_dir(self.engines_dir)
        return removed

    def _remove_engine(self, version: int) -> bool:
        doomed = self.engines_dir / f"{GC_PREFIX}{version}-{secrets.token_hex(4)}"
        try:
            os.rename(self.engines_dir / str(version), doomed)
        except FileNotFoundError:
            return False  # another collector took it
        shutil.rmtree(doomed, ignore_errors=True)
        return True

    # ---- rollout state (written by servers only)
    def read_rollout(self) -> RolloutState:
        try:
            return RolloutState.from_json(self.rollout_path.read_text())
        except FileNotFoundError:
            return RolloutState()

    def write_rollout(self, state: RolloutState) -> None:
        write_atomic(self.rollout_path, state.to_json().encode())

    # ---- per-replica reports (canary evidence merged by the lease holder: server/engine/fleet_stats.py)
    def write_report(self, key: str, data: bytes) -> None:
        """Replace the small object `key` ("<group>/<replica>.json") under reports/."""
        path = self.root / "reports" / key
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, data)

    def read_reports(self, group: str) -> list[bytes]:
        d = self.root / "reports" / group
        return [p.read_bytes() for p in sorted(d.glob("*.json"))] if d.is_dir() else []

    def update_rollout(self, change: Callable[[RolloutState], None]) -> RolloutState:
        """Read-modify-write of the rollout state that no concurrent one can overwrite: here under an exclusive
        file lock (processes sharing this directory); on object storage a compare-and-swap retried on conflict
        (contracts/object_registry.py), so `change` must only derive the new state from the one it is given.
        An exception from `change` writes nothing."""
        with self.rollout_lock():
            st = self.read_rollout()
            change(st)
            self.write_rollout(st)
            return st

    def canary_salt(self) -> bytes:
        """The secret that keys the canary user split (server/engine/canary.py): random, made once, kept in
        rollout.json, so every server sharing this registry splits users alike, across restarts too."""
        salt = self.read_rollout().canary_salt
        if not salt:
            def make(st: RolloutState) -> None:
                if not st.canary_salt:  # another server may have made it while we waited
                    st.canary_salt = secrets.token_hex(16)

            salt = self.update_rollout(make).canary_salt
        return bytes.fromhex(salt)

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
ITEM_ENCODER_FILE = "item_encoder.ep.pt2"  # optional: the item feature encoder (torch.export program), engines of
                                          # feature models: catalogue features -> item vectors (contracts/
                                          # engine_format/item_encoder.py)
ITEM_ENCODER_META = "item_encoder.json"   # its FeatureConfig and golden records with their vectors
USER_ENCODER_FILE = "user_encoder.ep.pt2"  # optional: the user feature encoder, engines of models with user
                                          # features: a user's catalogue record -> its (unnormalised) feature
                                          # vector, fused with the tower's output (trainer/user_features.py)
USER_ENCODER_META = "user_encoder.json"   # the same layout as ITEM_ENCODER_META
USER_VECTORS_FILE = "user_vectors.npz"    # optional: the catalogue's users' feature vectors computed at build by
                                          # the user encoder, for engines that change it (contracts/engine_format/
                                          # user_vectors.py)
ANN_CHECK_FILE = "ann_queries.npy"  # (Q, D) float32 held-out user embeddings: recall re-checked at load
ANN_EXACT_FILE = "ann_exact.npy"    # (Q, k) int32: their exact top-k item rows, computed at build; the check at
                                   # load re-derives a few against items.npy instead of all (~0.2 s of a
                                   # load's CPU at 100k items)


def hash_into(staging: Path, manifest: pb.EngineManifest) -> None:
    """List every staged file (name, size, sha256) in `manifest` and stamp its creation time."""
    del manifest.files[:]
    for p in sorted(staging.iterdir()):
        if p.name in (MANIFEST, SIGNATURE):
            continue
        if p.is_symlink() or not p.is_file():
            raise ValueError(f"staging dir {staging}: {p.name!r} is not a regular file (engines are flat)")
        check_name(p.name, f"staging dir {staging}")
        manifest.files.add(path=p.name, sha256=sha256_file(p), size=p.stat().st_size)
    manifest.created_ms = int(time.time() * 1000)


def check_name(name: str, where: str) -> None:
    """A manifest path must be a plain file name: no separator, no `..`, nothing absolute, hidden or empty."""
    if (not name or name in (".", "..") or name.startswith(".") or "/" in name or "\\" in name or "\0" in name
            or name in (MANIFEST, SIGNATURE) or len(name) > 255):
        raise EngineCorrupt(f"{where}: manifest path {name!r} is not a plain file name")


def required_files(manifest: pb.EngineManifest) -> tuple[str, ...]:
    """The files the server's loader opens unconditionally for this engine (a refit's tower is its graph
    version's, checked when that version is verified)."""
    if manifest.backend not in USER_TOWER_FILE:
        return ()
    tower = WEIGHTS_FILE if manifest.graph_version else USER_TOWER_FILE[manifest.backend]
    return (tower, ITEMS_FILE, ITEM_IDS_FILE, POPULARITY_FILE)


def check_listing(manifest: pb.EngineManifest, where: str) -> frozenset[str]:
    """The manifest's file names, once each is a plain name, listed once, and every required file is listed."""
    if manifest.backend not in USER_TOWER_FILE:
        raise EngineCorrupt(f"{where}: unknown backend {manifest.backend!r}")
    names = [f.path for f in manifest.files]
    for name in names:
        check_name(name, where)
    if len(set(names)) != len(names):
        raise EngineCorrupt(f"{where}: a file is listed twice in the manifest")
    missing = [f for f in required_files(manifest) if f not in names]
    if missing:
        raise EngineCorrupt(f"{where}: manifest does not list {', '.join(missing)}, which the loader opens")
    return frozenset(names)
