"""Canary operations of the EngineManager (a mixin: the manager's concern split by file): start a canary,
promote it, roll it back (or roll stable back to the version before it), set the policy, keep the next version
loaded (prefetch), and analyse the running canary (acting on the verdict when this replica holds the decision
lease). Blocking; call off the event loop. grpc-free. Every change goes through the manager's _mutate: one
read-modify-write of the shared rollout state, fenced on the decision lease when the actor is "auto".
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import TYPE_CHECKING, Callable

from contracts.outcome import ArmCounts, noninferiority
from proto import livetower_v1_pb2 as pb
from contracts.rollout import CanaryPolicy, RolloutError, RolloutState
from server.engine.canary import Verdict, analyse, hold_behind, quality_vouch, small_step
from server.engine.engine import Engine
from server.engine.experiments import CONTROL

log = logging.getLogger("livetower.engine")

if TYPE_CHECKING:
    import threading

    from contracts.registry import Registry
    from server.engine.manager import EngineManagerConfig


class CanaryControl:
    # Provided by EngineManager (and ExperimentControl):
    registry: "Registry"
    config: "EngineManagerConfig"
    _lock: "threading.RLock"
    stable: Engine | None
    canary: Engine | None
    standby: Engine | None
    rollout: RolloutState
    canary_fraction: float
    canary_started: float

    if TYPE_CHECKING:  # provided by EngineManager (and the other mixin)
        @property
        def policy(self) -> CanaryPolicy: ...
        def require_idle(self, starting: str) -> None: ...
        def pending_versions(self, versions: set[int] | None = None) -> list[int]: ...
        def _retire(self, engine: Engine | None) -> None: ...
        def _mutate(self, change: Callable[[RolloutState], None], actor: str = "") -> RolloutState: ...
        def _load_or_refuse(self, version: int, actor: str) -> Engine | None: ...
        def _begin_canary(self, engine: Engine, fraction: float) -> None: ...
        def _end_canary(self) -> None: ...
        def _set_stable(self, engine: Engine) -> None: ...
        def _on_event(self, kind: str, version: int, value: float) -> None: ...

    def start_canary(self, version: int, fraction: float = 0.0, *, actor: str = "operator",
                     reason: str = "") -> RolloutState:
        fraction = fraction or self.policy.fraction
        if not 0 < fraction < 1:
            raise RolloutError("INVALID_ARGUMENT", f"fraction must be in (0, 1), got {fraction}")
        with self._lock:
            self.require_idle("a canary")
            if version == self.stable.version:
                raise RolloutError("FAILED_PRECONDITION", f"engine {version} is already stable")
            if version not in self.registry.versions():
                raise RolloutError("NOT_FOUND", f"engine {version} is not published; see ListEngines")
            engine = self._engine_for(version, actor)
            if engine is None:
                raise RolloutError("FAILED_PRECONDITION", f"engine {version} refused: "
                                                          f"{self.rollout.refused.get(version, '')}")

            def begin(st: RolloutState) -> None:
                st.canary, st.canary_fraction, st.canary_started_ms = version, fraction, int(time.time() * 1000)
                st.record("canary", version, actor, reason or f"{100 * fraction:g}% of users")

            st = self._mutate(begin, actor)
            self._begin_canary(engine, fraction)
            return st

    def _engine_for(self, version: int, actor: str) -> Engine | None:
        """The standby when it is `version` (loaded and checked already), else a fresh load (None: refused)."""
        standby = self.standby
        if standby is not None and standby.version == version:
            self.standby = None
            return standby
        return self._load_or_refuse(version, actor)

    def _prefetch(self, versions: set[int]) -> None:
        """Keep the newest pending version loaded as the standby (config.prefetch, auto mode), so this replica
        follows its canary, wherever decided, by a reference swap. A stale standby (promoted past, refused, rolled
        back) is dropped. Under the manager's lock, in the watcher's thread."""
        # Only in auto mode, where each publish is canaried next: in manual mode most versions may never be, and
        # loading each one as it is published would cost a load (CPU beside the traffic) and memory for nothing.
        wanted = self.config.prefetch and self.policy.mode == "auto" and self.stable is not None
        pending = self.pending_versions(versions) if wanted else []
        want = pending[-1] if pending else 0
        if self.standby is not None and self.standby.version != want:
            self._retire(self.standby)
            self.standby = None
        if want and self.standby is None and self.experiment is None and not self._small_step_pending(want):
            self.standby = self._load_or_refuse(want, "prefetch")

    def small_step_waits(self, version: int) -> bool:
        """Auto mode: whether the pending small step `version` waits, because the last canary began less than
        policy.small_step_interval_s ago. Each canary costs an engine load and a shadow burst beside the traffic;
        when the trainer publishes faster than that, the newest step is taken at the end of the interval and the
        ones in between are never loaded. A publish that is not a small step never waits."""
        interval = self.policy.small_step_interval_s
        if interval <= 0 or time.monotonic() - self.canary_started >= interval:
            return False
        return self._small_step_pending(version)

    def _small_step_pending(self, version: int) -> bool:
        """Whether the pending `version` is a small step from stable. Such a step is not prefetched (short rounds
        publish one every few seconds, most are superseded before their canary: measured 60 loads for 36 canaries
        in 120 s, each load ~0.2 s of the GIL beside the traffic; a refit loads in ~0.03 s when its canary starts),
        and its canary waits out policy.small_step_interval_s (small_step_waits)."""
        try:
            manifest = self._manifest(version)
        except Exception:  # noqa: BLE001 - unreadable now (collected, a registry hiccup): prefetch as before
            return False
        return self._small_step(manifest, self.stable.manifest, self.policy) is not None

    def _manifest(self, version: int) -> pb.EngineManifest:
        """A published engine's manifest, read once: manifests never change, and the auto poll (every 0.25-1 s)
        asks about the same pending versions each time (a parse took 0.9 ms of the GIL for a short round's engine;
        an object-store registry reads over the network). Raises what Registry.read_manifest raises."""
        return self._memoised("_manifest_memo", version, lambda: self.registry.read_manifest(version))

    def _memoised(self, name: str, key, compute):
        """compute() once per key, kept in this object's memo `name` (cleared past 256 entries): for facts about
        published engines, which never change. What compute() raises is raised and not kept."""
        memo = self.__dict__.setdefault(name, {})
        if key not in memo:
            if len(memo) > 256:
                memo.clear()
            memo[key] = compute()
        return memo[key]

    def _small_step(self, manifest: pb.EngineManifest, stable: pb.EngineManifest, policy) -> str | None:
        # Manifests never change, so each (engine, stable) pair's descent is looked up once (an object-store
        # registry reads one manifest per hop over the network; the canary's analysis asks every tick).
        descends = self._memoised("_descent_memo", (manifest.version, stable.version),
                                  lambda: self._descends_from(manifest, stable.version))
        return small_step(manifest, stable, policy, descends=descends)

    def _descends_from(self, manifest: pb.EngineManifest, version: int, max_hops: int = 64) -> bool:
        """Whether `version` is an ancestor of the engine (its parent, its parent's parent ...), by the registry's
        manifests. Versions only grow along a lineage, so a parent below `version` ends the walk; an engine no
        longer in the registry ends it too (no: the full canary path, the safe one)."""
        parent = manifest.parent
        for _ in range(max_hops):
            if parent == version:
                return True
            if parent < version:
                return False
            try:
                parent = self._manifest(parent).parent
            except Exception:  # noqa: BLE001 - collected or unreadable: not known to descend
                return False
        return False

    def supersede_behind_canary(self, versions: set[int]) -> int:
        """Auto mode, leader: a small-step canary behind stable (a full round's engine that stable's short rounds
        outran) gives way to the newest pending engine that descends from it and is a small step from stable, not
        behind it (the short round built on it): promoting it first would serve older weights until that one's
        canary. Never a rollback: the replaced engine is simply passed over. Returns the new canary, or 0."""
        canary, stable = self.canary, self.stable
        if canary is None or stable is None:
            return 0
        if (canary.manifest.trained_events >= stable.manifest.trained_events
                or self._small_step(canary.manifest, stable.manifest, self.policy) is None):
            return 0
        for v in sorted((v for v in self.pending_versions(versions) if v > canary.version), reverse=True):
            try:
                manifest = self._manifest(v)
            except Exception:  # noqa: BLE001 - collected or unreadable now: not a successor
                continue
            if (manifest.trained_events >= stable.manifest.trained_events
                    and self._descends_from(manifest, canary.version)
                    and self._small_step(manifest, stable.manifest, self.policy) is not None):
                break
        else:
            return 0
        engine = self._engine_for(v, "auto")
        if engine is None:
            return 0
        old, fraction = canary.version, self.canary_fraction
        why = (f"superseded by engine {v}, which descends from it and is not behind stable "
               f"({stable.manifest.trained_events - canary.manifest.trained_events} events behind)")

        def swap(st: RolloutState) -> None:
            st.record("supersede", old, "auto", why)
            st.canary, st.canary_started_ms = v, int(time.time() * 1000)
            st.record("canary", v, "auto", f"{100 * fraction:g}% of users; supersedes engine {old}")

        self._mutate(swap, "auto")
        self._begin_canary(engine, fraction)  # ends (and retires) the old canary first
        log.info("canary engine %d %s", old, why)
        return v

    def promote(self, *, actor: str = "operator", reason: str = "", expect: int = 0) -> RolloutState:
        with self._lock:
            canary = self.canary
            if canary is None or (expect and canary.version != expect):
                raise RolloutError("FAILED_PRECONDITION", "no canary to promote")

            def promote(st: RolloutState) -> None:
                st.record("promote", canary.version, actor, reason or "promoted by an operator")
                st.stable = canary.version
                st.end_canary()

            st = self._mutate(promote, actor)
            self._set_stable(canary)
            self._end_canary()
            self._on_event("promote", canary.version, 0.0)
            return st

    def rollback(self, *, actor: str = "operator", reason: str = "", expect: int = 0) -> RolloutState:
        """Drop the canary; with none, go back to the stable version before the current one."""
        with self._lock:
            canary = self.canary
            if canary is not None:
                if expect and canary.version != expect:
                    raise RolloutError("FAILED_PRECONDITION", f"canary is {canary.version}, not {expect}")
                why = reason or "rolled back by an operator"

                def drop(st: RolloutState) -> None:
                    st.record("rollback", canary.version, actor, why)
                    st.rolled_back[canary.version] = why
                    st.end_canary()

                st = self._mutate(drop, actor)
                self._end_canary()
                self._on_event("rollback", canary.version, 0.0)
                return st
            if self.stable is None:
                raise RolloutError("FAILED_PRECONDITION", "nothing is serving: nothing to roll back")
            if self.experiment is not None:
                raise RolloutError("FAILED_PRECONDITION", f"stable is the control of experiment "
                                                          f"{self.experiment.experiment.name!r}; stop it first")
            current = self.stable.version
            previous = next((e.stable_version for e in reversed(self.rollout.history)
                             if e.action == "promote" and e.version == current and e.stable_version), 0)
            if not previous:
                raise RolloutError("FAILED_PRECONDITION", f"engine {current} was not promoted from another "
                                                          "version: nothing to roll back to")
            engine = self._load_or_refuse(previous, actor)
            if engine is None:
                raise RolloutError("FAILED_PRECONDITION", f"previous stable engine {previous} was refused")
            why = reason or f"rolled back to {previous} by an operator"

            def back(st: RolloutState) -> None:
                st.record("rollback", current, actor, why)
                st.rolled_back[current] = why
                st.stable = previous

            st = self._mutate(back, actor)
            self._set_stable(engine)
            self._on_event("rollback", current, 0.0)
            return st

    def set_policy(self, policy: CanaryPolicy, *, actor: str = "operator") -> RolloutState:
        def change(st: RolloutState) -> None:
            st.policy = policy
            st.record("policy", 0, actor, f"mode={policy.mode} fraction={policy.fraction} "
                                          f"min_requests={policy.min_requests}")

        return self._mutate(change)

    def analyse_once(self) -> Verdict | None:
        """Analyse the running canary (or experiment); in auto mode (leader) act on the verdict. Blocking."""
        if self.experiment is not None:
            self.analyse_experiment()
            return None
        canary, stats = self.canary, self.stats
        if canary is None or stats is None:
            return None
        stable, policy = self.stable, self.policy
        vouch = quality_vouch(dict(canary.manifest.eval_metrics), stable.version) if stable is not None else None
        outcome = None
        if policy.outcome_test != "off" and stable is not None:
            counts = self.read_outcomes(self.rollout.canary_started_ms, policy.outcome_settle_s)
            outcome = noninferiority(ArmCounts(*counts.get(("canary", canary.version), (0, 0))),
                                     ArmCounts(*counts.get((CONTROL, stable.version), (0, 0))),
                                     policy.outcome(), policy.outcome_margin)
            if self._outcome_counts is None:
                outcome = dataclasses.replace(outcome, action="fail", reason=(
                    "the policy judges hit rate (outcome_test) but this server records no impressions"))
        fleet = self._reports.tick(canary.version, stats, self.leading)
        small = self._small_step(canary.manifest, stable.manifest, policy) if stable is not None else None
        verdict = analyse(stats, policy, vouch=vouch, outcome=outcome, fleet=fleet, small=small)
        if stable is not None:
            in_canary_s = time.time() - self.rollout.canary_started_ms / 1000
            verdict = hold_behind(verdict, canary.manifest, stable.manifest, small, in_canary_s, policy)
        self.last_verdict = verdict
        if not (self.leading and self.policy.mode == "auto") or verdict.action == "wait":
            return verdict
        log.info("auto %s of canary %d: %s", verdict.action, canary.version, verdict.reason)
        act = self.promote if verdict.action == "promote" else self.rollback
        try:
            act(actor="auto", reason=verdict.reason, expect=canary.version)
        except RolloutError as e:  # an operator acted first
            log.info("auto %s of %d skipped: %s", verdict.action, canary.version, e)
        return verdict
