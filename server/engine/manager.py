"""Keeps the serving engine current: load the promoted engine at start, watch the registry, and swap
to a newly published engine with no failed request.

Swap protocol: verify checksums → load → golden parity check → warm-up, all on a worker thread off
the request path; then one reference assignment. Requests hold the engine they started with, so
in-flight work finishes on the old engine, which is freed when its last request ends. An engine
that fails any step is refused (recorded in rollout.json with the reason) and serving goes on.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

from livetower.registry import EngineCorrupt, Registry
from server.engine.engine import Engine, EngineRejected

log = logging.getLogger("livetower.engine")


@dataclass(kw_only=True, frozen=True, slots=True)
class EngineManagerConfig:
    poll_interval_s: float = 1.0   # how often the registry is checked for new versions
    parity_tolerance: float = 1e-3  # max abs diff vs the stored golden outputs before an engine is refused
    warmup_calls: int = 20         # requests run on a new engine before it takes traffic
    num_threads: int = 1           # intra-op threads of the user-tower runner
    use_ann: bool = True           # use an engine's HNSW index when it has one (False: exact top-k)

    def __post_init__(self) -> None:
        if self.poll_interval_s <= 0:
            raise ValueError(f"poll_interval_s must be > 0, got {self.poll_interval_s}")
        if not self.parity_tolerance > 0:
            raise ValueError(f"parity_tolerance must be > 0, got {self.parity_tolerance}")
        if self.warmup_calls < 0:
            raise ValueError(f"warmup_calls must be >= 0, got {self.warmup_calls}")
        if self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {self.num_threads}")


class EngineManager:
    def __init__(self, registry: Registry, config: EngineManagerConfig,
                 on_event: Callable[[str, int, float], None] | None = None) -> None:
        self.registry = registry
        self.config = config
        self.current: Engine | None = None  # read by request handlers; replaced atomically
        self.state = "no_engine"
        self._on_event = on_event or (lambda kind, version, seconds: None)
        self._poll_lock = threading.Lock()  # the watcher and on-demand reloads never load concurrently

    def load_verified(self, version: int) -> Engine:
        """Load `version` and prove it is fit to serve; raise EngineRejected / EngineCorrupt otherwise."""
        t0 = time.perf_counter()
        manifest = self.registry.verify(version)
        try:
            engine = Engine.load(self.registry.engine_dir(version), manifest, num_threads=self.config.num_threads,
                                 use_ann=self.config.use_ann)
        except (OSError, ValueError, RuntimeError, KeyError) as e:
            raise EngineRejected(f"engine {version}: load failed: {e}") from e
        diff = engine.golden_max_abs_diff()
        if diff > self.config.parity_tolerance:
            raise EngineRejected(f"engine {version}: golden parity max abs diff {diff:.3g} > "
                                 f"tolerance {self.config.parity_tolerance:g}")
        engine.warm_up(self.config.warmup_calls)
        log.info("engine %d loaded: backend=%s items=%d parity=%.2g in %.2fs", version, manifest.backend,
                 manifest.item_count, diff, time.perf_counter() - t0)
        self._on_event("load", version, time.perf_counter() - t0)
        return engine

    def _try_swap(self, version: int) -> bool:
        rollout = self.registry.read_rollout()
        self.state = "loading" if self.current is None else self.state
        try:
            engine = self.load_verified(version)
        except (EngineRejected, EngineCorrupt) as e:
            log.error("refusing engine %d: %s; still serving %s", version, e,
                      self.current.version if self.current else "nothing")
            rollout.refused[version] = str(e)
            self.registry.write_rollout(rollout)
            self._on_event("refused", version, 0.0)
            self.state = "serving" if self.current else "no_engine"
            return False
        old = self.current
        self.current = engine  # the swap: one reference assignment
        self.state = "serving"
        rollout.stable = version
        rollout.refused.pop(version, None)
        self.registry.write_rollout(rollout)
        self._on_event("swap", version, 0.0)
        log.info("serving engine %d (was %s)", version, old.version if old else "none")
        return True

    def poll_once(self) -> bool:
        """One registry check (blocking; run it off the event loop). Returns True if it swapped."""
        with self._poll_lock:
            return self._poll_locked()

    def _poll_locked(self) -> bool:
        rollout = self.registry.read_rollout()
        versions = [v for v in self.registry.versions() if v not in rollout.refused]
        if self.current is None:
            # Start-up: what was promoted, else the newest valid.
            order = ([rollout.stable] if rollout.stable in versions else []) + sorted(versions, reverse=True)
            for v in dict.fromkeys(order):
                if self._try_swap(v):
                    return True
            return False
        newer = [v for v in versions if v > self.current.version]
        return bool(newer) and self._try_swap(max(newer))

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await asyncio.to_thread(self.poll_once)
            except Exception:  # a registry hiccup must never kill the watcher
                log.exception("engine watcher poll failed; retrying")
            try:
                await asyncio.wait_for(stop.wait(), timeout=self.config.poll_interval_s)
            except TimeoutError:
                pass
