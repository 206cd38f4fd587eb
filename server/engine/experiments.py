"""A running A/B/N experiment in one server process: its arms' engines, the sticky user split, per-arm live
counters, and the hit-rate decision (contracts/outcome.py). grpc-free; the EngineManager owns one while
rollout.json names a running experiment, and every process sharing the registry routes users the same way
(same experiment id, same registry salt, same hash).
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass

from contracts.outcome import ArmCounts, ExperimentDecision, experiment_decision
from contracts.rollout import Experiment
from server.engine.engine import Engine

CONTROL = "stable"  # the control arm's label: users in no arm are served by stable, recorded as "stable"


def user_point(user_id: str, experiment_id: int, salt: bytes) -> float:
    """A user's sticky point in [0, 1) for one experiment: keyed by the experiment (a new one reshuffles users)
    and by the registry's secret salt (a caller cannot pick users to aim at one arm)."""
    h = hashlib.blake2b(f"x{experiment_id}\x00{user_id}".encode(), digest_size=8, key=salt).digest()
    return int.from_bytes(h, "big") / 2.0 ** 64


def arm_index(user_id: str, experiment: Experiment, salt: bytes) -> int:
    """Which arm serves this user (index into experiment.arms), -1 for the control. Arms take consecutive
    slices of [0, 1) in their listed order; an empty user id is always control."""
    if not user_id:
        return -1
    point, edge = user_point(user_id, experiment.id, salt), 0.0
    for i, arm in enumerate(experiment.arms):
        edge += arm.fraction
        if point < edge:
            return i
    return -1


@dataclass(slots=True)
class ArmLive:
    requests: int = 0
    errors: int = 0     # arm engine failures (each answered by stable: the client saw no error)


class RunningExperiment:
    """The engines of one experiment's arms in this process. route() and observe() run on the event loop."""

    def __init__(self, experiment: Experiment, engines: dict[str, Engine], salt: bytes) -> None:
        self.experiment = experiment
        self.engines = engines            # arm name -> its engine
        self.salt = salt
        self.live = {name: ArmLive() for name in (CONTROL, *engines)}
        self._arm_engines = [(arm.name, engines[arm.name]) for arm in experiment.arms]
        self._lock = threading.Lock()
        self.last_decision: ExperimentDecision | None = None

    def route(self, user_id: str) -> tuple[str, Engine] | None:
        """(arm name, engine) for a user in an arm; None for the control."""
        i = arm_index(user_id, self.experiment, self.salt)
        return self._arm_engines[i] if i >= 0 else None

    def observe(self, arm: str, error: bool) -> None:
        live = self.live.get(arm)
        if live is not None:
            with self._lock:
                live.requests += 1
                live.errors += error

    def live_counts(self) -> dict[str, ArmLive]:
        with self._lock:
            return {name: ArmLive(c.requests, c.errors) for name, c in self.live.items()}

    def decide(self, counts: dict[tuple[str, int], tuple[int, int]]) -> ExperimentDecision:
        self.last_decision = decide(self.experiment, counts)
        return self.last_decision


def decide(x: Experiment, counts: dict[tuple[str, int], tuple[int, int]]) -> ExperimentDecision:
    """counts: attribution.window_counts over the experiment's settled impressions."""
    control = ArmCounts(*counts.get((CONTROL, x.control_version), (0, 0)))
    arms = {a.name: ArmCounts(*counts.get((a.name, a.version), (0, 0))) for a in x.arms}
    return experiment_decision(control, arms, x.test)
