"""What the ingress, a pipeline replica and the engine say to each other: plain dataclasses at the bottom
of the import order, so the HTTP and gRPC side never imports the engine for its types."""

from __future__ import annotations

from dataclasses import astuple, dataclass
from typing import TYPE_CHECKING

from serving.engine.exceptions import EngineError, QueueFullError, RequestError
from serving.engine.params import ExitParams, SamplingParams

if TYPE_CHECKING:  # for its annotation only: the speculative module imports torch, and this one stays light
    from serving.engine.speculative import SpeculativeParams


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    layers_computed: int  # sum over every token fed through the model of the layers it ran
    layers_total: int  # what full depth would have run for the same tokens
    prompt_layers_computed: int = 0  # the same two, of prompt tokens only
    prompt_layers_total: int = 0
    draft_tokens: int = 0  # speculative decoding: tokens drafted, and those the full model kept
    accepted_tokens: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(*(a + b for a, b in zip(astuple(self), astuple(other), strict=True)))


@dataclass
class RequestOutput:
    """What one step added to a request (usually one token)."""

    request_id: str
    text: str
    token_ids: list[int]
    exit_layers: list[int]
    logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None
    finished: bool = False
    finish_reason: str | None = None  # "stop", "length" or "abort"
    usage: Usage | None = None
    token_texts: dict[int, str] | None = None  # each token's text, for logprobs (filled by the replica)
    prompt: PromptScores | None = None  # on the first output of a request that asked for prompt_logprobs
    accepted: list[bool] | None = None  # speculative: per token, a draft the full model kept (else its own)

    def merged(self, later: RequestOutput) -> RequestOutput:
        """This output and a later one of the same request as one."""

        def join(a: list | None, b: list | None) -> list | None:
            return None if a is None and b is None else (a or []) + (b or [])

        return RequestOutput(
            request_id=self.request_id,
            text=self.text + later.text,
            token_ids=self.token_ids + later.token_ids,
            exit_layers=self.exit_layers + later.exit_layers,
            logprobs=join(self.logprobs, later.logprobs),
            top_logprobs=join(self.top_logprobs, later.top_logprobs),
            finished=later.finished,
            finish_reason=later.finish_reason,
            usage=later.usage,
            prompt=self.prompt or later.prompt,
            accepted=join(self.accepted, later.accepted),
        )


@dataclass
class PromptScores:
    """A prompt's tokens and, per position, the exit layer it took and the log-probability there of the
    token that follows (with the best alternatives); the first token has none (None)."""

    token_ids: list[int]
    exit_layers: list[int]
    logprobs: list[float | None]
    top_logprobs: list[dict[int, float] | None]


@dataclass
class GenerateRequest:
    """A validated request, as the ingress hands it to a pipeline replica."""

    request_id: str
    prompt: str | list[int] | None  # exactly one of prompt and messages
    messages: list[dict[str, str]] | None
    sampling: SamplingParams
    exit: ExitParams
    speculative: SpeculativeParams | None = None  # None: the server's default


@dataclass
class Admitted:
    """The first event of an accepted request."""

    prompt_tokens: int


@dataclass
class Rejected:
    """The first (and last) event of a refused request, or the last of one that failed: the engine's error,
    which the API edge turns into what the client is told."""

    error: RequestError | QueueFullError | EngineError


@dataclass
class ModelInfo:
    name: str
    num_layers: int
    exit_points: list[int]
    num_layer_groups: int
    max_model_len: int
    default_exit: dict  # requests' default exit controls (the exit pack's tuned ones unless configured)
    kv_cache_tokens: int  # positions the pipeline's KV blocks hold, all sequences together
    default_speculative: dict  # requests' default speculative decoding (num_tokens 0: off)
    draft_depths: list[int]  # depths with an exit head to draft from (any depth below num_layers is accepted)
    auto_draft_depth: int  # what draft_depth 'auto' picks for the default's num_tokens (16 while it is off)


Event = Admitted | Rejected | RequestOutput
