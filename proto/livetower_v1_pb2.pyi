from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Event(_message.Message):
    __slots__ = ("event_id", "user_id", "item_id", "action", "weight", "timestamp_ms", "impression_id")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_MS_FIELD_NUMBER: _ClassVar[int]
    IMPRESSION_ID_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    user_id: str
    item_id: str
    action: str
    weight: float
    timestamp_ms: int
    impression_id: str
    def __init__(self, event_id: _Optional[str] = ..., user_id: _Optional[str] = ..., item_id: _Optional[str] = ..., action: _Optional[str] = ..., weight: _Optional[float] = ..., timestamp_ms: _Optional[int] = ..., impression_id: _Optional[str] = ...) -> None: ...

class LogEventsRequest(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[Event]
    def __init__(self, events: _Optional[_Iterable[_Union[Event, _Mapping]]] = ...) -> None: ...

class EventRejection(_message.Message):
    __slots__ = ("index", "event_id", "reason")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    index: int
    event_id: str
    reason: str
    def __init__(self, index: _Optional[int] = ..., event_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class LogEventsResponse(_message.Message):
    __slots__ = ("accepted", "rejected", "duplicates", "dead_letters_dropped")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    DEAD_LETTERS_DROPPED_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    rejected: _containers.RepeatedCompositeFieldContainer[EventRejection]
    duplicates: int
    dead_letters_dropped: int
    def __init__(self, accepted: _Optional[int] = ..., rejected: _Optional[_Iterable[_Union[EventRejection, _Mapping]]] = ..., duplicates: _Optional[int] = ..., dead_letters_dropped: _Optional[int] = ...) -> None: ...

class RecommendRequest(_message.Message):
    __slots__ = ("user_id", "history", "k", "exclude_seen")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_SEEN_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    history: _containers.RepeatedScalarFieldContainer[str]
    k: int
    exclude_seen: bool
    def __init__(self, user_id: _Optional[str] = ..., history: _Optional[_Iterable[str]] = ..., k: _Optional[int] = ..., exclude_seen: _Optional[bool] = ...) -> None: ...

class RecommendResponse(_message.Message):
    __slots__ = ("item_ids", "scores", "engine_version", "source", "canary", "impression_id", "arm")
    ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    ENGINE_VERSION_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    CANARY_FIELD_NUMBER: _ClassVar[int]
    IMPRESSION_ID_FIELD_NUMBER: _ClassVar[int]
    ARM_FIELD_NUMBER: _ClassVar[int]
    item_ids: _containers.RepeatedScalarFieldContainer[str]
    scores: _containers.RepeatedScalarFieldContainer[float]
    engine_version: int
    source: str
    canary: bool
    impression_id: str
    arm: str
    def __init__(self, item_ids: _Optional[_Iterable[str]] = ..., scores: _Optional[_Iterable[float]] = ..., engine_version: _Optional[int] = ..., source: _Optional[str] = ..., canary: _Optional[bool] = ..., impression_id: _Optional[str] = ..., arm: _Optional[str] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("user_id", "history", "candidate_ids")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_IDS_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    history: _containers.RepeatedScalarFieldContainer[str]
    candidate_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, user_id: _Optional[str] = ..., history: _Optional[_Iterable[str]] = ..., candidate_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("scores", "engine_version", "unknown_candidate_ids", "source", "canary", "arm")
    SCORES_FIELD_NUMBER: _ClassVar[int]
    ENGINE_VERSION_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_CANDIDATE_IDS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    CANARY_FIELD_NUMBER: _ClassVar[int]
    ARM_FIELD_NUMBER: _ClassVar[int]
    scores: _containers.RepeatedScalarFieldContainer[float]
    engine_version: int
    unknown_candidate_ids: _containers.RepeatedScalarFieldContainer[str]
    source: str
    canary: bool
    arm: str
    def __init__(self, scores: _Optional[_Iterable[float]] = ..., engine_version: _Optional[int] = ..., unknown_candidate_ids: _Optional[_Iterable[str]] = ..., source: _Optional[str] = ..., canary: _Optional[bool] = ..., arm: _Optional[str] = ...) -> None: ...

class EngineFile(_message.Message):
    __slots__ = ("path", "sha256", "size")
    PATH_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    path: str
    sha256: str
    size: int
    def __init__(self, path: _Optional[str] = ..., sha256: _Optional[str] = ..., size: _Optional[int] = ...) -> None: ...

class GoldenSet(_message.Message):
    __slots__ = ("batch", "seq_len", "dim", "history_rows", "user_embeddings")
    BATCH_FIELD_NUMBER: _ClassVar[int]
    SEQ_LEN_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    HISTORY_ROWS_FIELD_NUMBER: _ClassVar[int]
    USER_EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    batch: int
    seq_len: int
    dim: int
    history_rows: _containers.RepeatedScalarFieldContainer[int]
    user_embeddings: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, batch: _Optional[int] = ..., seq_len: _Optional[int] = ..., dim: _Optional[int] = ..., history_rows: _Optional[_Iterable[int]] = ..., user_embeddings: _Optional[_Iterable[float]] = ...) -> None: ...

class EngineManifest(_message.Message):
    __slots__ = ("version", "parent", "architecture_hash", "backend", "files", "item_count", "dim", "max_history", "stream_offsets", "watermark_ms", "eval_metrics", "golden", "parity_max_abs_diff", "build_seconds", "created_ms", "model_config_json", "trained_events", "graph_version", "retrieval_json", "user_vectors_version")
    class StreamOffsetsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class EvalMetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PARENT_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_HASH_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    ITEM_COUNT_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    MAX_HISTORY_FIELD_NUMBER: _ClassVar[int]
    STREAM_OFFSETS_FIELD_NUMBER: _ClassVar[int]
    WATERMARK_MS_FIELD_NUMBER: _ClassVar[int]
    EVAL_METRICS_FIELD_NUMBER: _ClassVar[int]
    GOLDEN_FIELD_NUMBER: _ClassVar[int]
    PARITY_MAX_ABS_DIFF_FIELD_NUMBER: _ClassVar[int]
    BUILD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CREATED_MS_FIELD_NUMBER: _ClassVar[int]
    MODEL_CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    TRAINED_EVENTS_FIELD_NUMBER: _ClassVar[int]
    GRAPH_VERSION_FIELD_NUMBER: _ClassVar[int]
    RETRIEVAL_JSON_FIELD_NUMBER: _ClassVar[int]
    USER_VECTORS_VERSION_FIELD_NUMBER: _ClassVar[int]
    version: int
    parent: int
    architecture_hash: str
    backend: str
    files: _containers.RepeatedCompositeFieldContainer[EngineFile]
    item_count: int
    dim: int
    max_history: int
    stream_offsets: _containers.ScalarMap[str, int]
    watermark_ms: int
    eval_metrics: _containers.ScalarMap[str, float]
    golden: GoldenSet
    parity_max_abs_diff: float
    build_seconds: float
    created_ms: int
    model_config_json: str
    trained_events: int
    graph_version: int
    retrieval_json: str
    user_vectors_version: int
    def __init__(self, version: _Optional[int] = ..., parent: _Optional[int] = ..., architecture_hash: _Optional[str] = ..., backend: _Optional[str] = ..., files: _Optional[_Iterable[_Union[EngineFile, _Mapping]]] = ..., item_count: _Optional[int] = ..., dim: _Optional[int] = ..., max_history: _Optional[int] = ..., stream_offsets: _Optional[_Mapping[str, int]] = ..., watermark_ms: _Optional[int] = ..., eval_metrics: _Optional[_Mapping[str, float]] = ..., golden: _Optional[_Union[GoldenSet, _Mapping]] = ..., parity_max_abs_diff: _Optional[float] = ..., build_seconds: _Optional[float] = ..., created_ms: _Optional[int] = ..., model_config_json: _Optional[str] = ..., trained_events: _Optional[int] = ..., graph_version: _Optional[int] = ..., retrieval_json: _Optional[str] = ..., user_vectors_version: _Optional[int] = ...) -> None: ...

class ListEnginesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListEnginesResponse(_message.Message):
    __slots__ = ("engines", "serving_version")
    ENGINES_FIELD_NUMBER: _ClassVar[int]
    SERVING_VERSION_FIELD_NUMBER: _ClassVar[int]
    engines: _containers.RepeatedCompositeFieldContainer[EngineManifest]
    serving_version: int
    def __init__(self, engines: _Optional[_Iterable[_Union[EngineManifest, _Mapping]]] = ..., serving_version: _Optional[int] = ...) -> None: ...

class CanaryPolicy(_message.Message):
    __slots__ = ("mode", "fraction", "min_requests", "min_duration_s", "max_duration_s", "max_p99_ratio", "max_error_rate", "min_topk_overlap", "max_score_drift", "shadow_samples", "shadow_qps", "outcome_test", "outcome_margin", "outcome_alpha", "outcome_effect", "outcome_horizon", "outcome_min_impressions", "outcome_settle_s", "small_step_events", "small_step_shadow_samples", "small_step_shadow_qps", "behind_hold_s", "small_step_interval_s")
    MODE_FIELD_NUMBER: _ClassVar[int]
    FRACTION_FIELD_NUMBER: _ClassVar[int]
    MIN_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    MIN_DURATION_S_FIELD_NUMBER: _ClassVar[int]
    MAX_DURATION_S_FIELD_NUMBER: _ClassVar[int]
    MAX_P99_RATIO_FIELD_NUMBER: _ClassVar[int]
    MAX_ERROR_RATE_FIELD_NUMBER: _ClassVar[int]
    MIN_TOPK_OVERLAP_FIELD_NUMBER: _ClassVar[int]
    MAX_SCORE_DRIFT_FIELD_NUMBER: _ClassVar[int]
    SHADOW_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    SHADOW_QPS_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_TEST_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_MARGIN_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_ALPHA_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_EFFECT_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_HORIZON_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_MIN_IMPRESSIONS_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_SETTLE_S_FIELD_NUMBER: _ClassVar[int]
    SMALL_STEP_EVENTS_FIELD_NUMBER: _ClassVar[int]
    SMALL_STEP_SHADOW_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    SMALL_STEP_SHADOW_QPS_FIELD_NUMBER: _ClassVar[int]
    BEHIND_HOLD_S_FIELD_NUMBER: _ClassVar[int]
    SMALL_STEP_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    mode: str
    fraction: float
    min_requests: int
    min_duration_s: float
    max_duration_s: float
    max_p99_ratio: float
    max_error_rate: float
    min_topk_overlap: float
    max_score_drift: float
    shadow_samples: int
    shadow_qps: float
    outcome_test: str
    outcome_margin: float
    outcome_alpha: float
    outcome_effect: float
    outcome_horizon: int
    outcome_min_impressions: int
    outcome_settle_s: float
    small_step_events: int
    small_step_shadow_samples: int
    small_step_shadow_qps: float
    behind_hold_s: float
    small_step_interval_s: float
    def __init__(self, mode: _Optional[str] = ..., fraction: _Optional[float] = ..., min_requests: _Optional[int] = ..., min_duration_s: _Optional[float] = ..., max_duration_s: _Optional[float] = ..., max_p99_ratio: _Optional[float] = ..., max_error_rate: _Optional[float] = ..., min_topk_overlap: _Optional[float] = ..., max_score_drift: _Optional[float] = ..., shadow_samples: _Optional[int] = ..., shadow_qps: _Optional[float] = ..., outcome_test: _Optional[str] = ..., outcome_margin: _Optional[float] = ..., outcome_alpha: _Optional[float] = ..., outcome_effect: _Optional[float] = ..., outcome_horizon: _Optional[int] = ..., outcome_min_impressions: _Optional[int] = ..., outcome_settle_s: _Optional[float] = ..., small_step_events: _Optional[int] = ..., small_step_shadow_samples: _Optional[int] = ..., small_step_shadow_qps: _Optional[float] = ..., behind_hold_s: _Optional[float] = ..., small_step_interval_s: _Optional[float] = ...) -> None: ...

class CanaryAnalysis(_message.Message):
    __slots__ = ("elapsed_s", "canary_requests", "stable_requests", "canary_errors", "stable_errors", "canary_p99_ms", "stable_p99_ms", "p99_ratio", "shadow_samples", "topk_overlap", "score_drift", "shadow_latency_ratio", "verdict", "reason", "canary_impressions", "stable_impressions", "canary_hit_rate", "stable_hit_rate", "hit_rate_diff", "hit_rate_lo", "hit_rate_hi", "canary_tail_floor_ms")
    ELAPSED_S_FIELD_NUMBER: _ClassVar[int]
    CANARY_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    STABLE_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    CANARY_ERRORS_FIELD_NUMBER: _ClassVar[int]
    STABLE_ERRORS_FIELD_NUMBER: _ClassVar[int]
    CANARY_P99_MS_FIELD_NUMBER: _ClassVar[int]
    STABLE_P99_MS_FIELD_NUMBER: _ClassVar[int]
    P99_RATIO_FIELD_NUMBER: _ClassVar[int]
    SHADOW_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    TOPK_OVERLAP_FIELD_NUMBER: _ClassVar[int]
    SCORE_DRIFT_FIELD_NUMBER: _ClassVar[int]
    SHADOW_LATENCY_RATIO_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    CANARY_IMPRESSIONS_FIELD_NUMBER: _ClassVar[int]
    STABLE_IMPRESSIONS_FIELD_NUMBER: _ClassVar[int]
    CANARY_HIT_RATE_FIELD_NUMBER: _ClassVar[int]
    STABLE_HIT_RATE_FIELD_NUMBER: _ClassVar[int]
    HIT_RATE_DIFF_FIELD_NUMBER: _ClassVar[int]
    HIT_RATE_LO_FIELD_NUMBER: _ClassVar[int]
    HIT_RATE_HI_FIELD_NUMBER: _ClassVar[int]
    CANARY_TAIL_FLOOR_MS_FIELD_NUMBER: _ClassVar[int]
    elapsed_s: float
    canary_requests: int
    stable_requests: int
    canary_errors: int
    stable_errors: int
    canary_p99_ms: float
    stable_p99_ms: float
    p99_ratio: float
    shadow_samples: int
    topk_overlap: float
    score_drift: float
    shadow_latency_ratio: float
    verdict: str
    reason: str
    canary_impressions: int
    stable_impressions: int
    canary_hit_rate: float
    stable_hit_rate: float
    hit_rate_diff: float
    hit_rate_lo: float
    hit_rate_hi: float
    canary_tail_floor_ms: float
    def __init__(self, elapsed_s: _Optional[float] = ..., canary_requests: _Optional[int] = ..., stable_requests: _Optional[int] = ..., canary_errors: _Optional[int] = ..., stable_errors: _Optional[int] = ..., canary_p99_ms: _Optional[float] = ..., stable_p99_ms: _Optional[float] = ..., p99_ratio: _Optional[float] = ..., shadow_samples: _Optional[int] = ..., topk_overlap: _Optional[float] = ..., score_drift: _Optional[float] = ..., shadow_latency_ratio: _Optional[float] = ..., verdict: _Optional[str] = ..., reason: _Optional[str] = ..., canary_impressions: _Optional[int] = ..., stable_impressions: _Optional[int] = ..., canary_hit_rate: _Optional[float] = ..., stable_hit_rate: _Optional[float] = ..., hit_rate_diff: _Optional[float] = ..., hit_rate_lo: _Optional[float] = ..., hit_rate_hi: _Optional[float] = ..., canary_tail_floor_ms: _Optional[float] = ...) -> None: ...

class RolloutEvent(_message.Message):
    __slots__ = ("time_ms", "action", "version", "stable_version", "actor", "reason", "replica")
    TIME_MS_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STABLE_VERSION_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    time_ms: int
    action: str
    version: int
    stable_version: int
    actor: str
    reason: str
    replica: str
    def __init__(self, time_ms: _Optional[int] = ..., action: _Optional[str] = ..., version: _Optional[int] = ..., stable_version: _Optional[int] = ..., actor: _Optional[str] = ..., reason: _Optional[str] = ..., replica: _Optional[str] = ...) -> None: ...

class GetRolloutRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetRolloutResponse(_message.Message):
    __slots__ = ("stable_version", "canary_version", "state", "refused_versions", "refused_reasons", "canary_fraction", "policy", "analysis", "history", "rolled_back", "pending_versions", "canary_started_ms", "experiment", "leader", "leader_until_ms", "replica", "leader_address")
    class RefusedReasonsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: str
        def __init__(self, key: _Optional[int] = ..., value: _Optional[str] = ...) -> None: ...
    class RolledBackEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: str
        def __init__(self, key: _Optional[int] = ..., value: _Optional[str] = ...) -> None: ...
    STABLE_VERSION_FIELD_NUMBER: _ClassVar[int]
    CANARY_VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REFUSED_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    REFUSED_REASONS_FIELD_NUMBER: _ClassVar[int]
    CANARY_FRACTION_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    ANALYSIS_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    ROLLED_BACK_FIELD_NUMBER: _ClassVar[int]
    PENDING_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    CANARY_STARTED_MS_FIELD_NUMBER: _ClassVar[int]
    EXPERIMENT_FIELD_NUMBER: _ClassVar[int]
    LEADER_FIELD_NUMBER: _ClassVar[int]
    LEADER_UNTIL_MS_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    LEADER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    stable_version: int
    canary_version: int
    state: str
    refused_versions: _containers.RepeatedScalarFieldContainer[int]
    refused_reasons: _containers.ScalarMap[int, str]
    canary_fraction: float
    policy: CanaryPolicy
    analysis: CanaryAnalysis
    history: _containers.RepeatedCompositeFieldContainer[RolloutEvent]
    rolled_back: _containers.ScalarMap[int, str]
    pending_versions: _containers.RepeatedScalarFieldContainer[int]
    canary_started_ms: int
    experiment: Experiment
    leader: str
    leader_until_ms: int
    replica: str
    leader_address: str
    def __init__(self, stable_version: _Optional[int] = ..., canary_version: _Optional[int] = ..., state: _Optional[str] = ..., refused_versions: _Optional[_Iterable[int]] = ..., refused_reasons: _Optional[_Mapping[int, str]] = ..., canary_fraction: _Optional[float] = ..., policy: _Optional[_Union[CanaryPolicy, _Mapping]] = ..., analysis: _Optional[_Union[CanaryAnalysis, _Mapping]] = ..., history: _Optional[_Iterable[_Union[RolloutEvent, _Mapping]]] = ..., rolled_back: _Optional[_Mapping[int, str]] = ..., pending_versions: _Optional[_Iterable[int]] = ..., canary_started_ms: _Optional[int] = ..., experiment: _Optional[_Union[Experiment, _Mapping]] = ..., leader: _Optional[str] = ..., leader_until_ms: _Optional[int] = ..., replica: _Optional[str] = ..., leader_address: _Optional[str] = ...) -> None: ...

class StartCanaryRequest(_message.Message):
    __slots__ = ("version", "fraction")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    FRACTION_FIELD_NUMBER: _ClassVar[int]
    version: int
    fraction: float
    def __init__(self, version: _Optional[int] = ..., fraction: _Optional[float] = ...) -> None: ...

class PromoteRequest(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class RollbackRequest(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class SetPolicyRequest(_message.Message):
    __slots__ = ("policy",)
    POLICY_FIELD_NUMBER: _ClassVar[int]
    policy: CanaryPolicy
    def __init__(self, policy: _Optional[_Union[CanaryPolicy, _Mapping]] = ...) -> None: ...

class ExperimentArm(_message.Message):
    __slots__ = ("name", "version", "fraction")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    FRACTION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    fraction: float
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., fraction: _Optional[float] = ...) -> None: ...

class ExperimentArmStatus(_message.Message):
    __slots__ = ("name", "version", "fraction", "requests", "errors", "impressions", "hit_impressions", "hit_rate", "diff", "diff_lo", "diff_hi", "state")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    FRACTION_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    IMPRESSIONS_FIELD_NUMBER: _ClassVar[int]
    HIT_IMPRESSIONS_FIELD_NUMBER: _ClassVar[int]
    HIT_RATE_FIELD_NUMBER: _ClassVar[int]
    DIFF_FIELD_NUMBER: _ClassVar[int]
    DIFF_LO_FIELD_NUMBER: _ClassVar[int]
    DIFF_HI_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    fraction: float
    requests: int
    errors: int
    impressions: int
    hit_impressions: int
    hit_rate: float
    diff: float
    diff_lo: float
    diff_hi: float
    state: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., fraction: _Optional[float] = ..., requests: _Optional[int] = ..., errors: _Optional[int] = ..., impressions: _Optional[int] = ..., hit_impressions: _Optional[int] = ..., hit_rate: _Optional[float] = ..., diff: _Optional[float] = ..., diff_lo: _Optional[float] = ..., diff_hi: _Optional[float] = ..., state: _Optional[str] = ...) -> None: ...

class Experiment(_message.Message):
    __slots__ = ("name", "id", "control_version", "arms", "test", "alpha", "effect", "horizon", "min_impressions", "settle_s", "promote_winner", "running", "ended_ms", "decision", "winner_version", "reason")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    CONTROL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ARMS_FIELD_NUMBER: _ClassVar[int]
    TEST_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    EFFECT_FIELD_NUMBER: _ClassVar[int]
    HORIZON_FIELD_NUMBER: _ClassVar[int]
    MIN_IMPRESSIONS_FIELD_NUMBER: _ClassVar[int]
    SETTLE_S_FIELD_NUMBER: _ClassVar[int]
    PROMOTE_WINNER_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    ENDED_MS_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    WINNER_VERSION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    name: str
    id: int
    control_version: int
    arms: _containers.RepeatedCompositeFieldContainer[ExperimentArmStatus]
    test: str
    alpha: float
    effect: float
    horizon: int
    min_impressions: int
    settle_s: float
    promote_winner: bool
    running: bool
    ended_ms: int
    decision: str
    winner_version: int
    reason: str
    def __init__(self, name: _Optional[str] = ..., id: _Optional[int] = ..., control_version: _Optional[int] = ..., arms: _Optional[_Iterable[_Union[ExperimentArmStatus, _Mapping]]] = ..., test: _Optional[str] = ..., alpha: _Optional[float] = ..., effect: _Optional[float] = ..., horizon: _Optional[int] = ..., min_impressions: _Optional[int] = ..., settle_s: _Optional[float] = ..., promote_winner: _Optional[bool] = ..., running: _Optional[bool] = ..., ended_ms: _Optional[int] = ..., decision: _Optional[str] = ..., winner_version: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class StartExperimentRequest(_message.Message):
    __slots__ = ("name", "arms", "test", "alpha", "effect", "horizon", "min_impressions", "settle_s", "promote_winner")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ARMS_FIELD_NUMBER: _ClassVar[int]
    TEST_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    EFFECT_FIELD_NUMBER: _ClassVar[int]
    HORIZON_FIELD_NUMBER: _ClassVar[int]
    MIN_IMPRESSIONS_FIELD_NUMBER: _ClassVar[int]
    SETTLE_S_FIELD_NUMBER: _ClassVar[int]
    PROMOTE_WINNER_FIELD_NUMBER: _ClassVar[int]
    name: str
    arms: _containers.RepeatedCompositeFieldContainer[ExperimentArm]
    test: str
    alpha: float
    effect: float
    horizon: int
    min_impressions: int
    settle_s: float
    promote_winner: bool
    def __init__(self, name: _Optional[str] = ..., arms: _Optional[_Iterable[_Union[ExperimentArm, _Mapping]]] = ..., test: _Optional[str] = ..., alpha: _Optional[float] = ..., effect: _Optional[float] = ..., horizon: _Optional[int] = ..., min_impressions: _Optional[int] = ..., settle_s: _Optional[float] = ..., promote_winner: _Optional[bool] = ...) -> None: ...

class GetExperimentRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StopExperimentRequest(_message.Message):
    __slots__ = ("reason", "promote_version")
    REASON_FIELD_NUMBER: _ClassVar[int]
    PROMOTE_VERSION_FIELD_NUMBER: _ClassVar[int]
    reason: str
    promote_version: int
    def __init__(self, reason: _Optional[str] = ..., promote_version: _Optional[int] = ...) -> None: ...

class CatalogValues(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, values: _Optional[_Iterable[str]] = ...) -> None: ...

class CatalogItem(_message.Message):
    __slots__ = ("id", "categorical", "numeric", "text")
    class CategoricalEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: CatalogValues
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[CatalogValues, _Mapping]] = ...) -> None: ...
    class NumericEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class TextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    CATEGORICAL_FIELD_NUMBER: _ClassVar[int]
    NUMERIC_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    id: str
    categorical: _containers.MessageMap[str, CatalogValues]
    numeric: _containers.ScalarMap[str, float]
    text: _containers.ScalarMap[str, str]
    def __init__(self, id: _Optional[str] = ..., categorical: _Optional[_Mapping[str, CatalogValues]] = ..., numeric: _Optional[_Mapping[str, float]] = ..., text: _Optional[_Mapping[str, str]] = ...) -> None: ...

class UpsertItemsRequest(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[CatalogItem]
    def __init__(self, items: _Optional[_Iterable[_Union[CatalogItem, _Mapping]]] = ...) -> None: ...

class DeleteItemsRequest(_message.Message):
    __slots__ = ("item_ids",)
    ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    item_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, item_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class UpsertUsersRequest(_message.Message):
    __slots__ = ("users",)
    USERS_FIELD_NUMBER: _ClassVar[int]
    users: _containers.RepeatedCompositeFieldContainer[CatalogItem]
    def __init__(self, users: _Optional[_Iterable[_Union[CatalogItem, _Mapping]]] = ...) -> None: ...

class DeleteUsersRequest(_message.Message):
    __slots__ = ("user_ids",)
    USER_IDS_FIELD_NUMBER: _ClassVar[int]
    user_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, user_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class CatalogChangeResponse(_message.Message):
    __slots__ = ("inserted", "updated", "unchanged", "deleted", "catalog_version", "serving_engines", "note")
    INSERTED_FIELD_NUMBER: _ClassVar[int]
    UPDATED_FIELD_NUMBER: _ClassVar[int]
    UNCHANGED_FIELD_NUMBER: _ClassVar[int]
    DELETED_FIELD_NUMBER: _ClassVar[int]
    CATALOG_VERSION_FIELD_NUMBER: _ClassVar[int]
    SERVING_ENGINES_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    inserted: int
    updated: int
    unchanged: int
    deleted: int
    catalog_version: int
    serving_engines: _containers.RepeatedScalarFieldContainer[int]
    note: str
    def __init__(self, inserted: _Optional[int] = ..., updated: _Optional[int] = ..., unchanged: _Optional[int] = ..., deleted: _Optional[int] = ..., catalog_version: _Optional[int] = ..., serving_engines: _Optional[_Iterable[int]] = ..., note: _Optional[str] = ...) -> None: ...
