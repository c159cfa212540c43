from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class ExitControls(_message.Message):
    __slots__ = ("policy", "threshold", "min_depth", "max_depth", "backfill", "full_depth_last")
    POLICY_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    MIN_DEPTH_FIELD_NUMBER: _ClassVar[int]
    MAX_DEPTH_FIELD_NUMBER: _ClassVar[int]
    BACKFILL_FIELD_NUMBER: _ClassVar[int]
    FULL_DEPTH_LAST_FIELD_NUMBER: _ClassVar[int]
    policy: str
    threshold: float
    min_depth: int
    max_depth: int
    backfill: str
    full_depth_last: int
    def __init__(self, policy: _Optional[str] = ..., threshold: _Optional[float] = ..., min_depth: _Optional[int] = ..., max_depth: _Optional[int] = ..., backfill: _Optional[str] = ..., full_depth_last: _Optional[int] = ...) -> None: ...

class SpeculativeControls(_message.Message):
    __slots__ = ("num_tokens", "draft_depth", "min_confidence")
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DRAFT_DEPTH_FIELD_NUMBER: _ClassVar[int]
    MIN_CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    num_tokens: int
    draft_depth: int
    min_confidence: float
    def __init__(self, num_tokens: _Optional[int] = ..., draft_depth: _Optional[int] = ..., min_confidence: _Optional[float] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("model", "prompt", "messages", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "ignore_eos", "adept", "logprobs", "prompt_logprobs", "prefill", "speculative")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    ADEPT_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_FIELD_NUMBER: _ClassVar[int]
    SPECULATIVE_FIELD_NUMBER: _ClassVar[int]
    model: str
    prompt: str
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    ignore_eos: bool
    adept: ExitControls
    logprobs: int
    prompt_logprobs: int
    prefill: ExitControls
    speculative: SpeculativeControls
    def __init__(self, model: _Optional[str] = ..., prompt: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ..., max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., seed: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., ignore_eos: _Optional[bool] = ..., adept: _Optional[_Union[ExitControls, _Mapping]] = ..., logprobs: _Optional[int] = ..., prompt_logprobs: _Optional[int] = ..., prefill: _Optional[_Union[ExitControls, _Mapping]] = ..., speculative: _Optional[_Union[SpeculativeControls, _Mapping]] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prompt_tokens", "completion_tokens", "total_tokens", "layers_computed", "layers_total", "prompt_layers_computed", "prompt_layers_total", "draft_tokens", "accepted_tokens")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LAYERS_COMPUTED_FIELD_NUMBER: _ClassVar[int]
    LAYERS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LAYERS_COMPUTED_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LAYERS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    DRAFT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    layers_computed: int
    layers_total: int
    prompt_layers_computed: int
    prompt_layers_total: int
    draft_tokens: int
    accepted_tokens: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., total_tokens: _Optional[int] = ..., layers_computed: _Optional[int] = ..., layers_total: _Optional[int] = ..., prompt_layers_computed: _Optional[int] = ..., prompt_layers_total: _Optional[int] = ..., draft_tokens: _Optional[int] = ..., accepted_tokens: _Optional[int] = ...) -> None: ...

class TopLogprob(_message.Message):
    __slots__ = ("token_id", "logprob")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    logprob: float
    def __init__(self, token_id: _Optional[int] = ..., logprob: _Optional[float] = ...) -> None: ...

class PromptToken(_message.Message):
    __slots__ = ("token_id", "exit_layer", "logprob", "top_logprobs")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    EXIT_LAYER_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    exit_layer: int
    logprob: float
    top_logprobs: _containers.RepeatedCompositeFieldContainer[TopLogprob]
    def __init__(self, token_id: _Optional[int] = ..., exit_layer: _Optional[int] = ..., logprob: _Optional[float] = ..., top_logprobs: _Optional[_Iterable[_Union[TopLogprob, _Mapping]]] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("text", "token_id", "exit_layer", "logprob", "top_logprobs", "finish_reason", "usage", "prompt", "accepted")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    EXIT_LAYER_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_id: int
    exit_layer: int
    logprob: float
    top_logprobs: _containers.RepeatedCompositeFieldContainer[TopLogprob]
    finish_reason: str
    usage: Usage
    prompt: _containers.RepeatedCompositeFieldContainer[PromptToken]
    accepted: bool
    def __init__(self, text: _Optional[str] = ..., token_id: _Optional[int] = ..., exit_layer: _Optional[int] = ..., logprob: _Optional[float] = ..., top_logprobs: _Optional[_Iterable[_Union[TopLogprob, _Mapping]]] = ..., finish_reason: _Optional[str] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., prompt: _Optional[_Iterable[_Union[PromptToken, _Mapping]]] = ..., accepted: _Optional[bool] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Model(_message.Message):
    __slots__ = ("id", "num_layers", "exit_points", "num_layer_groups", "max_model_len", "draft_depths", "default_speculative", "auto_draft_depth")
    ID_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    EXIT_POINTS_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYER_GROUPS_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    DRAFT_DEPTHS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_SPECULATIVE_FIELD_NUMBER: _ClassVar[int]
    AUTO_DRAFT_DEPTH_FIELD_NUMBER: _ClassVar[int]
    id: str
    num_layers: int
    exit_points: _containers.RepeatedScalarFieldContainer[int]
    num_layer_groups: int
    max_model_len: int
    draft_depths: _containers.RepeatedScalarFieldContainer[int]
    default_speculative: SpeculativeControls
    auto_draft_depth: int
    def __init__(self, id: _Optional[str] = ..., num_layers: _Optional[int] = ..., exit_points: _Optional[_Iterable[int]] = ..., num_layer_groups: _Optional[int] = ..., max_model_len: _Optional[int] = ..., draft_depths: _Optional[_Iterable[int]] = ..., default_speculative: _Optional[_Union[SpeculativeControls, _Mapping]] = ..., auto_draft_depth: _Optional[int] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[Model]
    def __init__(self, models: _Optional[_Iterable[_Union[Model, _Mapping]]] = ...) -> None: ...
