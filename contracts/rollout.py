"""Rollout state: which engine is stable, which is in canary, the policy that judges canaries, and
the history of every decision with its reason. Persisted as registry/rollout.json (atomic writes,
server-owned), so a server restarted mid-canary resumes the same stable and canary.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field, fields

from contracts.outcome import TESTS, OutcomeTest
from proto import livetower_v1_pb2 as pb

MODES = ("auto", "manual")
HISTORY_KEPT = 500  # newest rollout events kept in rollout.json


class RolloutError(Exception):
    """An operation that cannot be done in the current state; `code` is a gRPC status name."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(kw_only=True, frozen=True, slots=True)
class CanaryPolicy:
    mode: str = "auto"               # "auto": publishes enter a canary, decided automatically; "manual": operator
    fraction: float = 0.1            # share of users (by user-id hash) the canary serves when the policy starts it
    min_requests: int = 200          # live requests per arm before live P99 / error rate are judged
    min_duration_s: float = 5.0      # no promotion before this (an error-rate rollback may come earlier)
    max_duration_s: float = 30.0     # live sample still short by then: decide on the shadow comparison alone
    max_p99_ratio: float = 1.5       # canary P99 / stable P99 (live and paired shadow) above this: roll back (live:
                                     # once at least 3 canary requests are over this x stable's P99; canary.py)
    max_error_rate: float = 0.01     # canary errors / canary requests above this: roll back
    min_topk_overlap: float = 0.2    # mean chance-corrected top-k overlap with stable (shadow sample) below this: roll back
    max_score_drift: float = 0.8     # KS distance of canary vs stable top-k scores above this: roll back
    shadow_samples: int = 100        # paired shadow comparisons needed before a decision
    shadow_qps: float = 20.0         # shadow pairs per second (each runs both engines) until shadow_samples are in;
                                     # then 1 per second
    # What users did (contracts/outcome.py; needs impressions and a running attribution joiner, docs/experiments.md):
    outcome_test: str = "off"        # "off": hit rate not judged; "sequential" | "fixed": promote only once the
                                     # canary's hit rate is shown >= stable's - outcome_margin; roll back when shown
                                     # worse than that, or not shown by outcome_horizon
    outcome_margin: float = 0.01     # non-inferiority margin on the hit rate (absolute: 0.01 = 1 percentage point)
    outcome_alpha: float = 0.05      # P(promoting a canary whose hit rate is truly worse by >= the margin) <= this
    outcome_effect: float = 0.02     # difference the sequential test is tuned to (contracts/outcome.py OutcomeTest)
    outcome_horizon: int = 20_000    # settled impressions per arm: the fixed test looks here; sequential gives up here
    outcome_min_impressions: int = 200  # per arm before the hit-rate bounds are trusted
    outcome_settle_s: float = 10.0   # impressions younger than this are not counted yet (their events still arrive)
    # Small steps (a trainer's short rounds, trainer/short_rounds.py): a canary that runs stable's compiled graph
    # (a refit: only weights differ) and was trained on at most small_step_events events beyond stable (or, as
    # stable's child, at most that many behind it: a full round's engine after short rounds) is
    # promoted on small_step_shadow_samples paired shadow comparisons (overlap, drift, engine CPU time) and no
    # live errors, without min_duration_s or min_requests: seconds, not the ~30 s a full canary waits for live
    # traffic at 100 QPS. Errors, the shadow checks and (when on) the hit-rate test still apply.
    small_step_events: int = 2000    # -1: no small-step path (0 over the API takes this default)
    small_step_shadow_samples: int = 20  # shadow pairs a small step needs
    small_step_shadow_qps: float = 50.0  # pairs per second until a small step has them (0.4 s for 20): the same
                                         # engine calls as a full canary's first second, sooner (the step waits
                                         # for nothing else); a full canary keeps shadow_qps
    behind_hold_s: float = 2.0       # a small step *behind* stable (a full round's engine that stable's short
                                     # rounds outran) is not promoted sooner than this into its canary: the short
                                     # round built on it usually follows within a second and replaces it as the
                                     # canary (superseded), so serving does not step back to older weights and
                                     # forward again (freshness: docs/cold_start.md). -1 (or 0 in process):
                                     # promote at once (0 over the API takes this default)
    small_step_interval_s: float = 2.0  # a small step's canary starts no sooner than this after the last canary
                                     # began: at most one engine load and shadow burst per interval, whatever
                                     # the trainer publishes meanwhile (the newest waiting step is taken; steps
                                     # published in between are never loaded). Short rounds at 10 events/s
                                     # beside 200 QPS on 2 cores: live P99 13 against 26 ms with none, freshness
                                     # P50 2.5 against 1.5 s (docs/cold_start.md). -1 (or 0 in process): none
                                     # (0 over the API takes this default)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if not 0 < self.fraction < 1:
            raise ValueError(f"fraction must be in (0, 1), got {self.fraction}")
        for name in ("min_requests", "shadow_samples", "small_step_shadow_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.small_step_events < -1:
            raise ValueError(f"small_step_events must be >= 0, or -1 for no small-step path, got "
                             f"{self.small_step_events}")
        if self.min_duration_s < 0:
            raise ValueError(f"min_duration_s must be >= 0, got {self.min_duration_s}")
        if self.max_duration_s < self.min_duration_s:
            raise ValueError(f"max_duration_s must be >= min_duration_s ({self.min_duration_s}), "
                             f"got {self.max_duration_s}")
        if self.max_p99_ratio < 1:
            raise ValueError(f"max_p99_ratio must be >= 1, got {self.max_p99_ratio}")
        for name in ("max_error_rate", "min_topk_overlap", "max_score_drift"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.behind_hold_s < 0 and self.behind_hold_s != -1:
            raise ValueError(f"behind_hold_s must be >= 0, or -1 to promote at once, got {self.behind_hold_s}")
        if self.small_step_interval_s < 0 and self.small_step_interval_s != -1:
            raise ValueError(f"small_step_interval_s must be >= 0, or -1 for no interval, got "
                             f"{self.small_step_interval_s}")
        for name in ("shadow_qps", "small_step_shadow_qps"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.outcome_test not in ("off", *TESTS):
            raise ValueError(f"outcome_test must be one of off, {', '.join(TESTS)}, got {self.outcome_test!r}")
        if not 0 <= self.outcome_margin < 1:
            raise ValueError(f"outcome_margin must be in [0, 1), got {self.outcome_margin}")
        if self.outcome_settle_s < 0:
            raise ValueError(f"outcome_settle_s must be >= 0, got {self.outcome_settle_s}")
        self.outcome()  # validates the test's fields, naming them

    def outcome(self) -> OutcomeTest:
        """The hit-rate test this policy runs (whatever outcome_test says; "off" is the caller's to check)."""
        try:
            return OutcomeTest(test="fixed" if self.outcome_test == "fixed" else "sequential",
                               alpha=self.outcome_alpha, effect=self.outcome_effect, horizon=self.outcome_horizon,
                               min_impressions=self.outcome_min_impressions)
        except ValueError as e:
            raise ValueError(f"outcome_{e}") from None

    @classmethod
    def from_fields(cls, values: dict) -> "CanaryPolicy":
        """Build from a partial mapping (a proto or JSON): missing, zero or empty fields take their defaults."""
        names = {f.name for f in fields(cls)}
        unknown = set(values) - names
        if unknown:
            raise ValueError(f"unknown policy field(s): {', '.join(sorted(unknown))}")
        return cls(**{k: v for k, v in values.items() if v not in (0, 0.0, "", None)})

    @classmethod
    def from_proto(cls, msg: pb.CanaryPolicy) -> "CanaryPolicy":
        """The `livetower.v1.CanaryPolicy` message (proto3: an unset field is zero/empty and takes its default)."""
        return cls.from_fields({f.name: getattr(msg, f.name) for f in msg.DESCRIPTOR.fields})

    def to_proto(self) -> pb.CanaryPolicy:
        return pb.CanaryPolicy(**{f.name: getattr(self, f.name) for f in fields(self)})


ARM_NAME = re.compile(r"[a-z][a-z0-9_-]{0,31}")
MAX_ARMS = 8
RESERVED_ARMS = ("stable", "canary")  # the attribution store's arm labels outside experiments


@dataclass(kw_only=True, frozen=True, slots=True)
class ExperimentArm:
    name: str        # [a-z][a-z0-9_-]{0,31}, not "stable"/"canary": the arm's label on impressions and outcomes
    version: int     # published engine version it serves (not the stable one; one arm per version)
    fraction: float  # share of users (a sticky hash of the user id); the users of no arm are the control (stable)


@dataclass(kw_only=True, slots=True)
class Experiment:
    """An A/B/N test: each arm serves a sticky share of users, the rest get stable (the control); decided on
    hit rate (contracts/outcome.py experiment_decision) or stopped by an operator."""
    id: int                           # keys the user split (a new experiment reshuffles users); its start time in ms
    name: str
    arms: tuple[ExperimentArm, ...]
    control_version: int              # stable when it started (stable cannot change while it runs)
    test: OutcomeTest
    settle_s: float = 10.0            # impressions younger than this are not counted yet
    promote_winner: bool = False      # a winner becomes stable automatically (else the operator decides)
    ended_ms: int = 0                 # 0 while running
    decision: str = ""                # when ended: "winner" | "no_winner" | "stopped"
    winner_version: int = 0
    reason: str = ""

    @property
    def running(self) -> bool:
        return not self.ended_ms

    def __post_init__(self) -> None:
        if not 1 <= len(self.name) <= 64:
            raise ValueError(f"name must have 1 to 64 characters, got {len(self.name)}")
        if not 1 <= len(self.arms) <= MAX_ARMS:
            raise ValueError(f"arms: an experiment has 1 to {MAX_ARMS} arms, got {len(self.arms)}")
        names, versions = [a.name for a in self.arms], [a.version for a in self.arms]
        for a in self.arms:
            if not ARM_NAME.fullmatch(a.name) or a.name in RESERVED_ARMS:
                raise ValueError(f"arms: name {a.name!r} must match [a-z][a-z0-9_-]{{0,31}} and not be "
                                 f"{' or '.join(RESERVED_ARMS)}")
            if a.version <= 0 or a.version == self.control_version:
                raise ValueError(f"arms: {a.name}'s version must be a published version other than stable "
                                 f"({self.control_version}), got {a.version}")
            if not 0 < a.fraction < 1:
                raise ValueError(f"arms: {a.name}'s fraction must be in (0, 1), got {a.fraction}")
        if len(set(names)) < len(names) or len(set(versions)) < len(versions):
            raise ValueError("arms: names and versions must be distinct")
        total = sum(a.fraction for a in self.arms)
        if total >= 1:
            raise ValueError(f"arms: fractions sum to {total:g}; they must leave the control a share (< 1)")
        if self.settle_s < 0:
            raise ValueError(f"settle_s must be >= 0, got {self.settle_s}")

    def to_dict(self) -> dict:
        return {**{f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("arms", "test")},
                "arms": [asdict(a) for a in self.arms], "test": asdict(self.test)}

    @classmethod
    def from_dict(cls, d: dict) -> "Experiment":
        return cls(**{**d, "arms": tuple(ExperimentArm(**a) for a in d["arms"]), "test": OutcomeTest(**d["test"])})


@dataclass(kw_only=True, frozen=True, slots=True)
class RolloutEvent:
    time_ms: int
    action: str          # "serve" | "canary" | "promote" | "rollback" | "refuse" | "policy" | "experiment" |
                         # "experiment_end" | "supersede" (a canary passed over for a newer engine of its line)
    version: int
    stable_version: int  # stable when it happened
    actor: str           # "operator" | "auto" | "startup" | "reconcile"
    reason: str
    replica: str = ""    # the server process that made the change (host:pid, or its --replica-id)


@dataclass(kw_only=True, slots=True)
class RolloutState:
    stable: int = 0                                            # version serving everyone else (0: none yet)
    canary: int = 0                                            # version in canary (0: none)
    canary_fraction: float = 0.0                               # share of users the canary serves
    canary_started_ms: int = 0
    policy: CanaryPolicy | None = None                         # set by SetPolicy; None: the server's configured default
    refused: dict[int, str] = field(default_factory=dict)      # failed load/parity: never served
    rolled_back: dict[int, str] = field(default_factory=dict)  # canaries rolled back: auto never retries them
    history: list[RolloutEvent] = field(default_factory=list)  # newest last, HISTORY_KEPT at most
    canary_salt: str = ""                                      # hex secret keying the canary user split (made once by
                                                               # Registry.canary_salt; never sent over the API)
    experiment: Experiment | None = None                       # the running experiment, or the last one ended
    leader: str = ""                                           # replica holding the decision lease (server/engine/
    leader_until_ms: int = 0                                   # lease.py) and when it lapses unless renewed
    leader_address: str = ""                                   # HOST:PORT of the holder's admin listener: where
                                                               # other replicas send operators (fleet mode)

    def record(self, action: str, version: int, actor: str, reason: str, replica: str = "") -> RolloutEvent:
        ev = RolloutEvent(time_ms=int(time.time() * 1000), action=action, version=version,
                          stable_version=self.stable, actor=actor, reason=reason, replica=replica)
        self.history.append(ev)
        del self.history[:-HISTORY_KEPT]
        return ev

    def to_json(self) -> str:
        return json.dumps({
            "stable": self.stable, "canary": self.canary, "canary_fraction": self.canary_fraction,
            "canary_started_ms": self.canary_started_ms, "policy": asdict(self.policy) if self.policy else None,
            "refused": {str(k): v for k, v in self.refused.items()},
            "rolled_back": {str(k): v for k, v in self.rolled_back.items()},
            "history": [asdict(e) for e in self.history], "canary_salt": self.canary_salt,
            "experiment": self.experiment.to_dict() if self.experiment else None,
            "leader": self.leader, "leader_until_ms": self.leader_until_ms,
            "leader_address": self.leader_address}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "RolloutState":
        d = json.loads(text)
        return cls(stable=int(d.get("stable", 0)), canary=int(d.get("canary", 0)),
                   canary_fraction=float(d.get("canary_fraction", 0.0)),
                   canary_started_ms=int(d.get("canary_started_ms", 0)),
                   policy=CanaryPolicy(**d["policy"]) if d.get("policy") else None,
                   refused={int(k): v for k, v in d.get("refused", {}).items()},
                   rolled_back={int(k): v for k, v in d.get("rolled_back", {}).items()},
                   history=[RolloutEvent(**e) for e in d.get("history", [])],
                   canary_salt=str(d.get("canary_salt", "")),
                   experiment=Experiment.from_dict(d["experiment"]) if d.get("experiment") else None,
                   leader=str(d.get("leader", "")), leader_until_ms=int(d.get("leader_until_ms", 0)),
                   leader_address=str(d.get("leader_address", "")))

    @property
    def running_experiment(self) -> Experiment | None:
        return self.experiment if self.experiment is not None and self.experiment.running else None

    def end_canary(self) -> None:
        self.canary, self.canary_fraction, self.canary_started_ms = 0, 0.0, 0
