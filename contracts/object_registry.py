"""The engine registry on object storage: `--registry s3://BUCKET/PREFIX[?endpoint=URL&region=R]`.

Through obstore (Rust's object_store): it does the two conditional writes this needs on S3 and on every
S3-compatible store (moto, MinIO, R2): create-if-absent (`If-None-Match: *`) and compare-and-swap on the ETag
(`If-Match`); fsspec/s3fs exposes neither as a plain call. Credentials come the usual AWS way (environment,
profile, instance role), read by obstore.

Layout under the prefix:
  claims/<v>                  a version number, claimed by exactly one publisher (conditional create)
  engines/<v>/<file>          the engine's files, uploaded first
  engines/<v>/manifest.sig    its signature, when signed
  engines/<v>/manifest.json   uploaded LAST: the commit point. A version is published once its manifest exists,
                              so readers never see half an engine; a publisher that dies before it leaves a
                              claim and some files, never a version.
  rollout.json                the rollout state, changed only by compare-and-swap on its ETag (update_rollout)

Readers download an engine into the local cache (`<cache>/engines/<v>`, renamed into place whole) and verify it
there exactly like a local registry (every file's size and sha256 against the manifest, the signature), so a
file changed in the bucket is refused at load. What is cached stays loadable while the bucket is unreachable:
a server keeps serving what it has.
"""

from __future__ import annotations

import shutil
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Callable

from contracts.atomic import write_atomic
from contracts.registry import MANIFEST, SIGNATURE, Registry, hash_into, manifest_from_json, manifest_to_json
from contracts.rollout import RolloutState
from contracts.signing import sign
from proto import livetower_v1_pb2 as pb

ROLLOUT_KEY = "rollout.json"
CAS_TRIES = 100


def is_object_url(spec: str | Path) -> bool:
    return isinstance(spec, str) and spec.startswith("s3://")


def open_registry(spec: str | Path | None, data_dir: Path) -> Registry:
    """`--registry`: None is the data dir's own (<data_dir>/registry); a path is a local directory; s3://... is
    object storage, downloaded into <data_dir>/registry-cache."""
    if spec is None:
        return Registry(Path(data_dir) / "registry")
    return ObjectRegistry(spec, Path(data_dir) / "registry-cache") if is_object_url(spec) else Registry(Path(spec))


def s3_store(url: str):
    """obstore S3Store for s3://BUCKET/PREFIX?endpoint=URL&region=R (ValueError naming what is wrong)."""
    from obstore.store import S3Store

    u = urllib.parse.urlsplit(url)
    if u.scheme != "s3" or not u.netloc:
        raise ValueError(f"--registry {url!r}: expected s3://BUCKET/PREFIX[?endpoint=URL&region=REGION]")
    query = {k: v[0] for k, v in urllib.parse.parse_qs(u.query).items()}
    unknown = set(query) - {"endpoint", "region"}
    if unknown:
        raise ValueError(f"--registry {url!r}: unknown option(s) {sorted(unknown)}; known: endpoint, region")
    config = {}
    if "endpoint" in query:
        config["endpoint"] = query["endpoint"]
    if "region" in query:
        config["region"] = query["region"]
    http = query.get("endpoint", "").startswith("http://")
    return S3Store(u.netloc, prefix=u.path.strip("/") or None, config=config or None,
                   client_options={"allow_http": True} if http else None)


