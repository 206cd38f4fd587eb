"""Experiment operations of the EngineManager (a mixin: the manager's concern split by file): start, stop,
follow rollout.json, and the automatic hit-rate decision. Blocking; call off the event loop. grpc-free.

Invariants: an experiment and a canary never run at once; stable (the control) does not change while an
experiment runs (no canary, no rollback, no auto canary of new publishes: they wait as pending); only the
leader process decides, every process follows rollout.json within a poll.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Callable

from contracts.outcome import ExperimentDecision, OutcomeTest
from contracts.registry import Registry
from contracts.rollout import Experiment, ExperimentArm, RolloutError, RolloutState
from server.engine.engine import Engine
from server.engine.experiments import ArmLive, RunningExperiment, decide
from server.engine.fleet_stats import fleet_outcomes

if TYPE_CHECKING:
    from server.engine.manager import EngineManagerConfig

log = logging.getLogger("livetower.engine")


class ExperimentControl:
    # Provided by EngineManager:
    config: "EngineManagerConfig"
    registry: Registry
    _lock: threading.RLock
    stable: Engine | None
    canary: Engine | None
    experiment: RunningExperiment | None
    rollout: RolloutState
    canary_salt: bytes
    _outcome_counts: Callable[[int, int], dict] | None
    _outcomes_read: tuple[float, int, dict]

    leading: bool
    replica: str

    if TYPE_CHECKING:  # provided by EngineManager (and the other mixin)
        def _mutate(self, change: Callable[[RolloutState], None], actor: str = "") -> RolloutState: ...
        def _load_or_refuse(self, version: int, actor: str) -> Engine | None: ...
        def _engine_for(self, version: int, actor: str) -> Engine | None: ...
        def _set_stable(self, engine: Engine) -> None: ...
        def _retire(self, engine: Engine | None) -> None: ...
        def split_salt(self) -> bytes: ...

    def require_idle(self, starting: str) -> None:
        """Raise unless stable serves and neither a canary nor an experiment runs (each needs stable to itself)."""
        if self.stable is None:
            raise RolloutError("FAILED_PRECONDITION", f"no stable engine yet: {starting} needs one (the first "
                                                      "engine serves directly)")
        if self.canary is not None:
            raise RolloutError("FAILED_PRECONDITION", f"engine {self.canary.version} is in canary; promote or roll "
                                                      f"it back before starting {starting}")
        if self.experiment is not None:
            raise RolloutError("FAILED_PRECONDITION", f"experiment {self.experiment.experiment.name!r} is running; "
                                                      "stop it first (livetower experiments stop)")

    def start_experiment(self, name: str, arms: list[ExperimentArm], test: OutcomeTest, *, settle_s: float = 10.0,
                         promote_winner: bool = False, actor: str = "operator") -> RolloutState:
        with self._lock:
            self.require_idle("an experiment")
            try:
                x = Experiment(id=int(time.time() * 1000), name=name, arms=tuple(arms),
                               control_version=self.stable.version, test=test, settle_s=settle_s,
                               promote_winner=promote_winner)
            except ValueError as e:
                raise RolloutError("INVALID_ARGUMENT", str(e)) from None
            published = set(self.registry.versions())
            missing = [a.version for a in arms if a.version not in published]
            if missing:
                raise RolloutError("NOT_FOUND", f"engine(s) {missing} not published; see ListEngines")
            engines = {}
            for arm in arms:
                engine = self._engine_for(arm.version, actor)
                if engine is None:
                    raise RolloutError("FAILED_PRECONDITION", f"engine {arm.version} (arm {arm.name}) refused: "
                                                              f"{self.rollout.refused.get(arm.version, '')}")
                engines[arm.name] = engine

            def begin(st: RolloutState) -> None:
                st.experiment = x
                st.record("experiment", 0, actor, f"{name}: " + ", ".join(
                    f"{a.name} = engine {a.version} on {100 * a.fraction:g}%" for a in arms)
                    + f"; control = stable {x.control_version}; {test.test} test at alpha {test.alpha:g}")

            st = self._mutate(begin)
            self._begin_experiment(x, engines)
            return st

    def stop_experiment(self, *, actor: str = "operator", reason: str = "", decision: str = "stopped",
                        winner_version: int = 0, promote: bool = False, expect_id: int = 0) -> RolloutState:
        """End the running experiment; promote: make winner_version (one of its arms) stable."""
        with self._lock:
            running = self.experiment
            if running is None or (expect_id and running.experiment.id != expect_id):
                raise RolloutError("FAILED_PRECONDITION", "no experiment is running")
            x = running.experiment
            winner = self.arm_engine(winner_version) if winner_version else None
            if winner_version and winner is None:
                raise RolloutError("INVALID_ARGUMENT", f"engine {winner_version} is not an arm of experiment "
                                                       f"{x.name!r} (arms: {[a.version for a in x.arms]})")
            if promote and winner is None:
                raise RolloutError("INVALID_ARGUMENT", "promote needs the winner's version")
            why = reason or "stopped by an operator"

            def end(st: RolloutState) -> None:
                if st.experiment is None or st.experiment.id != x.id or not st.experiment.running:
                    raise RolloutError("FAILED_PRECONDITION", f"experiment {x.name!r} already ended")
                e = st.experiment
                e.ended_ms, e.decision, e.winner_version, e.reason = int(time.time() * 1000), decision, \
                    winner_version, why
                st.record("experiment_end", winner_version, actor, f"{x.name}: {decision}: {why}")
                if promote:
                    st.record("promote", winner_version, actor, f"winner of experiment {x.name!r}")
                    st.stable = winner_version

            st = self._mutate(end, actor)
            if promote:
                self._set_stable(winner)
            self._end_experiment()
            return st

    # ---- this process
    def _begin_experiment(self, x: Experiment, engines: dict[str, Engine]) -> None:
        self.experiment = RunningExperiment(x, engines, self.split_salt())
        log.info("experiment %r: %s", x.name, ", ".join(f"{a.name}=engine {a.version} on {100 * a.fraction:g}%"
                                                        for a in x.arms))

    def _end_experiment(self) -> None:
        running, self.experiment = self.experiment, None
        if running is not None:
            for engine in running.engines.values():
                self._retire(engine)

    def _reconcile_experiment(self, st: RolloutState) -> None:
        """Follow rollout.json: load a running experiment's arms, drop an ended one."""
        x = st.running_experiment
        local = self.experiment.experiment.id if self.experiment else 0
        if local == (x.id if x else 0):
            return
        self._end_experiment()
        if x is None:
            return
        engines = {a.name: self._engine_for(a.version, "reconcile") for a in x.arms}
        if all(engines.values()):
            self._begin_experiment(x, engines)

    def arm_engine(self, version: int) -> Engine | None:
        """The running experiment's engine for `version`, if one of its arms serves it (a promotion made by
        another process reuses it instead of loading it again)."""
        running = self.experiment
        if running is None:
            return None
        return next((e for e in running.engines.values() if e.version == version), None)

    def experiment_status(self) -> tuple[Experiment, ExperimentDecision | None, dict[str, ArmLive]] | None:
        """The running experiment (its latest analysis and this process's live counts) or the last one ended
        (its figures recomputed over its window); None when none ever ran."""
        x, running = self.rollout.experiment, self.experiment
        if running is not None:
            return running.experiment, running.last_decision, running.live_counts()
        if x is None or x.running or self._outcome_counts is None:
            return (x, None, {}) if x is not None else None
        return x, decide(x, self._outcome_counts(x.id, x.ended_ms - int(x.settle_s * 1000))), {}

    # ---- outcome reads and the automatic decision
    def read_outcomes(self, served_from_ms: int, settle_s: float) -> dict[tuple[str, int], tuple[int, int]]:
        """Attribution counts over [served_from_ms, now - settle_s), this replica's own added to every other
        replica's when it holds the decision lease (fleet_stats.fleet_outcomes); at most one store read per
        config.outcome_interval_s for the same window start."""
        at, window_start, counts = self._outcomes_read
        now = time.monotonic()
        if window_start == served_from_ms and now - at < self.config.outcome_interval_s:
            return counts
        to_ms = int(time.time() * 1000 - settle_s * 1000)
        counts = self._outcome_counts(served_from_ms, to_ms) if self._outcome_counts else {}
        if self._outcome_counts is not None:  # every replica's impressions, when this replica decides
            counts = fleet_outcomes(self.registry, self.replica, served_from_ms, counts, self.leading)
        self._outcomes_read = (now, served_from_ms, counts)
        return counts

    def analyse_experiment(self) -> None:
        running = self.experiment
        if running is None:
            return
        x = running.experiment
        decision = running.decide(self.read_outcomes(x.id, x.settle_s))
        if not self.leading or decision.action == "wait":
            return
        version = next((a.version for a in x.arms if a.name == decision.winner), 0)
        log.info("experiment %r: %s %s", x.name, decision.action, decision.reason)
        try:
            self.stop_experiment(actor="auto", reason=decision.reason, decision=decision.action,
                                 winner_version=version, promote=x.promote_winner and bool(version), expect_id=x.id)
        except RolloutError as e:  # an operator stopped it first
            log.info("experiment %r: auto %s skipped: %s", x.name, decision.action, e)
