import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Header(_message.Message):
    __slots__ = ("name", "value")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    name: str
    value: str
    def __init__(self, name: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...

class FetchRequest(_message.Message):
    __slots__ = ("id", "url", "method", "headers", "body", "timeout", "follow_redirects", "max_body_bytes", "session_key", "tls_insecure_skip_verify", "keep_cookies", "include_text", "max_message_bytes")
    ID_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    FOLLOW_REDIRECTS_FIELD_NUMBER: _ClassVar[int]
    MAX_BODY_BYTES_FIELD_NUMBER: _ClassVar[int]
    SESSION_KEY_FIELD_NUMBER: _ClassVar[int]
    TLS_INSECURE_SKIP_VERIFY_FIELD_NUMBER: _ClassVar[int]
    KEEP_COOKIES_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_TEXT_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    id: str
    url: str
    method: str
    headers: _containers.RepeatedCompositeFieldContainer[Header]
    body: bytes
    timeout: _duration_pb2.Duration
    follow_redirects: bool
    max_body_bytes: int
    session_key: str
    tls_insecure_skip_verify: bool
    keep_cookies: bool
    include_text: bool
    max_message_bytes: int
    def __init__(self, id: _Optional[str] = ..., url: _Optional[str] = ..., method: _Optional[str] = ..., headers: _Optional[_Iterable[_Union[Header, _Mapping]]] = ..., body: _Optional[bytes] = ..., timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., follow_redirects: _Optional[bool] = ..., max_body_bytes: _Optional[int] = ..., session_key: _Optional[str] = ..., tls_insecure_skip_verify: _Optional[bool] = ..., keep_cookies: _Optional[bool] = ..., include_text: _Optional[bool] = ..., max_message_bytes: _Optional[int] = ...) -> None: ...

class FetchManyRequest(_message.Message):
    __slots__ = ("requests", "concurrency", "max_message_bytes")
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    CONCURRENCY_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[FetchRequest]
    concurrency: int
    max_message_bytes: int
    def __init__(self, requests: _Optional[_Iterable[_Union[FetchRequest, _Mapping]]] = ..., concurrency: _Optional[int] = ..., max_message_bytes: _Optional[int] = ...) -> None: ...

class Redirect(_message.Message):
    __slots__ = ("url", "status_code")
    URL_FIELD_NUMBER: _ClassVar[int]
    STATUS_CODE_FIELD_NUMBER: _ClassVar[int]
    url: str
    status_code: int
    def __init__(self, url: _Optional[str] = ..., status_code: _Optional[int] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("pool_wait_seconds", "connect_seconds", "proxy_connect_seconds", "tls_seconds", "ttfb_seconds", "total_seconds")
    POOL_WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CONNECT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PROXY_CONNECT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TLS_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TTFB_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    pool_wait_seconds: float
    connect_seconds: float
    proxy_connect_seconds: float
    tls_seconds: float
    ttfb_seconds: float
    total_seconds: float
    def __init__(self, pool_wait_seconds: _Optional[float] = ..., connect_seconds: _Optional[float] = ..., proxy_connect_seconds: _Optional[float] = ..., tls_seconds: _Optional[float] = ..., ttfb_seconds: _Optional[float] = ..., total_seconds: _Optional[float] = ...) -> None: ...

class FetchError(_message.Message):
    __slots__ = ("kind", "message")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[FetchError.Kind]
        INVALID_URL: _ClassVar[FetchError.Kind]
        INVALID_ARGUMENT: _ClassVar[FetchError.Kind]
        DNS: _ClassVar[FetchError.Kind]
        CONNECT: _ClassVar[FetchError.Kind]
        TLS: _ClassVar[FetchError.Kind]
        PROXY: _ClassVar[FetchError.Kind]
        PROXY_AUTH: _ClassVar[FetchError.Kind]
        TIMEOUT: _ClassVar[FetchError.Kind]
        POOL_TIMEOUT: _ClassVar[FetchError.Kind]
        TOO_LARGE: _ClassVar[FetchError.Kind]
        PROTOCOL: _ClassVar[FetchError.Kind]
        NETWORK: _ClassVar[FetchError.Kind]
        TOO_MANY_REDIRECTS: _ClassVar[FetchError.Kind]
        FORBIDDEN_TARGET: _ClassVar[FetchError.Kind]
        UNAVAILABLE: _ClassVar[FetchError.Kind]
        CANCELLED: _ClassVar[FetchError.Kind]
        INTERNAL: _ClassVar[FetchError.Kind]
    KIND_UNSPECIFIED: FetchError.Kind
    INVALID_URL: FetchError.Kind
    INVALID_ARGUMENT: FetchError.Kind
    DNS: FetchError.Kind
    CONNECT: FetchError.Kind
    TLS: FetchError.Kind
    PROXY: FetchError.Kind
    PROXY_AUTH: FetchError.Kind
    TIMEOUT: FetchError.Kind
    POOL_TIMEOUT: FetchError.Kind
    TOO_LARGE: FetchError.Kind
    PROTOCOL: FetchError.Kind
    NETWORK: FetchError.Kind
    TOO_MANY_REDIRECTS: FetchError.Kind
    FORBIDDEN_TARGET: FetchError.Kind
    UNAVAILABLE: FetchError.Kind
    CANCELLED: FetchError.Kind
    INTERNAL: FetchError.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    kind: FetchError.Kind
    message: str
    def __init__(self, kind: _Optional[_Union[FetchError.Kind, str]] = ..., message: _Optional[str] = ...) -> None: ...

class FetchResult(_message.Message):
    __slots__ = ("id", "index", "url", "final_url", "status_code", "headers", "body", "http_version", "connection_reused", "timings", "error", "pool", "attempts", "body_size", "part", "more_parts", "encoding", "text", "redirects", "remote_address", "tls_version", "content_decoded", "retry_reasons")
    ID_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    FINAL_URL_FIELD_NUMBER: _ClassVar[int]
    STATUS_CODE_FIELD_NUMBER: _ClassVar[int]
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    HTTP_VERSION_FIELD_NUMBER: _ClassVar[int]
    CONNECTION_REUSED_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    BODY_SIZE_FIELD_NUMBER: _ClassVar[int]
    PART_FIELD_NUMBER: _ClassVar[int]
    MORE_PARTS_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    REDIRECTS_FIELD_NUMBER: _ClassVar[int]
    REMOTE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    TLS_VERSION_FIELD_NUMBER: _ClassVar[int]
    CONTENT_DECODED_FIELD_NUMBER: _ClassVar[int]
    RETRY_REASONS_FIELD_NUMBER: _ClassVar[int]
    id: str
    index: int
    url: str
    final_url: str
    status_code: int
    headers: _containers.RepeatedCompositeFieldContainer[Header]
    body: bytes
    http_version: str
    connection_reused: bool
    timings: Timings
    error: FetchError
    pool: str
    attempts: int
    body_size: int
    part: int
    more_parts: bool
    encoding: str
    text: str
    redirects: _containers.RepeatedCompositeFieldContainer[Redirect]
    remote_address: str
    tls_version: str
    content_decoded: bool
    retry_reasons: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, id: _Optional[str] = ..., index: _Optional[int] = ..., url: _Optional[str] = ..., final_url: _Optional[str] = ..., status_code: _Optional[int] = ..., headers: _Optional[_Iterable[_Union[Header, _Mapping]]] = ..., body: _Optional[bytes] = ..., http_version: _Optional[str] = ..., connection_reused: _Optional[bool] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., error: _Optional[_Union[FetchError, _Mapping]] = ..., pool: _Optional[str] = ..., attempts: _Optional[int] = ..., body_size: _Optional[int] = ..., part: _Optional[int] = ..., more_parts: _Optional[bool] = ..., encoding: _Optional[str] = ..., text: _Optional[str] = ..., redirects: _Optional[_Iterable[_Union[Redirect, _Mapping]]] = ..., remote_address: _Optional[str] = ..., tls_version: _Optional[str] = ..., content_decoded: _Optional[bool] = ..., retry_reasons: _Optional[_Iterable[str]] = ...) -> None: ...

class FetchRequests(_message.Message):
    __slots__ = ("requests",)
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[FetchRequest]
    def __init__(self, requests: _Optional[_Iterable[_Union[FetchRequest, _Mapping]]] = ...) -> None: ...

class FetchResults(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[FetchResult]
    def __init__(self, results: _Optional[_Iterable[_Union[FetchResult, _Mapping]]] = ...) -> None: ...

class PoolLimits(_message.Message):
    __slots__ = ("max_connections", "max_keepalive_connections", "keepalive_expiry", "pool_timeout", "max_connections_per_host", "max_requests")
    MAX_CONNECTIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_KEEPALIVE_CONNECTIONS_FIELD_NUMBER: _ClassVar[int]
    KEEPALIVE_EXPIRY_FIELD_NUMBER: _ClassVar[int]
    POOL_TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    MAX_CONNECTIONS_PER_HOST_FIELD_NUMBER: _ClassVar[int]
    MAX_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    max_connections: int
    max_keepalive_connections: int
    keepalive_expiry: _duration_pb2.Duration
    pool_timeout: _duration_pb2.Duration
    max_connections_per_host: int
    max_requests: int
    def __init__(self, max_connections: _Optional[int] = ..., max_keepalive_connections: _Optional[int] = ..., keepalive_expiry: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., pool_timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., max_connections_per_host: _Optional[int] = ..., max_requests: _Optional[int] = ...) -> None: ...

class GetPoolLimitsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetPoolLimitsResponse(_message.Message):
    __slots__ = ("pools",)
    class PoolsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: PoolLimits
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[PoolLimits, _Mapping]] = ...) -> None: ...
    POOLS_FIELD_NUMBER: _ClassVar[int]
    pools: _containers.MessageMap[str, PoolLimits]
    def __init__(self, pools: _Optional[_Mapping[str, PoolLimits]] = ...) -> None: ...

