"""The OpenAI-compatible HTTP API: request schemas (pydantic, unknown fields refused by name) and the JSON
of responses and stream chunks. Early exit and speculative decoding travel in an `adept` object both ways."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from serving.engine.exceptions import RequestError
from serving.engine.messages import RequestOutput, Usage
from serving.engine.params import ExitParams, SamplingParams, request_error
from serving.engine.speculative import SpeculativeParams


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AdeptParams(ExitParams):
    """A request's `adept` object: its early-exit controls and, beside them (not one of them: the
    configuration's exit controls have no such field), its speculative decoding. None: the server's
    default; `{"num_tokens": 0}`: off."""

    speculative: SpeculativeParams | None = None

    def exit_params(self) -> ExitParams:
        return ExitParams(**{name: getattr(self, name) for name in ExitParams.model_fields})

    def speculative_params(self) -> SpeculativeParams | None:
        return self.speculative  # its unset fields take the server's default


class StreamOptions(_Strict):
    include_usage: bool = False


class _GenerationRequest(_Strict):
    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    ignore_eos: bool = False
    user: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    adept: AdeptParams | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, v: int) -> int:
        if v != 1:
            raise ValueError("only n=1 is supported")
        return v

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalties(cls, v: float | None) -> float | None:
        if v:
            raise ValueError("penalties are not supported (only 0)")
        return v

    def exit_params(self) -> ExitParams:
        return ExitParams() if self.adept is None else self.adept.exit_params()

    def speculative_params(self) -> SpeculativeParams | None:
        return None if self.adept is None else self.adept.speculative_params()

    def sampling(
        self, max_tokens: int | None, logprobs: int | None, prompt_logprobs: int | None = None
    ) -> SamplingParams:
        values = {
            "prompt_logprobs": prompt_logprobs,
            "max_tokens": max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "seed": self.seed,
            "stop": self.stop,
            "ignore_eos": self.ignore_eos,
            "logprobs": logprobs,
        }
        try:
            return SamplingParams.model_validate({k: v for k, v in values.items() if v is not None})
        except ValidationError as e:
            raise request_error(e) from None


class CompletionRequest(_GenerationRequest):
    # one prompt (a string or token ids) or several (one choice each, in order)
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16  # OpenAI's default for completions
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None

    @field_validator("prompt")
    @classmethod
    def _some_prompt(cls, v: str | list) -> str | list:
        if isinstance(v, list) and not v:
            raise ValueError("must not be empty")
        return v

    @field_validator("best_of")
    @classmethod
    def _no_best_of(cls, v: int | None) -> int | None:
        if v not in (None, 1):
            raise ValueError("only best_of=1 is supported")
        return v

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        return [p] if isinstance(p, str) or isinstance(p[0], int) else list(p)

    def completion_sampling(self) -> SamplingParams:
        """Echo returns the prompt with its log-probabilities (vLLM's prompt_logprobs: the prompt tokens'
        own, plus `logprobs` alternatives); max_tokens 0 then only scores it."""
        if self.max_tokens == 0 and not self.echo:
            raise RequestError("max_tokens", "0 generates nothing: it only makes sense with echo (prompt scoring)")
        try:
            return self.sampling(self.max_tokens, self.logprobs, (self.logprobs or 0) if self.echo else None)
        except RequestError as e:  # echo's prompt_logprobs is the request's logprobs: name that
            if e.param == "prompt_logprobs":
                raise RequestError("logprobs", str(e).split(": ", 1)[-1]) from None
            raise


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None

    def chat(self) -> list[dict[str, str]]:
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


def usage_json(usage: Usage) -> dict:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "layers_computed": usage.layers_computed,
        "layers_total": usage.layers_total,
        "prompt_layers_computed": usage.prompt_layers_computed,
        "prompt_layers_total": usage.prompt_layers_total,
        "draft_tokens": usage.draft_tokens,
        "accepted_tokens": usage.accepted_tokens,
    }


# A token's log-probability entry: its text, log-probability (None: the prompt's first token) and the best
# alternatives by text.
LogprobItem = tuple[str, float | None, dict[str, float] | None]


@dataclass
class Responder:
    """Builds the JSON of one choice of a response: stream chunks as outputs arrive, or the whole choice.
    With `echo`, the prompt (its text, and its tokens' log-probabilities) comes before the completion."""

    chat: bool
    model: str
    logprobs: bool
    index: int = 0
    echo: bool = False
    prompt_text: str | None = None  # the prompt as the client gave it (echo); None: its tokens' text
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    exit_layers: list[int] = field(default_factory=list)
    accepted: list[bool] | None = None  # speculative requests: per token, a draft the full model kept
    prompt_exit_layers: list[int] | None = None
    logprob_items: list[LogprobItem] = field(default_factory=list)
    text_offsets: list[int] = field(default_factory=list)

    @property
    def _object(self) -> str:
        return "chat.completion" if self.chat else "text_completion"

    def _envelope(self, choices: list[dict], **extra) -> dict:
        prefix = "chatcmpl-" if self.chat else "cmpl-"
        return {"id": prefix + self.id, "created": self.created, "model": self.model, "choices": choices, **extra}

    def add(self, out: RequestOutput) -> tuple[str, list[LogprobItem], list[int]]:
        """Take an output in: returns the text it adds (the echoed prompt first), its log-probability entries
        and their offsets in the whole text."""
        texts = out.token_texts or {}
        text, items, offsets = "", [], []
        if self.echo and out.prompt is not None:
            p = out.prompt
            pieces = [texts.get(t, "") for t in p.token_ids]
            text = self.prompt_text if self.prompt_text is not None else "".join(pieces)
            tops = [None if top is None else {texts.get(i, ""): v for i, v in top.items()} for top in p.top_logprobs]
            items += zip(pieces, p.logprobs, tops, strict=True)
            offsets += _offsets(pieces, len(self.text))
            self.prompt_exit_layers = p.exit_layers
        pieces = [texts.get(t, "") for t in out.token_ids]
        if out.logprobs:
            items += [
                (piece, lp, {texts.get(i, ""): v for i, v in top.items()})
                for piece, lp, top in zip(pieces, out.logprobs, out.top_logprobs or [], strict=False)
            ]
            offsets += _offsets(pieces, len(self.text) + len(text))
        text += out.text
        self.text += text
        self.token_ids += out.token_ids
        self.exit_layers += out.exit_layers
        if out.accepted is not None:
            self.accepted = (self.accepted or []) + out.accepted
        if self.logprobs:
            self.logprob_items += items
            self.text_offsets += offsets
        return text, items, offsets

    def role_chunk(self) -> dict:
        """The first chunk of a chat stream."""
        choice = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        return self._envelope([choice], object="chat.completion.chunk", adept={"token_ids": [], "exit_layers": []})

    def chunk(self, out: RequestOutput, include_usage: bool) -> dict:
        """A stream chunk for one output (usually one token), with its exit layers."""
        text, items, offsets = self.add(out)
        logprobs = self._logprobs_json(items, offsets) if self.logprobs else None
        if self.chat:
            choice = {"index": self.index, "delta": {"content": text}, "logprobs": logprobs}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": self.index, "text": text, "logprobs": logprobs}
            obj = "text_completion"
        choice["finish_reason"] = out.finish_reason
        extra = {"usage": None} if include_usage else {}
        adept = {"token_ids": out.token_ids, "exit_layers": out.exit_layers}
        if out.accepted is not None:
            adept["accepted"] = out.accepted
        if self.echo and out.prompt is not None:
            adept["prompt_exit_layers"] = out.prompt.exit_layers
        return self._envelope([choice], object=obj, adept=adept, **extra)

    def usage_chunk(self, usage: Usage) -> dict:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return self._envelope([], object=obj, usage=usage_json(usage))

    def choice(self, finish_reason: str | None) -> dict:
        """This choice of the whole (non-streaming) response, with its own exit layers."""
        logprobs = self._logprobs_json(self.logprob_items, self.text_offsets) if self.logprobs else None
        if self.chat:
            choice = {"index": self.index, "message": {"role": "assistant", "content": self.text}, "logprobs": logprobs}
        else:
            choice = {"index": self.index, "text": self.text, "logprobs": logprobs}
        choice["finish_reason"] = finish_reason
        choice["adept"] = self._adept()
        return choice

    def response(self, choices: list[dict], usage: Usage) -> dict:
        """The whole response: its choices (from this responder and its siblings), usage summed over them.
        With one choice its exit layers also stand at the top level."""
        extra = {"adept": choices[0]["adept"]} if len(choices) == 1 else {}
        return self._envelope(choices, object=self._object, usage=usage_json(usage), **extra)

    def _adept(self) -> dict:
        adept = {"token_ids": self.token_ids, "exit_layers": self.exit_layers}
        if self.accepted is not None:
            adept["accepted"] = self.accepted
        if self.prompt_exit_layers is not None:
            adept["prompt_exit_layers"] = self.prompt_exit_layers
        return adept

    def _logprobs_json(self, items: list[LogprobItem], offsets: list[int]) -> dict:
        if self.chat:

            def entry(token: str, lp: float) -> dict:
                return {"token": token, "logprob": lp, "bytes": list(token.encode())}

            return {
                "content": [
                    {**entry(tok, lp), "top_logprobs": [entry(t, v) for t, v in top.items()]} for tok, lp, top in items
                ]
            }
        return {
            "tokens": [tok for tok, _, _ in items],
            "token_logprobs": [lp for _, lp, _ in items],
            "top_logprobs": [top for _, _, top in items],
            "text_offset": offsets,
        }


def _offsets(pieces: list[str], start: int) -> list[int]:
    """Where each token's text starts, the first at `start`."""
    out = []
    for piece in pieces:
        out.append(start)
        start += len(piece)
    return out
