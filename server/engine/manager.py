"""Keeps the serving engines current: the stable engine, and a canary in front of a sticky slice of
users while it is judged. grpc-free.

rollout.json (registry) is the source of truth for which versions serve; every server process
reconciles to it each poll, so servers sharing a registry agree. Operations (start a canary,
promote, roll back, set the policy) are read-modify-writes of it under the registry's rollout lock.
In auto mode the leader process canaries each newly published version and promotes or rolls it
back on the analysis (server/engine/canary.py); in manual mode new versions wait for an operator.

Loading: verify checksums → load (a refit engine runs its graph version's compiled tower with its
own weights) → golden parity → warm-up, off the request path; then one reference assignment.
Requests hold the engine they started with, so in-flight work finishes on the old engine, freed
when its last request ends. An engine that fails any step is refused and recorded with the reason.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from contracts.catalog import CatalogStore
from contracts.registry import EngineCorrupt, Registry
from contracts.rollout import CanaryPolicy, RolloutError, RolloutState
from contracts.signing import ManifestTrust
from server.engine.canary import CanaryStats, ShadowScorer, Verdict, in_canary
from server.engine.engine import Engine, EngineRejected, RecommendQuery
from server.engine.canary_control import CanaryControl
from server.engine.catalog_sync import CatalogSync
from server.engine.experiment_control import ExperimentControl
from server.engine.experiments import CONTROL, RunningExperiment
from server.engine.fleet_stats import CanaryReports
from server.engine.lease import check_holder, default_replica_id, hold, renew_until
from server.engine.loading import ComputeKeeper, load_from_registry, lower_thread_priority
from server.engine.stages import StageClock

log = logging.getLogger("livetower.engine")


@dataclass(kw_only=True, frozen=True, slots=True)
class EngineManagerConfig:
    poll_interval_s: float = 1.0    # how often rollout.json and the registry are checked
    analysis_interval_s: float = 0.5   # how often a running canary is analysed (about 1 ms of GIL each)
    parity_tolerance: float = 1e-3  # max abs diff vs the stored golden outputs before an engine is refused
    warmup_calls: int = 20          # requests run on a new engine before it takes traffic
    refit_warmup_calls: int = 2     # ... on a refit whose compiled graph an engine this process serves already runs:
                                    # its code paths are warm, only its weights and item rows are new. Short rounds
                                    # publish one every 1-2 s: refit loads took 0.14 s with 20, 0.03 s with 2
                                    # (docs/cold_start.md)
    verify_pause_s: float = 0.001   # pause after each MiB of an engine's files hashed at load (leaves CPU to requests)
    load_nice: int = 0              # an engine load (files, parity, warm-up) runs this much lower in CPU priority.
    # 0 by default: a load's Python holds the GIL while it runs, and a lowered thread preempted while holding it
    # waits behind every other process for a core while the serving threads wait for it (priority inversion):
    # trainer beside the server, 300 QPS, 6 runs each: P99 median 8.9 ms at 0, 29 ms at 10 (docs/serving.md §7)
    num_threads: int = 1            # intra-op threads of the user-tower runner
    use_ann: bool = True            # use an engine's item index when it has one (False: exact top-k)
    compute_process: bool = True    # run the engines' user towers and item searches in one long-lived child process
                                    # (server/engine/compute_process.py), beside the event loop without sharing its
                                    # GIL: the batches of the compute thread go there (a Recommend computed inline
                                    # on the event loop still is, while the loop's load allows). Costs a second copy
                                    # of each engine in memory; measured in docs/serving.md section 7
    compute_restart_backoff_s: float = 5.0  # serving engines the compute host lost (it died) or could not take are
                                    # loaded into it again at once, the next time no sooner than this, doubled each
                                    # time up to 300 s (a host that keeps failing costs little); meanwhile they
                                    # compute in the server process
    recall_tolerance: float = 0.02  # refuse an engine whose index recall@k on its held-out queries falls more than
                                    # this below the target it was built for (sampling noise of a few hundred queries)
    leader: bool = True             # may hold the decision lease and so make the automatic rollout decisions
                                    # (server/engine/lease.py); False: never (serve --workers' followers)
    replica_id: str = ""            # names this process in the lease and the history; "": host:pid
    lease_s: float = 5.0            # the decision lease lapses this long after its last renewal (renewed at half)
    trusted_keys: Path | None = None  # file of trusted Ed25519 public keys (PEM blocks or 64-hex lines): a signed
                                    # engine whose manifest.sig verifies with none of them is refused
    require_signature: bool = False  # refuse engines without a manifest.sig that verifies (needs trusted_keys)
    prefetch: bool = True           # auto mode: load the newest pending published version ahead of its canary (one
                                    # engine more in memory), so every replica follows the decision by a swap
    outcome_interval_s: float = 2.0  # how often a canary's or experiment's hit rates are read from the attribution store
    default_policy: CanaryPolicy = field(default_factory=CanaryPolicy)  # until an operator sets one

    def __post_init__(self) -> None:
        for name in ("poll_interval_s", "analysis_interval_s", "parity_tolerance", "outcome_interval_s", "lease_s",
                     "compute_restart_backoff_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0 <= self.recall_tolerance < 1:
            raise ValueError(f"recall_tolerance must be in [0, 1), got {self.recall_tolerance}")
        for name in ("warmup_calls", "refit_warmup_calls"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.load_nice <= 19:
            raise ValueError(f"load_nice must be in [0, 19], got {self.load_nice}")
        if not 0 <= self.verify_pause_s <= 0.1:
            raise ValueError(f"verify_pause_s must be in [0, 0.1], got {self.verify_pause_s}")
        if self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {self.num_threads}")
        if self.require_signature and self.trusted_keys is None:
            raise ValueError("require_signature needs trusted_keys (a file of trusted public keys)")


EngineLoader = Callable[[Registry, int, EngineManagerConfig], Engine]
# (served from ms, served to ms) -> {(arm, engine version): (impressions, hit impressions)}: attribution.window_counts
OutcomeCounts = Callable[[int, int], dict[tuple[str, int], tuple[int, int]]]


class EngineManager(CanaryControl, ExperimentControl):
    def __init__(self, registry: Registry, config: EngineManagerConfig,
                 on_event: Callable[[str, int, float], None] | None = None, *,  # (kind, version, value)
                 loader: EngineLoader | None = None,  # None: load_from_registry
                 user_histories: Callable[[], list[list[str]]] = list,
                 outcome_counts: OutcomeCounts | None = None,  # None: no impressions recorded
                 catalog: CatalogStore | None = None) -> None:  # None: no catalogue (unit tests)
        self.registry = registry
        self.config = config
        # Read once here so a bad key file stops the server at start; loads read it again (a rotated file).
        ManifestTrust.from_files(config.trusted_keys, config.require_signature)
        self.stable: Engine | None = None   # read by request handlers; replaced atomically
        self.canary: Engine | None = None
        self.canary_fraction = 0.0
        self.canary_started = -math.inf  # time.monotonic() when this process last began serving a canary
        self.stats: CanaryStats | None = None
        self.last_verdict: Verdict | None = None
        self.rollout = RolloutState()       # as last read or written
        self.state = "no_engine"
        self._shadow: ShadowScorer | None = None
        self._on_event = on_event or (lambda kind, version, seconds: None)
        self._loader = loader
        self._user_histories = user_histories
        self._lock = threading.RLock()      # loads and rollout changes of this process, one at a time
        self.clock = StageClock()           # compute time per stage, over every engine this process served
        # Engines no longer serving, kept until no request holds them, then dropped by the watcher's
        # thread: freeing one (its constants, index and item matrix) took 2 ms at 100k items and 19 ms
        # at 1M, which the last request's handler would otherwise spend on the event loop.
        self._retired: list[Engine] = []
        self.canary_salt = b""  # the registry's secret keying the user split; read before a canary starts
        self.experiment: RunningExperiment | None = None  # arms' engines while rollout.json names a running one
        self.standby: Engine | None = None  # a pending version loaded and checked ahead of its canary (prefetch)
        self.replica = config.replica_id or default_replica_id()
        self.leading = False  # holds the decision lease (as of the last poll)
        self.admin_address = ""  # HOST:PORT of this process's admin listener, recorded with the lease (set once bound)
        self._reports = CanaryReports(registry, self.replica)  # the running canary's evidence from every replica
        self._outcome_counts = outcome_counts
        self._outcomes_read = (-1.0, 0, {})  # (monotonic time, window start, counts): reads throttled
        self.catalog = CatalogSync(catalog) if catalog is not None else None  # catalogue changes -> every engine
        self._compute = ComputeKeeper(config) if config.compute_process else None  # the engines' compute host

    @property
    def current(self) -> Engine | None:
        return self.stable

    def serving_engines(self) -> list[Engine]:
        """Every engine this process holds for serving: stable, canary, the standby and experiment arms."""
        arms = self.experiment.engines.values() if self.experiment is not None else ()
        out: list[Engine] = []
        for e in (self.stable, self.canary, self.standby, *arms):
            if e is not None and all(e is not o for o in out):
                out.append(e)
        return out

    @property
    def policy(self) -> CanaryPolicy:
        return self.rollout.policy or self.config.default_policy

    # ---- request path (event loop; no locks)
    def route(self, user_id: str) -> tuple[Engine | None, str]:
        """(engine, arm): arm is "stable", "canary" or an experiment arm's name (what impressions record)."""
        experiment = self.experiment
        if experiment is not None:
            hit = experiment.route(user_id)
            if hit is not None:
                return hit[1], hit[0]
            return self.stable, CONTROL
        canary = self.canary
        if canary is not None and in_canary(user_id, canary.version, self.canary_fraction, self.canary_salt):
            return canary, "canary"
        return self.stable, CONTROL

    def observe(self, engine: Engine, arm: str, seconds: float, error: bool,
                query: RecommendQuery | None = None) -> None:
        experiment = self.experiment
        if experiment is not None:
            experiment.observe(arm, error)
            return
        stats, canary, is_canary = self.stats, self.canary, arm == "canary"
        if stats is None or canary is None or (is_canary and engine is not canary):
            return  # no canary, or a request that started before this canary
        stats.observe(is_canary, seconds, error)
        if query is not None:
            stats.offer(query)

    # ---- loading
    def load_verified(self, version: int) -> Engine:
        """Load `version` and prove it is fit to serve; raise EngineRejected / EngineCorrupt otherwise."""
        self.release_retired()  # free unheld old engines before another one takes memory
        t0 = time.perf_counter()
        with lower_thread_priority(self.config.load_nice):
            engine = (self._loader or load_from_registry)(self.registry, version, self.config)
            diff = engine.golden_max_abs_diff()
            if diff > self.config.parity_tolerance:
                raise EngineRejected(f"engine {version}: golden parity max abs diff {diff:.3g} > "
                                     f"tolerance {self.config.parity_tolerance:g}")
            recall = engine.index_recall()
            if recall is not None and recall[0] < recall[1] - self.config.recall_tolerance:
                raise EngineRejected(f"engine {version}: index recall {recall[0]:.4f} on its held-out queries is "
                                     f"below the build's target {recall[1]:g} - {self.config.recall_tolerance:g}")
            engine.warm_up(self.config.refit_warmup_calls if self._graph_is_warm(engine) else self.config.warmup_calls)
            if self._compute is not None and engine.engine_dir is not None:
                self._compute.attach(engine)
            if self.catalog is not None:  # every catalogue change so far, before it serves (users' records are
                self.catalog.catch_up([engine])  # encoded here: load work, at the loading thread's priority)
        engine.clock = self.clock  # counted from here: warm-up is not serving
        seconds = time.perf_counter() - t0
        log.info("engine %d loaded (%s): backend=%s items=%d parity=%.2g in %.2fs", version,
                 "refit" if engine.manifest.graph_version else "full", engine.manifest.backend,
                 engine.manifest.item_count, diff, seconds)
        self._on_event("load", version, seconds)
        return engine

    def _graph_is_warm(self, engine: Engine) -> bool:
        """Whether `engine` is a refit of a compiled graph that an engine this process serves runs too."""
        graph = engine.manifest.graph_version
        return bool(graph) and any((e.manifest.graph_version or e.version) == graph for e in self.serving_engines())

    def _load_or_refuse(self, version: int, actor: str) -> Engine | None:
        try:
            return self.load_verified(version)
        except (EngineRejected, EngineCorrupt) as e:
            reason = str(e)
            log.error("refusing engine %d: %s; stable stays %s", version, reason,
                      self.stable.version if self.stable else 0)

            def refuse(st: RolloutState) -> None:
                st.refused[version] = reason
                if st.canary == version:
                    st.end_canary()
                st.record("refuse", version, actor, reason)

            self._mutate(refuse)
            self._on_event("refused", version, 0.0)
            return None

    def _mutate(self, change: Callable[[RolloutState], None], actor: str = "") -> RolloutState:
        """Apply `change` to the shared rollout state; the events it records name this replica. An automatic
        decision (actor "auto") is fenced: it applies only while this replica holds the decision lease."""
        replica = self.replica

        def stamped(st: RolloutState) -> None:
            if actor == "auto":
                check_holder(st, replica)
            before = {id(e) for e in st.history}
            change(st)
            st.history = [e if id(e) in before or e.replica else dataclasses.replace(e, replica=replica)
                          for e in st.history]

        with self._lock:
            self.rollout = self.registry.update_rollout(stamped)
            return self.rollout

    # ---- applying rollout state to this process
    def _set_stable(self, engine: Engine) -> None:
        self.release_retired()  # what earlier swaps retired, before this one retires another
        old = self.stable
        self.stable = engine  # the swap: one reference assignment
        self._retire(old)
        self.state = "serving"
        self._on_event("swap", engine.version, 0.0)
        log.info("stable engine %d (was %s)", engine.version, old.version if old else "none")

    def _begin_canary(self, engine: Engine, fraction: float) -> None:
        self._end_canary()
        self.split_salt()
        stats = CanaryStats()
        self.stats, self.canary_fraction = stats, fraction
        self._reports = CanaryReports(self.registry, self.replica)
        self.canary = engine
        self.canary_started = time.monotonic()
        if self.config.leader and self.stable is not None:
            small = self._small_step(engine.manifest, self.stable.manifest, self.policy) is not None
            self._shadow = ShadowScorer(self.stable, engine, stats, self.policy,
                                        lambda: self._user_histories(), small=small).start()
        self._on_event("canary", engine.version, fraction)
        log.info("canary engine %d serves %.1f%% of users", engine.version, 100 * fraction)

    def split_salt(self) -> bytes:
        """The registry's secret keying every user split (canary and experiments); read once, never under the
        rollout lock (flock would wait for itself)."""
        if not self.canary_salt:
            self.canary_salt = self.registry.canary_salt()
        return self.canary_salt

    def _retire(self, engine: Engine | None) -> None:
        if engine is not None and engine is not self.stable and engine is not self.canary:
            self._retired.append(engine)

    def release_retired(self) -> int:
        """Drop retired engines no request holds any more (here, off the event loop); returns how many
        are still held."""
        held = []
        for engine in self._retired:
            # A reference each from the list, this loop's variable and getrefcount's argument: more is a holder.
            if sys.getrefcount(engine) > 3:
                held.append(engine)
        self._retired = held
        return len(held)

    def _end_canary(self) -> None:
        if self.canary is not None:
            self._on_event("canary_end", self.canary.version, 0.0)
        old, self.canary = self.canary, None
        if self._shadow is not None:
            self._shadow.stop()
            self._shadow = None
        self._retire(old)

    def poll_once(self) -> bool:
        """Reconcile with rollout.json, then (auto mode, leader) canary a newly published version.
        Blocking; run it off the event loop. Returns True if what this process serves changed."""
        with self._lock:
            self.release_retired()
            before = (self.stable, self.canary)
            st = self.keep_lease()
            self.rollout = st
            versions = set(self.registry.versions())
            if self.stable is None and st.canary in versions and st.canary not in st.refused and self.standby is None:
                self.standby = self._load_or_refuse(st.canary, "startup")  # so stable and canary start serving at once
            if self.stable is None or self.stable.version != st.stable:
                self._reconcile_stable(st, versions)
            st = self.rollout
            if (self.canary.version if self.canary else 0) != st.canary:
                engine = None
                if st.canary in versions and st.canary != (self.stable.version if self.stable else 0):
                    engine = self._engine_for(st.canary, "reconcile")
                if engine is not None and self.rollout.canary == engine.version:
                    self._begin_canary(engine, st.canary_fraction)
                else:
                    self._end_canary()
            elif self.canary is not None:
                self.canary_fraction = st.canary_fraction
            self._reconcile_experiment(self.rollout)
            self._prefetch(versions)
            if self.catalog is not None:  # changes written by another process (livetower catalog load)
                self.catalog.catch_up(self.serving_engines())
            if self.leading and self.policy.mode == "auto" and self.stable and self.canary and not self.experiment:
                self.supersede_behind_canary(versions)
            elif (self.leading and self.policy.mode == "auto" and self.stable and not self.canary
                    and not self.experiment):  # publishes wait while an experiment runs
                new = self.pending_versions(versions)
                if new and not self.small_step_waits(max(new)):
                    try:
                        self.start_canary(max(new), actor="auto", reason="newly published")
                    except RolloutError as e:
                        log.warning("auto canary of engine %d not started: %s", max(new), e)
            return (self.stable, self.canary) != before

    def keep_lease(self) -> RolloutState:
        """Read rollout.json; take or renew the decision lease (config.leader). Needs no lock: run() also calls it
        on its own cadence, so an engine load that holds the lock for longer than half the lease cannot let it
        lapse (every lease change is a compare-and-swap)."""
        st = self.registry.read_rollout()
        if self.config.leader:
            self.leading, st = hold(self.registry, self.replica, self.config.lease_s, st, self.admin_address)
        return st

    def pending_versions(self, versions: set[int] | None = None) -> list[int]:
        """Published versions newer than stable, not in canary, never refused or rolled back (ascending)."""
        st, stable = self.rollout, self.stable.version if self.stable else 0
        versions = self.registry.versions() if versions is None else versions
        return sorted(v for v in versions if v > stable and v != st.canary
                      and v not in st.refused and v not in st.rolled_back)

    def _reconcile_stable(self, st: RolloutState, versions: set[int]) -> None:
        if self.canary is not None and self.canary.version == st.stable:  # promoted elsewhere: no reload
            self._set_stable(self.canary)
            self._end_canary()
            return
        if (winner := self.arm_engine(st.stable)) is not None:  # an experiment's winner, promoted elsewhere
            self._set_stable(winner)
            self._end_experiment()
            return
        if st.stable in versions and st.stable not in st.refused:
            engine = self._engine_for(st.stable, "startup")
            if engine is not None:
                self._set_stable(engine)
                return
        if self.stable is not None:
            return  # keep serving what we have; the refusal is recorded
        self.state = "loading"
        refused = self.rollout.refused
        for v in sorted((v for v in versions if v not in refused), reverse=True):  # start-up: newest valid
            engine = self._load_or_refuse(v, "startup")
            if engine is not None:
                self._set_stable(engine)

                def serve(s: RolloutState) -> None:
                    s.stable = v
                    s.record("serve", v, "startup", "no valid stable version recorded: serving the newest valid")

                self._mutate(serve)
                return
        self.state = "no_engine"

    def close(self) -> None:
        """Stop this process's canary work (its shadow thread) and its engines' compute processes (a request still
        running computes in this process); the server does this once it has drained."""
        self._end_canary()
        self._retire(self.standby)
        self.standby = None
        if self._compute is not None:
            self._compute.close()

    async def run(self, stop: asyncio.Event) -> None:
        lease = (asyncio.create_task(renew_until(stop, self.keep_lease, self.config.lease_s / 4))
                 if self.config.leader else None)
        try:
            await self._watch(stop)
        finally:
            if lease is not None:
                await lease

    async def _watch(self, stop: asyncio.Event) -> None:
        next_poll = 0.0
        while not stop.is_set():
            try:
                if time.monotonic() >= next_poll:
                    next_poll = time.monotonic() + self.config.poll_interval_s
                    await asyncio.to_thread(self.poll_once)
                if self.canary is not None or self.experiment is not None:
                    await asyncio.to_thread(self.analyse_once)
                if self._retired:
                    await asyncio.to_thread(self.release_retired)
                if self._compute is not None and (lost := self._compute.lost(self.serving_engines())):
                    await asyncio.to_thread(self._compute.restore, lost)
            except Exception:  # a registry hiccup must never kill the watcher
                log.exception("engine watcher failed; retrying")
            try:
                await asyncio.wait_for(stop.wait(), timeout=min(self.config.analysis_interval_s,
                                                                self.config.poll_interval_s))
            except TimeoutError:
                pass
        self._end_canary()
