import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LedgerState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LEDGER_STATE_UNSPECIFIED: _ClassVar[LedgerState]
    LEDGER_STATE_RECORDED: _ClassVar[LedgerState]
    LEDGER_STATE_REPLAYED: _ClassVar[LedgerState]
    LEDGER_STATE_NOT_RECORDED: _ClassVar[LedgerState]
LEDGER_STATE_UNSPECIFIED: LedgerState
LEDGER_STATE_RECORDED: LedgerState
LEDGER_STATE_REPLAYED: LedgerState
LEDGER_STATE_NOT_RECORDED: LedgerState

class RemoveContributorRequest(_message.Message):
    __slots__ = ("collection", "contributor_id")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTOR_ID_FIELD_NUMBER: _ClassVar[int]
    collection: str
    contributor_id: str
    def __init__(self, collection: _Optional[str] = ..., contributor_id: _Optional[str] = ...) -> None: ...

class RemoveContributorResponse(_message.Message):
    __slots__ = ("collection", "contributor_id", "images_removed", "hashes_blocked", "removed_at", "ledger_recorded_at")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTOR_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGES_REMOVED_FIELD_NUMBER: _ClassVar[int]
    HASHES_BLOCKED_FIELD_NUMBER: _ClassVar[int]
    REMOVED_AT_FIELD_NUMBER: _ClassVar[int]
    LEDGER_RECORDED_AT_FIELD_NUMBER: _ClassVar[int]
    collection: str
    contributor_id: str
    images_removed: int
    hashes_blocked: int
    removed_at: _timestamp_pb2.Timestamp
    ledger_recorded_at: _timestamp_pb2.Timestamp
    def __init__(self, collection: _Optional[str] = ..., contributor_id: _Optional[str] = ..., images_removed: _Optional[int] = ..., hashes_blocked: _Optional[int] = ..., removed_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., ledger_recorded_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class AttributeRequest(_message.Message):
    __slots__ = ("generation_id", "image", "top_k", "tenant_id", "skip_ledger", "collection")
    GENERATION_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    SKIP_LEDGER_FIELD_NUMBER: _ClassVar[int]
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    generation_id: str
    image: bytes
    top_k: int
    tenant_id: str
    skip_ledger: bool
    collection: str
    def __init__(self, generation_id: _Optional[str] = ..., image: _Optional[bytes] = ..., top_k: _Optional[int] = ..., tenant_id: _Optional[str] = ..., skip_ledger: _Optional[bool] = ..., collection: _Optional[str] = ...) -> None: ...

class Credit(_message.Message):
    __slots__ = ("generation_id", "rank", "training_id", "contributor_id", "credit", "distance", "quality")
    GENERATION_ID_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    TRAINING_ID_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTOR_ID_FIELD_NUMBER: _ClassVar[int]
    CREDIT_FIELD_NUMBER: _ClassVar[int]
    DISTANCE_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FIELD_NUMBER: _ClassVar[int]
    generation_id: str
    rank: int
    training_id: str
    contributor_id: str
    credit: float
    distance: float
    quality: float
    def __init__(self, generation_id: _Optional[str] = ..., rank: _Optional[int] = ..., training_id: _Optional[str] = ..., contributor_id: _Optional[str] = ..., credit: _Optional[float] = ..., distance: _Optional[float] = ..., quality: _Optional[float] = ...) -> None: ...

class ContributorCredit(_message.Message):
    __slots__ = ("contributor_id", "credit")
    CONTRIBUTOR_ID_FIELD_NUMBER: _ClassVar[int]
    CREDIT_FIELD_NUMBER: _ClassVar[int]
    contributor_id: str
    credit: float
    def __init__(self, contributor_id: _Optional[str] = ..., credit: _Optional[float] = ...) -> None: ...

class AttributionResult(_message.Message):
    __slots__ = ("generation_id", "quality", "credits", "contributors", "ledger", "error")
    GENERATION_ID_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FIELD_NUMBER: _ClassVar[int]
    CREDITS_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTORS_FIELD_NUMBER: _ClassVar[int]
    LEDGER_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    generation_id: str
    quality: float
    credits: _containers.RepeatedCompositeFieldContainer[Credit]
    contributors: _containers.RepeatedCompositeFieldContainer[ContributorCredit]
    ledger: LedgerState
    error: AttributionError
    def __init__(self, generation_id: _Optional[str] = ..., quality: _Optional[float] = ..., credits: _Optional[_Iterable[_Union[Credit, _Mapping]]] = ..., contributors: _Optional[_Iterable[_Union[ContributorCredit, _Mapping]]] = ..., ledger: _Optional[_Union[LedgerState, str]] = ..., error: _Optional[_Union[AttributionError, _Mapping]] = ...) -> None: ...

class AttributionError(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class GetIndexInfoRequest(_message.Message):
    __slots__ = ("collection",)
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    collection: str
    def __init__(self, collection: _Optional[str] = ...) -> None: ...

class ListCollectionsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListCollectionsResponse(_message.Message):
    __slots__ = ("collections",)
    COLLECTIONS_FIELD_NUMBER: _ClassVar[int]
    collections: _containers.RepeatedCompositeFieldContainer[IndexInfo]
    def __init__(self, collections: _Optional[_Iterable[_Union[IndexInfo, _Mapping]]] = ...) -> None: ...

class IndexInfo(_message.Message):
    __slots__ = ("collection", "profile", "encoder", "encoder_dim", "reranker", "feature_dim", "quality", "row_count", "index_type", "index_params", "search_params")
    class IndexParamsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class SearchParamsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    ENCODER_FIELD_NUMBER: _ClassVar[int]
    ENCODER_DIM_FIELD_NUMBER: _ClassVar[int]
    RERANKER_FIELD_NUMBER: _ClassVar[int]
    FEATURE_DIM_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FIELD_NUMBER: _ClassVar[int]
    ROW_COUNT_FIELD_NUMBER: _ClassVar[int]
    INDEX_TYPE_FIELD_NUMBER: _ClassVar[int]
    INDEX_PARAMS_FIELD_NUMBER: _ClassVar[int]
    SEARCH_PARAMS_FIELD_NUMBER: _ClassVar[int]
    collection: str
    profile: str
    encoder: str
    encoder_dim: int
    reranker: str
    feature_dim: int
    quality: str
    row_count: int
    index_type: str
    index_params: _containers.ScalarMap[str, str]
    search_params: _containers.ScalarMap[str, str]
    def __init__(self, collection: _Optional[str] = ..., profile: _Optional[str] = ..., encoder: _Optional[str] = ..., encoder_dim: _Optional[int] = ..., reranker: _Optional[str] = ..., feature_dim: _Optional[int] = ..., quality: _Optional[str] = ..., row_count: _Optional[int] = ..., index_type: _Optional[str] = ..., index_params: _Optional[_Mapping[str, str]] = ..., search_params: _Optional[_Mapping[str, str]] = ...) -> None: ...

class GetValuationRequest(_message.Message):
    __slots__ = ("since", "until", "training_ids", "limit", "tenant_id", "collection")
    SINCE_FIELD_NUMBER: _ClassVar[int]
    UNTIL_FIELD_NUMBER: _ClassVar[int]
    TRAINING_IDS_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    since: _timestamp_pb2.Timestamp
    until: _timestamp_pb2.Timestamp
    training_ids: _containers.RepeatedScalarFieldContainer[str]
    limit: int
    tenant_id: str
    collection: str
    def __init__(self, since: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., until: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., training_ids: _Optional[_Iterable[str]] = ..., limit: _Optional[int] = ..., tenant_id: _Optional[str] = ..., collection: _Optional[str] = ...) -> None: ...

class TrainingImageValue(_message.Message):
    __slots__ = ("training_id", "contributor_id", "value", "generations")
    TRAINING_ID_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTOR_ID_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    GENERATIONS_FIELD_NUMBER: _ClassVar[int]
    training_id: str
    contributor_id: str
    value: float
    generations: int
    def __init__(self, training_id: _Optional[str] = ..., contributor_id: _Optional[str] = ..., value: _Optional[float] = ..., generations: _Optional[int] = ...) -> None: ...

class GetValuationResponse(_message.Message):
    __slots__ = ("values", "generations", "total_credit")
    VALUES_FIELD_NUMBER: _ClassVar[int]
    GENERATIONS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_CREDIT_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedCompositeFieldContainer[TrainingImageValue]
    generations: int
    total_credit: float
    def __init__(self, values: _Optional[_Iterable[_Union[TrainingImageValue, _Mapping]]] = ..., generations: _Optional[int] = ..., total_credit: _Optional[float] = ...) -> None: ...

class TopContributorsRequest(_message.Message):
    __slots__ = ("since", "until", "limit", "tenant_id", "collection")
    SINCE_FIELD_NUMBER: _ClassVar[int]
    UNTIL_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    since: _timestamp_pb2.Timestamp
    until: _timestamp_pb2.Timestamp
    limit: int
    tenant_id: str
    collection: str
    def __init__(self, since: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., until: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., limit: _Optional[int] = ..., tenant_id: _Optional[str] = ..., collection: _Optional[str] = ...) -> None: ...

class ContributorValue(_message.Message):
    __slots__ = ("contributor_id", "value", "generations", "training_images")
    CONTRIBUTOR_ID_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    GENERATIONS_FIELD_NUMBER: _ClassVar[int]
    TRAINING_IMAGES_FIELD_NUMBER: _ClassVar[int]
    contributor_id: str
    value: float
    generations: int
    training_images: int
    def __init__(self, contributor_id: _Optional[str] = ..., value: _Optional[float] = ..., generations: _Optional[int] = ..., training_images: _Optional[int] = ...) -> None: ...

class TopContributorsResponse(_message.Message):
    __slots__ = ("contributors", "generations", "total_credit")
    CONTRIBUTORS_FIELD_NUMBER: _ClassVar[int]
    GENERATIONS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_CREDIT_FIELD_NUMBER: _ClassVar[int]
    contributors: _containers.RepeatedCompositeFieldContainer[ContributorValue]
    generations: int
    total_credit: float
    def __init__(self, contributors: _Optional[_Iterable[_Union[ContributorValue, _Mapping]]] = ..., generations: _Optional[int] = ..., total_credit: _Optional[float] = ...) -> None: ...
