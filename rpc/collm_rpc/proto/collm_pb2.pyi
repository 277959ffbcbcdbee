from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Ack(_message.Message):
    __slots__ = ("ok", "message")
    OK_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    message: str
    def __init__(self, ok: _Optional[bool] = ..., message: _Optional[str] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AdapterRef(_message.Message):
    __slots__ = ("version", "cluster_version", "sha256", "eval_loss", "has_eval_loss", "revision")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_VERSION_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    EVAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    HAS_EVAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    version: str
    cluster_version: int
    sha256: str
    eval_loss: float
    has_eval_loss: bool
    revision: int
    def __init__(self, version: _Optional[str] = ..., cluster_version: _Optional[int] = ..., sha256: _Optional[str] = ..., eval_loss: _Optional[float] = ..., has_eval_loss: _Optional[bool] = ..., revision: _Optional[int] = ...) -> None: ...

class CapacityPoint(_message.Message):
    __slots__ = ("cap", "requests_per_s", "training_tokens_per_s")
    CAP_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_PER_S_FIELD_NUMBER: _ClassVar[int]
    TRAINING_TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    cap: int
    requests_per_s: float
    training_tokens_per_s: float
    def __init__(self, cap: _Optional[int] = ..., requests_per_s: _Optional[float] = ..., training_tokens_per_s: _Optional[float] = ...) -> None: ...

class Stats(_message.Message):
    __slots__ = ("replica_id", "model", "adapter", "global_adapter", "live_versions", "uptime_s", "queue_depth", "running", "iterations", "inference_tokens", "requests_finished", "requests_met_slo", "ttft_ms", "tpot_ms", "capacity_profile", "training_tokens", "training_steps", "training_share", "train_cap_tokens", "train_loss", "has_train_loss", "eval_loss", "has_eval_loss", "trainer_error", "data_error", "data_tokens", "unuploaded_steps", "revisions_published", "revisions_rejected", "last_revision_unix", "lora_rank", "lora_alpha", "lora_target_modules", "edge_sessions", "state_error")
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_ADAPTER_FIELD_NUMBER: _ClassVar[int]
    LIVE_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FINISHED_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_MET_SLO_FIELD_NUMBER: _ClassVar[int]
    TTFT_MS_FIELD_NUMBER: _ClassVar[int]
    TPOT_MS_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_PROFILE_FIELD_NUMBER: _ClassVar[int]
    TRAINING_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TRAINING_STEPS_FIELD_NUMBER: _ClassVar[int]
    TRAINING_SHARE_FIELD_NUMBER: _ClassVar[int]
    TRAIN_CAP_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    HAS_TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    EVAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    HAS_EVAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    TRAINER_ERROR_FIELD_NUMBER: _ClassVar[int]
    DATA_ERROR_FIELD_NUMBER: _ClassVar[int]
    DATA_TOKENS_FIELD_NUMBER: _ClassVar[int]
    UNUPLOADED_STEPS_FIELD_NUMBER: _ClassVar[int]
    REVISIONS_PUBLISHED_FIELD_NUMBER: _ClassVar[int]
    REVISIONS_REJECTED_FIELD_NUMBER: _ClassVar[int]
    LAST_REVISION_UNIX_FIELD_NUMBER: _ClassVar[int]
    LORA_RANK_FIELD_NUMBER: _ClassVar[int]
    LORA_ALPHA_FIELD_NUMBER: _ClassVar[int]
    LORA_TARGET_MODULES_FIELD_NUMBER: _ClassVar[int]
    EDGE_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    STATE_ERROR_FIELD_NUMBER: _ClassVar[int]
    replica_id: str
    model: str
    adapter: AdapterRef
    global_adapter: AdapterRef
    live_versions: _containers.RepeatedScalarFieldContainer[str]
    uptime_s: float
    queue_depth: int
    running: int
    iterations: int
    inference_tokens: int
    requests_finished: int
    requests_met_slo: int
    ttft_ms: int
    tpot_ms: int
    capacity_profile: _containers.RepeatedCompositeFieldContainer[CapacityPoint]
    training_tokens: int
    training_steps: int
    training_share: float
    train_cap_tokens: int
    train_loss: float
    has_train_loss: bool
    eval_loss: float
    has_eval_loss: bool
    trainer_error: str
    data_error: str
    data_tokens: int
    unuploaded_steps: int
    revisions_published: int
    revisions_rejected: int
    last_revision_unix: float
    lora_rank: int
    lora_alpha: int
    lora_target_modules: _containers.RepeatedScalarFieldContainer[str]
    edge_sessions: int
    state_error: str
    def __init__(self, replica_id: _Optional[str] = ..., model: _Optional[str] = ..., adapter: _Optional[_Union[AdapterRef, _Mapping]] = ..., global_adapter: _Optional[_Union[AdapterRef, _Mapping]] = ..., live_versions: _Optional[_Iterable[str]] = ..., uptime_s: _Optional[float] = ..., queue_depth: _Optional[int] = ..., running: _Optional[int] = ..., iterations: _Optional[int] = ..., inference_tokens: _Optional[int] = ..., requests_finished: _Optional[int] = ..., requests_met_slo: _Optional[int] = ..., ttft_ms: _Optional[int] = ..., tpot_ms: _Optional[int] = ..., capacity_profile: _Optional[_Iterable[_Union[CapacityPoint, _Mapping]]] = ..., training_tokens: _Optional[int] = ..., training_steps: _Optional[int] = ..., training_share: _Optional[float] = ..., train_cap_tokens: _Optional[int] = ..., train_loss: _Optional[float] = ..., has_train_loss: _Optional[bool] = ..., eval_loss: _Optional[float] = ..., has_eval_loss: _Optional[bool] = ..., trainer_error: _Optional[str] = ..., data_error: _Optional[str] = ..., data_tokens: _Optional[int] = ..., unuploaded_steps: _Optional[int] = ..., revisions_published: _Optional[int] = ..., revisions_rejected: _Optional[int] = ..., last_revision_unix: _Optional[float] = ..., lora_rank: _Optional[int] = ..., lora_alpha: _Optional[int] = ..., lora_target_modules: _Optional[_Iterable[str]] = ..., edge_sessions: _Optional[int] = ..., state_error: _Optional[str] = ...) -> None: ...

class Plan(_message.Message):
    __slots__ = ("train_cap_tokens", "ttft_ms", "tpot_ms", "fixed_training")
    TRAIN_CAP_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TTFT_MS_FIELD_NUMBER: _ClassVar[int]
    TPOT_MS_FIELD_NUMBER: _ClassVar[int]
    FIXED_TRAINING_FIELD_NUMBER: _ClassVar[int]
    train_cap_tokens: int
    ttft_ms: int
    tpot_ms: int
    fixed_training: bool
    def __init__(self, train_cap_tokens: _Optional[int] = ..., ttft_ms: _Optional[int] = ..., tpot_ms: _Optional[int] = ..., fixed_training: _Optional[bool] = ...) -> None: ...

class StartRoundRequest(_message.Message):
    __slots__ = ("round_id", "local_steps", "deadline_unix", "base_sha256", "base_source", "aggregator_address", "only_b", "secure", "participants", "clip_norm", "peer_addresses")
    class PeerAddressesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    LOCAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_FIELD_NUMBER: _ClassVar[int]
    BASE_SHA256_FIELD_NUMBER: _ClassVar[int]
    BASE_SOURCE_FIELD_NUMBER: _ClassVar[int]
    AGGREGATOR_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    ONLY_B_FIELD_NUMBER: _ClassVar[int]
    SECURE_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANTS_FIELD_NUMBER: _ClassVar[int]
    CLIP_NORM_FIELD_NUMBER: _ClassVar[int]
    PEER_ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    round_id: str
    local_steps: int
    deadline_unix: float
    base_sha256: str
    base_source: str
    aggregator_address: str
    only_b: bool
    secure: bool
    participants: _containers.RepeatedScalarFieldContainer[str]
    clip_norm: float
    peer_addresses: _containers.ScalarMap[str, str]
    def __init__(self, round_id: _Optional[str] = ..., local_steps: _Optional[int] = ..., deadline_unix: _Optional[float] = ..., base_sha256: _Optional[str] = ..., base_source: _Optional[str] = ..., aggregator_address: _Optional[str] = ..., only_b: _Optional[bool] = ..., secure: _Optional[bool] = ..., participants: _Optional[_Iterable[str]] = ..., clip_norm: _Optional[float] = ..., peer_addresses: _Optional[_Mapping[str, str]] = ...) -> None: ...

class RoundStatusRequest(_message.Message):
    __slots__ = ("round_id",)
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    round_id: str
    def __init__(self, round_id: _Optional[str] = ...) -> None: ...

class RoundStatus(_message.Message):
    __slots__ = ("round_id", "state", "message", "steps_done", "uploads", "public_key")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    STEPS_DONE_FIELD_NUMBER: _ClassVar[int]
    UPLOADS_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    round_id: str
    state: str
    message: str
    steps_done: int
    uploads: _containers.RepeatedCompositeFieldContainer[UploadInfo]
    public_key: bytes
    def __init__(self, round_id: _Optional[str] = ..., state: _Optional[str] = ..., message: _Optional[str] = ..., steps_done: _Optional[int] = ..., uploads: _Optional[_Iterable[_Union[UploadInfo, _Mapping]]] = ..., public_key: _Optional[bytes] = ...) -> None: ...

class UploadInfo(_message.Message):
    __slots__ = ("participant", "num_samples", "sha256", "bytes", "received_unix")
    PARTICIPANT_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_UNIX_FIELD_NUMBER: _ClassVar[int]
    participant: str
    num_samples: int
    sha256: str
    bytes: int
    received_unix: float
    def __init__(self, participant: _Optional[str] = ..., num_samples: _Optional[int] = ..., sha256: _Optional[str] = ..., bytes: _Optional[int] = ..., received_unix: _Optional[float] = ...) -> None: ...

class UpdateChunk(_message.Message):
    __slots__ = ("round_id", "participant", "sha256", "total_bytes", "data", "masked")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANT_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    MASKED_FIELD_NUMBER: _ClassVar[int]
    round_id: str
    participant: str
    sha256: str
    total_bytes: int
    data: bytes
    masked: bool
    def __init__(self, round_id: _Optional[str] = ..., participant: _Optional[str] = ..., sha256: _Optional[str] = ..., total_bytes: _Optional[int] = ..., data: _Optional[bytes] = ..., masked: _Optional[bool] = ...) -> None: ...

class UploadReply(_message.Message):
    __slots__ = ("accepted", "reason", "message")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    reason: str
    message: str
    def __init__(self, accepted: _Optional[bool] = ..., reason: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class AggregateRequest(_message.Message):
    __slots__ = ("round_id", "participants", "strategy", "clip_norm", "noise_multiplier", "outlier_factor", "base_sha256", "secure", "invited", "revealed")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANTS_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    CLIP_NORM_FIELD_NUMBER: _ClassVar[int]
    NOISE_MULTIPLIER_FIELD_NUMBER: _ClassVar[int]
    OUTLIER_FACTOR_FIELD_NUMBER: _ClassVar[int]
    BASE_SHA256_FIELD_NUMBER: _ClassVar[int]
    SECURE_FIELD_NUMBER: _ClassVar[int]
    INVITED_FIELD_NUMBER: _ClassVar[int]
    REVEALED_FIELD_NUMBER: _ClassVar[int]
    round_id: str
    participants: _containers.RepeatedScalarFieldContainer[str]
    strategy: str
    clip_norm: float
    noise_multiplier: float
    outlier_factor: float
    base_sha256: str
    secure: bool
    invited: _containers.RepeatedScalarFieldContainer[str]
    revealed: _containers.RepeatedCompositeFieldContainer[SeedShare]
    def __init__(self, round_id: _Optional[str] = ..., participants: _Optional[_Iterable[str]] = ..., strategy: _Optional[str] = ..., clip_norm: _Optional[float] = ..., noise_multiplier: _Optional[float] = ..., outlier_factor: _Optional[float] = ..., base_sha256: _Optional[str] = ..., secure: _Optional[bool] = ..., invited: _Optional[_Iterable[str]] = ..., revealed: _Optional[_Iterable[_Union[SeedShare, _Mapping]]] = ...) -> None: ...

class SeedShare(_message.Message):
    __slots__ = ("a", "b", "seed")
    A_FIELD_NUMBER: _ClassVar[int]
    B_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    a: str
    b: str
    seed: bytes
    def __init__(self, a: _Optional[str] = ..., b: _Optional[str] = ..., seed: _Optional[bytes] = ...) -> None: ...

class RevealRequest(_message.Message):
    __slots__ = ("round_id", "dropped")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    round_id: str
    dropped: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, round_id: _Optional[str] = ..., dropped: _Optional[_Iterable[str]] = ...) -> None: ...

class RevealReply(_message.Message):
    __slots__ = ("shares",)
    SHARES_FIELD_NUMBER: _ClassVar[int]
    shares: _containers.RepeatedCompositeFieldContainer[SeedShare]
    def __init__(self, shares: _Optional[_Iterable[_Union[SeedShare, _Mapping]]] = ...) -> None: ...

class AnnounceRequest(_message.Message):
    __slots__ = ("round_id", "participant", "withdraw")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANT_FIELD_NUMBER: _ClassVar[int]
    WITHDRAW_FIELD_NUMBER: _ClassVar[int]
    round_id: str
    participant: str
    withdraw: bool
    def __init__(self, round_id: _Optional[str] = ..., participant: _Optional[str] = ..., withdraw: _Optional[bool] = ...) -> None: ...

class PublicKeysRequest(_message.Message):
    __slots__ = ("round_id", "public_keys")
    class PublicKeysEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: bytes
        def __init__(self, key: _Optional[str] = ..., value: _Optional[bytes] = ...) -> None: ...
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEYS_FIELD_NUMBER: _ClassVar[int]
    round_id: str
    public_keys: _containers.ScalarMap[str, bytes]
    def __init__(self, round_id: _Optional[str] = ..., public_keys: _Optional[_Mapping[str, bytes]] = ...) -> None: ...

class AnnounceReply(_message.Message):
    __slots__ = ("replica",)
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    replica: str
    def __init__(self, replica: _Optional[str] = ...) -> None: ...

class Rejected(_message.Message):
    __slots__ = ("participant", "reason", "detail")
    PARTICIPANT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    participant: str
    reason: str
    detail: str
    def __init__(self, participant: _Optional[str] = ..., reason: _Optional[str] = ..., detail: _Optional[str] = ...) -> None: ...

class AggregateReply(_message.Message):
    __slots__ = ("candidate_sha256", "accepted", "rejected", "clipped", "bytes_in", "record_json")
    CANDIDATE_SHA256_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    CLIPPED_FIELD_NUMBER: _ClassVar[int]
    BYTES_IN_FIELD_NUMBER: _ClassVar[int]
    RECORD_JSON_FIELD_NUMBER: _ClassVar[int]
    candidate_sha256: str
    accepted: _containers.RepeatedScalarFieldContainer[str]
    rejected: _containers.RepeatedCompositeFieldContainer[Rejected]
    clipped: _containers.RepeatedScalarFieldContainer[str]
    bytes_in: int
    record_json: str
    def __init__(self, candidate_sha256: _Optional[str] = ..., accepted: _Optional[_Iterable[str]] = ..., rejected: _Optional[_Iterable[_Union[Rejected, _Mapping]]] = ..., clipped: _Optional[_Iterable[str]] = ..., bytes_in: _Optional[int] = ..., record_json: _Optional[str] = ...) -> None: ...

class EvaluateRequest(_message.Message):
    __slots__ = ("round_id", "candidate_sha256", "source")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_SHA256_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    round_id: str
    candidate_sha256: str
    source: str
    def __init__(self, round_id: _Optional[str] = ..., candidate_sha256: _Optional[str] = ..., source: _Optional[str] = ...) -> None: ...

class EvaluateReply(_message.Message):
    __slots__ = ("candidate_loss", "current_loss", "tokens")
    CANDIDATE_LOSS_FIELD_NUMBER: _ClassVar[int]
    CURRENT_LOSS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    candidate_loss: float
    current_loss: float
    tokens: int
    def __init__(self, candidate_loss: _Optional[float] = ..., current_loss: _Optional[float] = ..., tokens: _Optional[int] = ...) -> None: ...

class FetchRequest(_message.Message):
    __slots__ = ("sha256",)
    SHA256_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    def __init__(self, sha256: _Optional[str] = ...) -> None: ...

class AdapterChunk(_message.Message):
    __slots__ = ("sha256", "total_bytes", "data")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    total_bytes: int
    data: bytes
    def __init__(self, sha256: _Optional[str] = ..., total_bytes: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class PublishRequest(_message.Message):
    __slots__ = ("round_id", "sha256", "source", "cluster_version", "eval_loss", "has_eval_loss", "included")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_VERSION_FIELD_NUMBER: _ClassVar[int]
    EVAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    HAS_EVAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    INCLUDED_FIELD_NUMBER: _ClassVar[int]
    round_id: str
    sha256: str
    source: str
    cluster_version: int
    eval_loss: float
    has_eval_loss: bool
    included: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, round_id: _Optional[str] = ..., sha256: _Optional[str] = ..., source: _Optional[str] = ..., cluster_version: _Optional[int] = ..., eval_loss: _Optional[float] = ..., has_eval_loss: _Optional[bool] = ..., included: _Optional[_Iterable[str]] = ...) -> None: ...

class PublishReply(_message.Message):
    __slots__ = ("adapter", "switched_unix")
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    SWITCHED_UNIX_FIELD_NUMBER: _ClassVar[int]
    adapter: AdapterRef
    switched_unix: float
    def __init__(self, adapter: _Optional[_Union[AdapterRef, _Mapping]] = ..., switched_unix: _Optional[float] = ...) -> None: ...

class RollbackRequest(_message.Message):
    __slots__ = ("sha256",)
    SHA256_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    def __init__(self, sha256: _Optional[str] = ...) -> None: ...

class EdgeOpen(_message.Message):
    __slots__ = ("model", "split", "adapter_sha256", "max_len")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SPLIT_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_SHA256_FIELD_NUMBER: _ClassVar[int]
    MAX_LEN_FIELD_NUMBER: _ClassVar[int]
    model: str
    split: int
    adapter_sha256: str
    max_len: int
    def __init__(self, model: _Optional[str] = ..., split: _Optional[int] = ..., adapter_sha256: _Optional[str] = ..., max_len: _Optional[int] = ...) -> None: ...

class EdgeRequest(_message.Message):
    __slots__ = ("id", "state")
    ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    id: int
    state: bytes
    def __init__(self, id: _Optional[int] = ..., state: _Optional[bytes] = ...) -> None: ...

class EdgeMessage(_message.Message):
    __slots__ = ("open", "state", "request")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    open: EdgeOpen
    state: bytes
    request: EdgeRequest
    def __init__(self, open: _Optional[_Union[EdgeOpen, _Mapping]] = ..., state: _Optional[bytes] = ..., request: _Optional[_Union[EdgeRequest, _Mapping]] = ...) -> None: ...

class EdgeOpened(_message.Message):
    __slots__ = ("session_id", "replica", "adapter_version", "kv_bytes")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_VERSION_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    replica: str
    adapter_version: str
    kv_bytes: int
    def __init__(self, session_id: _Optional[str] = ..., replica: _Optional[str] = ..., adapter_version: _Optional[str] = ..., kv_bytes: _Optional[int] = ...) -> None: ...

class EdgeToken(_message.Message):
    __slots__ = ("id", "token")
    ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    id: int
    token: int
    def __init__(self, id: _Optional[int] = ..., token: _Optional[int] = ...) -> None: ...

class CloudMessage(_message.Message):
    __slots__ = ("opened", "token")
    OPENED_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    opened: EdgeOpened
    token: EdgeToken
    def __init__(self, opened: _Optional[_Union[EdgeOpened, _Mapping]] = ..., token: _Optional[_Union[EdgeToken, _Mapping]] = ...) -> None: ...
