from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TokenSource(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TOKEN_SOURCE_UNSPECIFIED: _ClassVar[TokenSource]
    UPSTREAM_USAGE: _ClassVar[TokenSource]
    TOKENIZER: _ClassVar[TokenSource]
    NONE: _ClassVar[TokenSource]
    TOKENIZER_ESTIMATE: _ClassVar[TokenSource]
TOKEN_SOURCE_UNSPECIFIED: TokenSource
UPSTREAM_USAGE: TokenSource
TOKENIZER: TokenSource
NONE: TokenSource
TOKENIZER_ESTIMATE: TokenSource

class UsageEvent(_message.Message):
    __slots__ = ("event_id", "request_id", "start_time_unix_nano", "end_time_unix_nano", "labels", "endpoint", "path", "method", "request_model", "response_model", "stream", "http_status", "finish_reason", "prompt_tokens", "completion_tokens", "cached_tokens", "reasoning_tokens", "total_tokens", "token_source", "tokenizer", "time_to_first_token_ns", "duration_ns", "client_aborted", "metered", "choices", "usage_injected", "error", "error_detail", "response_events", "operation", "cache_creation_tokens", "audio_seconds", "list_cost_micros", "price_status", "price_ref", "gpu_pool", "gpu_work_milli")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    START_TIME_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    END_TIME_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    REQUEST_MODEL_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_MODEL_FIELD_NUMBER: _ClassVar[int]
    STREAM_FIELD_NUMBER: _ClassVar[int]
    HTTP_STATUS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    REASONING_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_SOURCE_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FIELD_NUMBER: _ClassVar[int]
    TIME_TO_FIRST_TOKEN_NS_FIELD_NUMBER: _ClassVar[int]
    DURATION_NS_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ABORTED_FIELD_NUMBER: _ClassVar[int]
    METERED_FIELD_NUMBER: _ClassVar[int]
    CHOICES_FIELD_NUMBER: _ClassVar[int]
    USAGE_INJECTED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ERROR_DETAIL_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_EVENTS_FIELD_NUMBER: _ClassVar[int]
    OPERATION_FIELD_NUMBER: _ClassVar[int]
    CACHE_CREATION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    AUDIO_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LIST_COST_MICROS_FIELD_NUMBER: _ClassVar[int]
    PRICE_STATUS_FIELD_NUMBER: _ClassVar[int]
    PRICE_REF_FIELD_NUMBER: _ClassVar[int]
    GPU_POOL_FIELD_NUMBER: _ClassVar[int]
    GPU_WORK_MILLI_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    request_id: str
    start_time_unix_nano: int
    end_time_unix_nano: int
    labels: _containers.ScalarMap[str, str]
    endpoint: str
    path: str
    method: str
    request_model: str
    response_model: str
    stream: bool
    http_status: int
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    reasoning_tokens: int
    total_tokens: int
    token_source: TokenSource
    tokenizer: str
    time_to_first_token_ns: int
    duration_ns: int
    client_aborted: bool
    metered: bool
    choices: int
    usage_injected: bool
    error: str
    error_detail: str
    response_events: int
    operation: str
    cache_creation_tokens: int
    audio_seconds: int
    list_cost_micros: int
    price_status: str
    price_ref: str
    gpu_pool: str
    gpu_work_milli: int
    def __init__(self, event_id: _Optional[str] = ..., request_id: _Optional[str] = ..., start_time_unix_nano: _Optional[int] = ..., end_time_unix_nano: _Optional[int] = ..., labels: _Optional[_Mapping[str, str]] = ..., endpoint: _Optional[str] = ..., path: _Optional[str] = ..., method: _Optional[str] = ..., request_model: _Optional[str] = ..., response_model: _Optional[str] = ..., stream: _Optional[bool] = ..., http_status: _Optional[int] = ..., finish_reason: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., cached_tokens: _Optional[int] = ..., reasoning_tokens: _Optional[int] = ..., total_tokens: _Optional[int] = ..., token_source: _Optional[_Union[TokenSource, str]] = ..., tokenizer: _Optional[str] = ..., time_to_first_token_ns: _Optional[int] = ..., duration_ns: _Optional[int] = ..., client_aborted: _Optional[bool] = ..., metered: _Optional[bool] = ..., choices: _Optional[int] = ..., usage_injected: _Optional[bool] = ..., error: _Optional[str] = ..., error_detail: _Optional[str] = ..., response_events: _Optional[int] = ..., operation: _Optional[str] = ..., cache_creation_tokens: _Optional[int] = ..., audio_seconds: _Optional[int] = ..., list_cost_micros: _Optional[int] = ..., price_status: _Optional[str] = ..., price_ref: _Optional[str] = ..., gpu_pool: _Optional[str] = ..., gpu_work_milli: _Optional[int] = ...) -> None: ...
