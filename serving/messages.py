"""What the ingress, a pipeline replica and the engine say to each other: plain dataclasses at the bottom
of the import order, so the HTTP and gRPC side never imports the engine for its types."""

from __future__ import annotations

from dataclasses import dataclass

from serving.errors import ApiError
from serving.params import ExitParams, SamplingParams


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    layers_computed: int  # sum over every token fed through the model of the layers it ran
    layers_total: int  # what full depth would have run for the same tokens


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


@dataclass
class GenerateRequest:
    """A validated request, as the ingress hands it to a pipeline replica."""

    request_id: str
    prompt: str | list[int] | None  # exactly one of prompt and messages
    messages: list[dict[str, str]] | None
    sampling: SamplingParams
    exit: ExitParams


@dataclass
class Admitted:
    """The first event of an accepted request."""

    prompt_tokens: int


@dataclass
class Rejected:
    """The first (and last) event of a refused request, or the last of one that failed."""

    error: ApiError


@dataclass
class ModelInfo:
    name: str
    num_layers: int
    exit_points: list[int]
    num_layer_groups: int
    max_model_len: int
    default_exit: dict  # requests' default exit controls (the exit pack's tuned ones unless configured)


Event = Admitted | Rejected | RequestOutput
