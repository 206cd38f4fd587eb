from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Event(_message.Message):
    __slots__ = ("event_id", "user_id", "item_id", "action", "weight", "timestamp_ms")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_MS_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    user_id: str
    item_id: str
    action: str
    weight: float
    timestamp_ms: int
    def __init__(self, event_id: _Optional[str] = ..., user_id: _Optional[str] = ..., item_id: _Optional[str] = ..., action: _Optional[str] = ..., weight: _Optional[float] = ..., timestamp_ms: _Optional[int] = ...) -> None: ...

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
    __slots__ = ("accepted", "rejected")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    rejected: _containers.RepeatedCompositeFieldContainer[EventRejection]
    def __init__(self, accepted: _Optional[int] = ..., rejected: _Optional[_Iterable[_Union[EventRejection, _Mapping]]] = ...) -> None: ...

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
    __slots__ = ("item_ids", "scores", "engine_version", "source")
    ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    ENGINE_VERSION_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    item_ids: _containers.RepeatedScalarFieldContainer[str]
    scores: _containers.RepeatedScalarFieldContainer[float]
    engine_version: int
    source: str
    def __init__(self, item_ids: _Optional[_Iterable[str]] = ..., scores: _Optional[_Iterable[float]] = ..., engine_version: _Optional[int] = ..., source: _Optional[str] = ...) -> None: ...

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
    __slots__ = ("scores", "engine_version", "unknown_candidate_ids", "source")
    SCORES_FIELD_NUMBER: _ClassVar[int]
    ENGINE_VERSION_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_CANDIDATE_IDS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    scores: _containers.RepeatedScalarFieldContainer[float]
    engine_version: int
    unknown_candidate_ids: _containers.RepeatedScalarFieldContainer[str]
    source: str
    def __init__(self, scores: _Optional[_Iterable[float]] = ..., engine_version: _Optional[int] = ..., unknown_candidate_ids: _Optional[_Iterable[str]] = ..., source: _Optional[str] = ...) -> None: ...

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
    __slots__ = ("version", "parent", "architecture_hash", "backend", "files", "item_count", "dim", "max_history", "stream_offsets", "watermark_ms", "eval_metrics", "golden", "parity_max_abs_diff", "build_seconds", "created_ms", "model_config_json", "trained_events")
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
    def __init__(self, version: _Optional[int] = ..., parent: _Optional[int] = ..., architecture_hash: _Optional[str] = ..., backend: _Optional[str] = ..., files: _Optional[_Iterable[_Union[EngineFile, _Mapping]]] = ..., item_count: _Optional[int] = ..., dim: _Optional[int] = ..., max_history: _Optional[int] = ..., stream_offsets: _Optional[_Mapping[str, int]] = ..., watermark_ms: _Optional[int] = ..., eval_metrics: _Optional[_Mapping[str, float]] = ..., golden: _Optional[_Union[GoldenSet, _Mapping]] = ..., parity_max_abs_diff: _Optional[float] = ..., build_seconds: _Optional[float] = ..., created_ms: _Optional[int] = ..., model_config_json: _Optional[str] = ..., trained_events: _Optional[int] = ...) -> None: ...

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

class GetRolloutRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetRolloutResponse(_message.Message):
    __slots__ = ("stable_version", "candidate_version", "state", "refused_versions", "refused_reasons")
    class RefusedReasonsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: str
        def __init__(self, key: _Optional[int] = ..., value: _Optional[str] = ...) -> None: ...
    STABLE_VERSION_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REFUSED_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    REFUSED_REASONS_FIELD_NUMBER: _ClassVar[int]
    stable_version: int
    candidate_version: int
    state: str
    refused_versions: _containers.RepeatedScalarFieldContainer[int]
    refused_reasons: _containers.ScalarMap[int, str]
    def __init__(self, stable_version: _Optional[int] = ..., candidate_version: _Optional[int] = ..., state: _Optional[str] = ..., refused_versions: _Optional[_Iterable[int]] = ..., refused_reasons: _Optional[_Mapping[int, str]] = ...) -> None: ...
