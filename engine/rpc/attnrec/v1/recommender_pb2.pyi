from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RecommendRequest(_message.Message):
    __slots__ = ("history", "k", "exclude", "n_candidates", "include_timings", "request_id", "history_timestamps", "user_id", "include_attributes", "exclude_attributes", "diversity", "popularity_calibration")
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_FIELD_NUMBER: _ClassVar[int]
    N_CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_TIMINGS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    HISTORY_TIMESTAMPS_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    DIVERSITY_FIELD_NUMBER: _ClassVar[int]
    POPULARITY_CALIBRATION_FIELD_NUMBER: _ClassVar[int]
    history: _containers.RepeatedScalarFieldContainer[str]
    k: int
    exclude: _containers.RepeatedScalarFieldContainer[str]
    n_candidates: int
    include_timings: bool
    request_id: str
    history_timestamps: _containers.RepeatedScalarFieldContainer[int]
    user_id: str
    include_attributes: _containers.RepeatedScalarFieldContainer[str]
    exclude_attributes: _containers.RepeatedScalarFieldContainer[str]
    diversity: float
    popularity_calibration: float
    def __init__(self, history: _Optional[_Iterable[str]] = ..., k: _Optional[int] = ..., exclude: _Optional[_Iterable[str]] = ..., n_candidates: _Optional[int] = ..., include_timings: bool = ..., request_id: _Optional[str] = ..., history_timestamps: _Optional[_Iterable[int]] = ..., user_id: _Optional[str] = ..., include_attributes: _Optional[_Iterable[str]] = ..., exclude_attributes: _Optional[_Iterable[str]] = ..., diversity: _Optional[float] = ..., popularity_calibration: _Optional[float] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("queue_ms", "encoder_ms", "search_ms", "ranker_ms", "total_ms", "batch_size")
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    ENCODER_MS_FIELD_NUMBER: _ClassVar[int]
    SEARCH_MS_FIELD_NUMBER: _ClassVar[int]
    RANKER_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    queue_ms: float
    encoder_ms: float
    search_ms: float
    ranker_ms: float
    total_ms: float
    batch_size: int
    def __init__(self, queue_ms: _Optional[float] = ..., encoder_ms: _Optional[float] = ..., search_ms: _Optional[float] = ..., ranker_ms: _Optional[float] = ..., total_ms: _Optional[float] = ..., batch_size: _Optional[int] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class RecommendReply(_message.Message):
    __slots__ = ("items", "scores", "model", "model_version", "unknown_items", "popularity_fallback", "truncated_items", "timings", "request_id", "error", "stored_events")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_ITEMS_FIELD_NUMBER: _ClassVar[int]
    POPULARITY_FALLBACK_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_ITEMS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    STORED_EVENTS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedScalarFieldContainer[str]
    scores: _containers.RepeatedScalarFieldContainer[float]
    model: str
    model_version: int
    unknown_items: int
    popularity_fallback: bool
    truncated_items: int
    timings: Timings
    request_id: str
    error: Error
    stored_events: int
    def __init__(self, items: _Optional[_Iterable[str]] = ..., scores: _Optional[_Iterable[float]] = ..., model: _Optional[str] = ..., model_version: _Optional[int] = ..., unknown_items: _Optional[int] = ..., popularity_fallback: bool = ..., truncated_items: _Optional[int] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., request_id: _Optional[str] = ..., error: _Optional[_Union[Error, _Mapping]] = ..., stored_events: _Optional[int] = ...) -> None: ...

class ModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReloadModelRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("model", "version", "n_items", "max_history", "dim", "has_ranker", "default_n_candidates", "item_id_type", "index_factory", "providers", "created_at", "metrics_json", "refused_versions")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    N_ITEMS_FIELD_NUMBER: _ClassVar[int]
    MAX_HISTORY_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    HAS_RANKER_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_N_CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    ITEM_ID_TYPE_FIELD_NUMBER: _ClassVar[int]
    INDEX_FACTORY_FIELD_NUMBER: _ClassVar[int]
    PROVIDERS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    METRICS_JSON_FIELD_NUMBER: _ClassVar[int]
    REFUSED_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    n_items: int
    max_history: int
    dim: int
    has_ranker: bool
    default_n_candidates: int
    item_id_type: str
    index_factory: str
    providers: _containers.RepeatedScalarFieldContainer[str]
    created_at: str
    metrics_json: str
    refused_versions: _containers.RepeatedCompositeFieldContainer[RefusedVersion]
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., n_items: _Optional[int] = ..., max_history: _Optional[int] = ..., dim: _Optional[int] = ..., has_ranker: bool = ..., default_n_candidates: _Optional[int] = ..., item_id_type: _Optional[str] = ..., index_factory: _Optional[str] = ..., providers: _Optional[_Iterable[str]] = ..., created_at: _Optional[str] = ..., metrics_json: _Optional[str] = ..., refused_versions: _Optional[_Iterable[_Union[RefusedVersion, _Mapping]]] = ...) -> None: ...

class RefusedVersion(_message.Message):
    __slots__ = ("version", "reason")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    version: int
    reason: str
    def __init__(self, version: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class RecordEventsRequest(_message.Message):
    __slots__ = ("user_id", "items", "timestamps")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMPS_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    items: _containers.RepeatedScalarFieldContainer[str]
    timestamps: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, user_id: _Optional[str] = ..., items: _Optional[_Iterable[str]] = ..., timestamps: _Optional[_Iterable[int]] = ...) -> None: ...

class RecordEventsReply(_message.Message):
    __slots__ = ("stored_events",)
    STORED_EVENTS_FIELD_NUMBER: _ClassVar[int]
    stored_events: int
    def __init__(self, stored_events: _Optional[int] = ...) -> None: ...

class RecordEventsStreamReply(_message.Message):
    __slots__ = ("requests", "events")
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    requests: int
    events: int
    def __init__(self, requests: _Optional[int] = ..., events: _Optional[int] = ...) -> None: ...

class SetItemAvailabilityRequest(_message.Message):
    __slots__ = ("items", "available")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedScalarFieldContainer[str]
    available: bool
    def __init__(self, items: _Optional[_Iterable[str]] = ..., available: bool = ...) -> None: ...

class SetItemAvailabilityReply(_message.Message):
    __slots__ = ("changed", "unavailable_items", "unknown_items")
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    UNAVAILABLE_ITEMS_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_ITEMS_FIELD_NUMBER: _ClassVar[int]
    changed: int
    unavailable_items: int
    unknown_items: int
    def __init__(self, changed: _Optional[int] = ..., unavailable_items: _Optional[int] = ..., unknown_items: _Optional[int] = ...) -> None: ...
