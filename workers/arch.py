"""What the layer-group code needs to know about a Llama-family decoder, read from its HF config."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

# model_type -> family notes; everything here shares the Llama decoder block
# (RMSNorm, RoPE, grouped-query attention, gated MLP) and HF weight names.
SUPPORTED_MODEL_TYPES = {
    "llama": "Llama 2/3, SmolLM, SmolLM2",
    "mistral": "Mistral (sliding-window attention)",
    "qwen2": "Qwen2 / Qwen2.5 (q/k/v biases)",
}
# RoPE variants whose frequencies do not depend on the current sequence length.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "proportional")


class UnsupportedModelError(ValueError):
    pass


@dataclass(frozen=True)
class ModelArch:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    hidden_act: str
    sliding_windows: tuple[int | None, ...]  # per layer; None is full attention
    eos_token_ids: tuple[int, ...]

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_config(cls, config: PretrainedConfig) -> ModelArch:
        model_type = getattr(config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            families = ", ".join(f"{k} ({v})" for k, v in SUPPORTED_MODEL_TYPES.items())
            raise UnsupportedModelError(
                f"model_type {model_type!r} is not supported; ADEPT Serve runs Llama-family decoders: {families}"
            )
        rope = rope_parameters(config)
        if rope.get("rope_type", "default") not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedModelError(
                f"RoPE type {rope['rope_type']!r} is not supported (its frequencies change with sequence "
                f"length); supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        n_layers = config.num_hidden_layers
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        eos = config.eos_token_id
        eos_ids = tuple(eos) if isinstance(eos, list | tuple) else (() if eos is None else (eos,))
        attention_bias = bool(getattr(config, "attention_bias", False))
        return cls(
            model_type=model_type,
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=n_layers,
            num_heads=config.num_attention_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            head_dim=head_dim,
            rms_norm_eps=config.rms_norm_eps,
            max_position_embeddings=config.max_position_embeddings,
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            # Qwen2 always has q/k/v biases; Llama's attention_bias covers q/k/v and o.
            qkv_bias=model_type == "qwen2" or attention_bias,
            o_bias=model_type != "qwen2" and attention_bias,
            mlp_bias=bool(getattr(config, "mlp_bias", False)),
            hidden_act=config.hidden_act,
            sliding_windows=_sliding_windows(config, n_layers),
            eos_token_ids=eos_ids,
        )


def rope_parameters(config: PretrainedConfig) -> dict:
    params = getattr(config, "rope_parameters", None) or {}
    if "rope_type" not in params:
        params = {**params, "rope_type": "default"}
    return params


def _sliding_windows(config: PretrainedConfig, n_layers: int) -> tuple[int | None, ...]:
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if config.model_type == "qwen2" and not getattr(config, "use_sliding_window", False):
        window = None
    if window is None:
        return (None,) * n_layers
    if layer_types:
        return tuple(window if t == "sliding_attention" else None for t in layer_types)
    return (window,) * n_layers


def rope_tables(config: PretrainedConfig, max_len: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin for positions [0, max_len), shape [max_len, head_dim], computed as HF does (float32)."""
    params = rope_parameters(config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if params["rope_type"] == "default":
        base = params["rope_theta"]
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        scaling = 1.0
    else:
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[params["rope_type"]](config, torch.device("cpu"))
    freqs = torch.arange(max_len, dtype=torch.float32)[:, None] * inv_freq.float()[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)
