"""The OpenAI-compatible HTTP API: request schemas (pydantic, unknown fields refused by name) and the JSON
of responses and stream chunks. Early exit travels in an `adept` object both ways."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from serving.messages import RequestOutput, Usage
from serving.params import ExitParams, SamplingParams, request_error


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


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
    adept: ExitParams | None = None

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

    def sampling(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        values = {
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
    prompt: str | list[int] | list[str]
    max_tokens: int | None = 16  # OpenAI's default for completions
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list) -> str | list[int]:
        if isinstance(v, list) and v and isinstance(v[0], str):
            if len(v) != 1:
                raise ValueError("only one prompt per request is supported")
            return v[0]
        return v

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v: bool) -> bool:
        if v:
            raise ValueError("echo is not supported")
        return v

    @field_validator("best_of")
    @classmethod
    def _no_best_of(cls, v: int | None) -> int | None:
        if v not in (None, 1):
            raise ValueError("only best_of=1 is supported")
        return v


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
    }


@dataclass
class Responder:
    """Builds the JSON of one request's response: stream chunks as outputs arrive, or the whole response."""

    chat: bool
    model: str
    logprobs: bool
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    exit_layers: list[int] = field(default_factory=list)
    logprob_items: list = field(default_factory=list)
    text_offsets: list[int] = field(default_factory=list)

    @property
    def _object(self) -> str:
        return "chat.completion" if self.chat else "text_completion"

    def _envelope(self, choices: list[dict], **extra) -> dict:
        prefix = "chatcmpl-" if self.chat else "cmpl-"
        return {"id": prefix + self.id, "created": self.created, "model": self.model, "choices": choices, **extra}

    def add(self, out: RequestOutput) -> None:
        if self.logprobs and out.logprobs:
            self.text_offsets.append(len(self.text))
            self.logprob_items += self._logprobs(out)
        self.text += out.text
        self.token_ids += out.token_ids
        self.exit_layers += out.exit_layers

    def role_chunk(self) -> dict:
        """The first chunk of a chat stream."""
        choice = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        return self._envelope([choice], object="chat.completion.chunk", adept={"token_ids": [], "exit_layers": []})

    def chunk(self, out: RequestOutput, include_usage: bool) -> dict:
        """A stream chunk for one output (one token), with its exit layer."""
        logprobs = self._logprobs_json(self._logprobs(out), [0] * len(out.token_ids)) if self.logprobs else None
        if self.chat:
            choice = {"index": 0, "delta": {"content": out.text}, "logprobs": logprobs}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": out.text, "logprobs": logprobs}
            obj = "text_completion"
        choice["finish_reason"] = out.finish_reason
        extra = {"usage": None} if include_usage else {}
        adept = {"token_ids": out.token_ids, "exit_layers": out.exit_layers}
        return self._envelope([choice], object=obj, adept=adept, **extra)

    def usage_chunk(self, usage: Usage) -> dict:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return self._envelope([], object=obj, usage=usage_json(usage))

    def response(self, finish_reason: str | None, usage: Usage) -> dict:
        """The whole (non-streaming) response."""
        logprobs = self._logprobs_json(self.logprob_items, self.text_offsets) if self.logprobs else None
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": self.text}, "logprobs": logprobs}
        else:
            choice = {"index": 0, "text": self.text, "logprobs": logprobs}
        choice["finish_reason"] = finish_reason
        adept = {"token_ids": self.token_ids, "exit_layers": self.exit_layers}
        return self._envelope([choice], object=self._object, usage=usage_json(usage), adept=adept)

    @staticmethod
    def _logprobs(out: RequestOutput) -> list[tuple[str, float, dict[str, float]]]:
        texts = out.token_texts or {}
        return [
            (texts.get(t, ""), lp, {texts.get(i, ""): v for i, v in top.items()})
            for t, lp, top in zip(out.token_ids, out.logprobs or [], out.top_logprobs or [], strict=False)
        ]

    def _logprobs_json(self, items: list[tuple[str, float, dict[str, float]]], offsets: list[int]) -> dict:
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