class SetPoolLimitsRequest(_message.Message):
    __slots__ = ("pool", "limits")
    POOL_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    pool: str
    limits: PoolLimits
    def __init__(self, pool: _Optional[str] = ..., limits: _Optional[_Union[PoolLimits, _Mapping]] = ...) -> None: ...

class GetPoolStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PoolStats(_message.Message):
    __slots__ = ("pool", "limits", "connections_open", "connections_idle", "connections_active", "http2_streams", "requests_active", "requests_waiting", "connections_created_total", "requests_total", "reuse_ratio", "acquire_wait_p50_seconds", "acquire_wait_p90_seconds", "acquire_wait_p99_seconds", "pool_timeouts_total", "working_limit", "latency_mean_seconds", "processing_mean_seconds", "concurrency_mean", "ejected", "ejected_until", "consecutive_failures", "retries_total", "connections_retired_total")
    POOL_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    CONNECTIONS_OPEN_FIELD_NUMBER: _ClassVar[int]
    CONNECTIONS_IDLE_FIELD_NUMBER: _ClassVar[int]
    CONNECTIONS_ACTIVE_FIELD_NUMBER: _ClassVar[int]
    HTTP2_STREAMS_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_ACTIVE_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_WAITING_FIELD_NUMBER: _ClassVar[int]
    CONNECTIONS_CREATED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    REUSE_RATIO_FIELD_NUMBER: _ClassVar[int]
    ACQUIRE_WAIT_P50_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ACQUIRE_WAIT_P90_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ACQUIRE_WAIT_P99_SECONDS_FIELD_NUMBER: _ClassVar[int]
    POOL_TIMEOUTS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    WORKING_LIMIT_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MEAN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PROCESSING_MEAN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CONCURRENCY_MEAN_FIELD_NUMBER: _ClassVar[int]
    EJECTED_FIELD_NUMBER: _ClassVar[int]
    EJECTED_UNTIL_FIELD_NUMBER: _ClassVar[int]
    CONSECUTIVE_FAILURES_FIELD_NUMBER: _ClassVar[int]
    RETRIES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    CONNECTIONS_RETIRED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    pool: str
    limits: PoolLimits
    connections_open: int
    connections_idle: int
    connections_active: int
    http2_streams: int
    requests_active: int
    requests_waiting: int
    connections_created_total: int
    requests_total: int
    reuse_ratio: float
    acquire_wait_p50_seconds: float
    acquire_wait_p90_seconds: float
    acquire_wait_p99_seconds: float
    pool_timeouts_total: int
    working_limit: int
    latency_mean_seconds: float
    processing_mean_seconds: float
    concurrency_mean: float
    ejected: bool
    ejected_until: _timestamp_pb2.Timestamp
    consecutive_failures: int
    retries_total: int
    connections_retired_total: int
    def __init__(self, pool: _Optional[str] = ..., limits: _Optional[_Union[PoolLimits, _Mapping]] = ..., connections_open: _Optional[int] = ..., connections_idle: _Optional[int] = ..., connections_active: _Optional[int] = ..., http2_streams: _Optional[int] = ..., requests_active: _Optional[int] = ..., requests_waiting: _Optional[int] = ..., connections_created_total: _Optional[int] = ..., requests_total: _Optional[int] = ..., reuse_ratio: _Optional[float] = ..., acquire_wait_p50_seconds: _Optional[float] = ..., acquire_wait_p90_seconds: _Optional[float] = ..., acquire_wait_p99_seconds: _Optional[float] = ..., pool_timeouts_total: _Optional[int] = ..., working_limit: _Optional[int] = ..., latency_mean_seconds: _Optional[float] = ..., processing_mean_seconds: _Optional[float] = ..., concurrency_mean: _Optional[float] = ..., ejected: _Optional[bool] = ..., ejected_until: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., consecutive_failures: _Optional[int] = ..., retries_total: _Optional[int] = ..., connections_retired_total: _Optional[int] = ...) -> None: ...

class GetPoolStatsResponse(_message.Message):
    __slots__ = ("pools", "time")
    POOLS_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    pools: _containers.RepeatedCompositeFieldContainer[PoolStats]
    time: _timestamp_pb2.Timestamp
    def __init__(self, pools: _Optional[_Iterable[_Union[PoolStats, _Mapping]]] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...
