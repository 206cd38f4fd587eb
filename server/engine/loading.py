"""Loading an engine from the registry for the manager: verify checksums (the graph version's too, for a
refit), load with the configured threads and index, and the thread-priority guard loads run under."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import weakref
from pathlib import Path
from typing import TYPE_CHECKING

from contracts.registry import USER_VECTORS_FILE, EngineCorrupt, Registry
from contracts.signing import KeyFileError, ManifestTrust
from proto import livetower_v1_pb2 as pb
from server.engine.compute_process import ComputeHost, ComputeProcess, ComputeProcessError
from server.engine.engine import Engine, EngineRejected

if TYPE_CHECKING:
    from server.engine.manager import EngineManagerConfig

log = logging.getLogger("livetower.engine")


def load_from_registry(registry: Registry, version: int, config: EngineManagerConfig) -> Engine:
    try:
        trust = ManifestTrust.from_files(config.trusted_keys, config.require_signature)
    except KeyFileError as e:
        raise EngineCorrupt(f"engine {version}: cannot check its signature: {e}") from e
    manifest = registry.verify(version, pause_s=config.verify_pause_s, trust=trust)
    graph_dir = None
    if manifest.graph_version:
        try:
            registry.verify(manifest.graph_version, pause_s=config.verify_pause_s, trust=trust)
        except EngineCorrupt as e:
            raise EngineCorrupt(f"engine {version} runs the graph of engine {manifest.graph_version}, which is "
                                f"refused: {e}") from e
        graph_dir = registry.engine_dir(manifest.graph_version)
    try:
        return Engine.load(registry.engine_dir(version), manifest, num_threads=config.num_threads,
                           use_ann=config.use_ann, graph_dir=graph_dir,
                           users_dir=_users_vectors_dir(registry, manifest, config, trust))
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise EngineRejected(f"engine {version}: load failed: {e}") from e


def start_compute_process(engine: Engine, config: EngineManagerConfig, host: ComputeHost) -> ComputeProcess:
    """The engine loaded, checked and warmed in the server's compute host; its connection closed (the host frees
    it) when the engine is freed."""
    try:
        proc = host.open(engine.engine_dir, engine.manifest.SerializeToString(), engine.version,
                         graph_dir=engine.graph_dir, use_ann=config.use_ann and engine.ann is not None)
    except ComputeProcessError as e:
        raise EngineRejected(str(e)) from e
    if proc.parity_max_abs_diff > config.parity_tolerance:
        proc.close()
        raise EngineRejected(f"engine {engine.version}: its compute host's golden parity max abs diff "
                             f"{proc.parity_max_abs_diff:.3g} > tolerance {config.parity_tolerance:g}")
    weakref.finalize(engine, proc.close)
    return proc


class ComputeKeeper:
    """A manager's compute host and the engines in it. An engine the host cannot take (it did not start, could not
    load the files, or its parity check failed there) is served from the server process, as one whose host died;
    both are loaded into the host again at once, then no sooner than a backoff that doubles each time. Thread-safe
    as ComputeHost is."""

    MAX_BACKOFF_S = 300.0

    def __init__(self, config: EngineManagerConfig) -> None:
        self.config = config
        self.host = ComputeHost(num_threads=config.num_threads)
        self._procs: weakref.WeakSet = weakref.WeakSet()  # every engine's connection (closed with its engine)
        self._restore_at = 0.0                            # time.monotonic(): no restore before
        self._backoff_s = config.compute_restart_backoff_s

    def attach(self, engine: Engine) -> bool:
        """Load `engine` into the host; False (logged): it computes in the server process instead."""
        try:
            proc = start_compute_process(engine, self.config, self.host)
        except EngineRejected as e:
            log.error("engine %d computes in the server process: %s", engine.version, e)
            return False
        engine.compute_process = proc  # the batcher reads it per batch
        self._procs.add(proc)
        return True

    def lost(self, engines: list[Engine]) -> list[Engine]:
        """Those of `engines` that should compute in the host and do not, if a restore is due now (else none)."""
        if time.monotonic() < self._restore_at:
            return []
        return [e for e in engines if getattr(e, "engine_dir", None) is not None
                and (getattr(e, "compute_process", None) is None or not e.compute_process.poll())]

    def restore(self, engines: list[Engine]) -> int:
        """Load `engines` into the host (started again if it died; blocking, off the event loop). Returns how many
        it took."""
        try:
            restored = sum(self.attach(engine) for engine in engines)
        finally:
            self._restore_at = time.monotonic() + self._backoff_s
            self._backoff_s = min(self.MAX_BACKOFF_S, 2 * self._backoff_s)
        log.warning("compute host: %d of %d engines in it again (pid %s, start %d); the next try no sooner than in "
                    "%g s", restored, len(engines), getattr(self.host.proc, "pid", None), self.host.starts,
                    self._restore_at - time.monotonic())
        return restored

    def close(self) -> None:
        """Close every engine's connection, then the host."""
        for proc in list(self._procs):
            proc.close()
        self.host.close()


def _users_vectors_dir(registry: Registry, manifest: pb.EngineManifest, config: EngineManagerConfig,
                       trust: ManifestTrust) -> Path | None:
    """The verified dir of the engine whose users' vectors `manifest` points to, or None. Those vectors only save
    encoding work (a server without them encodes every user), so a source that is gone or fails verification
    is logged, not a reason to refuse the engine."""
    source = int(manifest.user_vectors_version)
    if not source:
        return None
    try:
        listed = {f.path for f in registry.verify(source, pause_s=config.verify_pause_s, trust=trust).files}
    except (EngineCorrupt, OSError) as e:
        log.warning("engine %d: the users' vectors of engine %d are not used (%s); every user record is encoded",
                    manifest.version, source, e)
        return None
    if USER_VECTORS_FILE not in listed:
        log.warning("engine %d: engine %d lists no %s; every user record is encoded", manifest.version, source,
                    USER_VECTORS_FILE)
        return None
    return registry.engine_dir(source)


@contextlib.contextmanager
def lower_thread_priority(nice: int):
    """Run the block at `nice` more than this thread's CPU priority (Linux: per thread), then restore it. Off by
    default (EngineManagerConfig.load_nice): the block's Python holds the GIL while it runs, and a lowered thread
    preempted while holding it is what the serving threads then wait for."""
    tid = threading.get_native_id()
    try:
        before = os.getpriority(os.PRIO_PROCESS, tid)
        if nice:
            os.setpriority(os.PRIO_PROCESS, tid, min(19, before + nice))
    except (OSError, AttributeError):
        yield
        return
    try:
        yield
    finally:
        try:
            os.setpriority(os.PRIO_PROCESS, tid, before)
        except OSError:  # raising priority back may need CAP_SYS_NICE; the thread stays lower (only loads run there)
            log.debug("could not restore thread priority %d", before)
