"""The engine's configuration: `EngineConfig` shapes one pipeline (from YAML, environment variables ADEPT_*,
or Python). The whole application's configuration (serving/config.py) holds one."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from serving.engine.params import ExitParams
from serving.engine.speculative import SpeculativeParams
from workers.model_store import DEFAULT_MODEL

# The default context per sequence (the model's, if shorter).
DEFAULT_MAX_MODEL_LEN = 2048


class EngineConfig(BaseSettings):
    """Everything that shapes one pipeline. Environment variables: ADEPT_<FIELD>, nested with `__`
    (ADEPT_EXIT__POLICY=confidence); explicit values (YAML, arguments) win over the environment."""

    model_config = SettingsConfigDict(env_prefix="ADEPT_", env_nested_delimiter="__", extra="forbid")

    model: str = Field(DEFAULT_MODEL, description=f"{DEFAULT_MODEL!r} or a local Hugging Face folder")
    num_layer_groups: int = Field(3, ge=1, description="contiguous layer groups (one worker each)")
    layer_boundaries: list[int] | None = Field(
        None, description="explicit group starts after layer 0, e.g. [10, 20] for 30 layers in 3 groups"
    )
    exit_points: list[int] | None = Field(
        None, description="depths (layers run) where tokens may exit; the last layer is always one"
    )
    min_exit_depth: int | None = Field(None, ge=1, description="no request may exit before this depth")
    exit_pack: str = Field(
        "auto",
        description="'auto': the exit pack shipped for the model, if any; 'none'; or a pack folder (adept calibrate)",
    )
    exit: ExitParams = Field(
        default_factory=ExitParams,
        description="early-exit controls of requests that leave them unset; unset here too: the exit pack's "
        "tuned defaults (the shipped pack: policy learned), else policy none",
    )
    speculative: SpeculativeParams = Field(
        default_factory=SpeculativeParams,
        description="speculative decoding of requests that leave it unset (num_tokens 0: off): exits draft, the "
        "deeper layer groups verify, output is full depth's",
    )
    speculative_adaptive: bool = Field(
        True,
        description="per sequence, draft only as many tokens a round as pay for themselves (measured acceptance, "
        "the cost model), decoding plainly and probing again later when none do; false: always num_tokens",
    )
    draft_vocab_size: int | None = Field(
        16384,
        ge=1,
        description="speculative drafts choose among the first this many token ids, a cheaper LM head (BPE ids "
        "come roughly by frequency: 94% of the default model's chat tokens are below 16,384); null: all",
    )
    speculative_max_batch: int | None = Field(
        None,
        ge=0,
        description="speculation steps aside while more sequences than this run (compute-bound there: a round's "
        "extra steps hold up the batch); default: 1 on CPUs, where every row costs, 8 on GPUs",
    )
    max_num_seqs: int = Field(
        128, ge=1, description="sequences in the running batch at most; KV memory usually limits it first"
    )
    kv_cache_memory: int | None = Field(
        None,
        ge=1,
        description="bytes of K/V for one pipeline (all its layer groups); default: 1 GiB on CPUs, and on GPUs "
        "kv_cache_fraction of the memory each worker has left after its weights",
    )
    kv_cache_fraction: float = Field(
        0.9, gt=0, le=1, description="on GPUs without kv_cache_memory: the share of free memory for K/V"
    )
    block_size: int = Field(16, ge=1, le=1024, description="positions per KV block (paged attention)")
    max_model_len: int | None = Field(
        None,
        ge=2,
        description=f"prompt and generated tokens per sequence; default: the model's, at most {DEFAULT_MAX_MODEL_LEN}",
    )
    max_prompt_tokens: int | None = Field(
        None, ge=1, description="longest prompt accepted (a server limit); default: the context less one token"
    )
    max_tokens_limit: int | None = Field(
        None, ge=1, description="most new tokens a request may ask for, and its default; default: the context's room"
    )
    max_num_batched_tokens: int = Field(512, ge=1, description="token budget of one step (prefill chunks)")
    max_waiting_requests: int = Field(256, ge=0, description="admission queue; beyond it requests are refused")
    max_inflight_batches: int = Field(1, ge=1, description="micro-batches in the pipeline at once")
    worker_restart_timeout_s: float = Field(
        120.0, gt=0, description="how long the engine waits for a lost layer-group worker to be restarted"
    )
    sync_backfill: bool = Field(
        False, description="a step waits for its back-fills on every deeper group (slower; a benchmark reference)"
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @model_validator(mode="after")
    def _check(self) -> EngineConfig:
        if self.layer_boundaries is not None and len(self.layer_boundaries) != self.num_layer_groups - 1:
            raise ValueError(
                f"layer_boundaries needs {self.num_layer_groups - 1} entries for {self.num_layer_groups} groups"
            )
        return self

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: object) -> EngineConfig:
        data = yaml.safe_load(Path(path).read_text()) or {}
        return cls(**{**data, **overrides})