class ObjectRegistry(Registry):
    """Registry's interface over an object store; its own root is the local download cache."""

    def __init__(self, url: str, cache_dir: Path, *, store=None) -> None:
        super().__init__(Path(cache_dir))
        self.url = url
        self.store = store if store is not None else s3_store(url)
        self._manifests: dict[int, bytes] = {}  # version -> manifest bytes (published manifests never change)

    # ---- reading
    def _keys(self, prefix: str) -> list[str]:
        import obstore as obs

        return [o["path"] for batch in obs.list(self.store, prefix=prefix) for o in batch]

    def versions(self) -> list[int]:
        out = set()
        for key in self._keys("engines/"):
            parts = key.split("/")
            if len(parts) == 3 and parts[1].isdigit() and parts[2] == MANIFEST:
                out.add(int(parts[1]))
        return sorted(out)

    def _get(self, key: str) -> bytes:
        import obstore as obs

        return bytes(obs.get(self.store, key).bytes())

    def _manifest_bytes(self, version: int) -> bytes:
        if version not in self._manifests:
            self._manifests[version] = self._get(f"engines/{version}/{MANIFEST}")
        return self._manifests[version]

    def read_manifest(self, version: int) -> pb.EngineManifest:
        return manifest_from_json(self._manifest_bytes(version).decode())

    def engine_dir(self, version: int) -> Path:
        """The engine's local copy, downloaded whole on first use (verify() then checks it like any other)."""
        local = super().engine_dir(version)
        if not local.is_dir():
            try:
                self._download(version, local)
            except FileNotFoundError:
                pass  # not published (or collected): verify() reports the missing directory
        return local

    def _download(self, version: int, local: Path) -> None:
        import obstore as obs

        raw = self._manifest_bytes(version)
        m = manifest_from_json(raw.decode())
        tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=self.engines_dir))
        try:
            for f in m.files:
                # Streamed to disk; the names are checked by verify() before anything is trusted.
                with open(tmp / Path(f.path).name, "wb") as out:
                    for chunk in obs.get(self.store, f"engines/{version}/{f.path}").stream():
                        out.write(chunk)
            try:
                (tmp / SIGNATURE).write_bytes(self._get(f"engines/{version}/{SIGNATURE}"))
            except FileNotFoundError:
                pass
            (tmp / MANIFEST).write_bytes(raw)
            try:
                tmp.rename(local)  # whole or not at all; a concurrent download may have won
            except OSError:
                pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    # ---- publishing
    def _claim(self) -> int:
        import obstore as obs
        from obstore.exceptions import AlreadyExistsError

        start = max((int(k.split("/")[1]) for k in self._keys("claims/") if k.split("/")[1].isdigit()), default=0)
        for version in range(start + 1, start + 1 + CAS_TRIES):
            try:
                obs.put(self.store, f"claims/{version}", str(time.time()).encode(), mode="create")
                return version
            except AlreadyExistsError:
                continue  # another publisher holds it: the next one
        raise RuntimeError(f"could not claim a version in {self.url}: {CAS_TRIES} taken after {start}")

    def publish(self, staging: Path, manifest: pb.EngineManifest, *, signing_key=None) -> int:
        """Claim a version, upload the files, then the manifest (the commit point); keep the staging dir as this
        process's cached copy."""
        import obstore as obs

        staging = Path(staging)
        hash_into(staging, manifest)
        version = self._claim()
        manifest.version = version
        raw = manifest_to_json(manifest).encode()
        write_atomic(staging / MANIFEST, raw)
        (staging / SIGNATURE).unlink(missing_ok=True)
        for f in manifest.files:
            obs.put(self.store, f"engines/{version}/{f.path}", staging / f.path)
        if signing_key is not None:
            sig = sign(signing_key, raw)
            write_atomic(staging / SIGNATURE, sig)
            obs.put(self.store, f"engines/{version}/{SIGNATURE}", sig)
        obs.put(self.store, f"engines/{version}/{MANIFEST}", raw)
        self._manifests[version] = raw
        try:
            staging.rename(super().engine_dir(version))
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
        return version

    def _remove_engine(self, version: int) -> bool:
        import obstore as obs

        keys = self._keys(f"engines/{version}/")
        if f"engines/{version}/{MANIFEST}" not in keys:
            return False  # another collector took it
        obs.delete(self.store, f"engines/{version}/{MANIFEST}")  # first: it stops being a version at once
        obs.delete(self.store, [k for k in keys if not k.endswith("/" + MANIFEST)])
        self._manifests.pop(version, None)
        super()._remove_engine(version)  # the cached copy, if any
        return True

    # ---- per-replica reports
    def write_report(self, key: str, data: bytes) -> None:
        import obstore as obs

        obs.put(self.store, f"reports/{key}", data)

    def read_reports(self, group: str) -> list[bytes]:
        out = []
        for key in self._keys(f"reports/{group}/"):
            try:
                out.append(self._get(key))
            except FileNotFoundError:
                continue  # replaced or removed since the listing
        return out

    # ---- rollout state: compare-and-swap on the ETag
    def _read_rollout_tagged(self) -> tuple[RolloutState, str | None]:
        import obstore as obs

        try:
            got = obs.get(self.store, ROLLOUT_KEY)
        except FileNotFoundError:
            return RolloutState(), None
        return RolloutState.from_json(bytes(got.bytes()).decode()), got.meta["e_tag"]

    def read_rollout(self) -> RolloutState:
        return self._read_rollout_tagged()[0]

    def write_rollout(self, state: RolloutState) -> None:
        import obstore as obs

        obs.put(self.store, ROLLOUT_KEY, state.to_json().encode())

    def update_rollout(self, change: Callable[[RolloutState], None]) -> RolloutState:
        import obstore as obs
        from obstore.exceptions import AlreadyExistsError, PreconditionError

        for _ in range(CAS_TRIES):
            st, tag = self._read_rollout_tagged()
            change(st)
            try:
                obs.put(self.store, ROLLOUT_KEY, st.to_json().encode(), mode={"e_tag": tag} if tag else "create")
                return st
            except (PreconditionError, AlreadyExistsError):
                continue  # someone else wrote in between: derive the change again from theirs
        raise RuntimeError(f"rollout state in {self.url}: {CAS_TRIES} conflicting writes in a row")
