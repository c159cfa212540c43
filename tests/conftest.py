"""Shared fixtures: tiny random models saved as HF folders (no download), and the real default model."""

from __future__ import annotations

import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from ray import serve
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from serving.app import build_app
from serving.config import APP_NAME, AppConfig, Listener
from serving.deploy import server
from serving.engine.config import EngineConfig
from tests import otlp
from workers.model_store import DEFAULT_MODEL, resolve_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"

TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
)


def _save(model_cls, config, path: Path, tokenizer_from: Path | None = None) -> Path:
    torch.manual_seed(1234)
    model = model_cls(config).eval()
    # Random init gives near-uniform logits; larger weights make greedy choices decisive, as in a real model.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.25 if p.shape[0] != config.vocab_size else 1.0)
    model.save_pretrained(path)
    if tokenizer_from is not None:
        for f in tokenizer_from.iterdir():
            if f.name.startswith("tokenizer") or f.name.endswith(".jinja"):
                shutil.copy(f, path / f.name)
    return path


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The real default model, converted once into the user cache."""
    return resolve_model(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    config = LlamaConfig(vocab_size=128, tie_word_embeddings=True, **TINY)
    return _save(LlamaForCausalLM, config, tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory) -> Path:
    config = Qwen2Config(vocab_size=128, tie_word_embeddings=False, **TINY)
    return _save(Qwen2ForCausalLM, config, tmp_path_factory.mktemp("tiny-qwen2"))


@pytest.fixture(scope="session")
def tiny_mistral_dir(tmp_path_factory) -> Path:
    config = MistralConfig(vocab_size=128, sliding_window=5, head_dim=16, **TINY)
    return _save(MistralForCausalLM, config, tmp_path_factory.mktemp("tiny-mistral"))


@pytest.fixture(scope="session")
def tiny_llama3_dir(tmp_path_factory) -> Path:
    rope = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    config = LlamaConfig(vocab_size=128, rope_parameters=rope, **TINY)
    return _save(LlamaForCausalLM, config, tmp_path_factory.mktemp("tiny-llama3"))


@pytest.fixture(scope="session")
def tiny_chat_dir(tmp_path_factory, default_model_dir) -> Path:
    """A tiny random Llama with the default model's real tokenizer, for engine tests that need text."""
    config = LlamaConfig(vocab_size=49152, tie_word_embeddings=True, eos_token_id=2, bos_token_id=1, **TINY)
    return _save(LlamaForCausalLM, config, tmp_path_factory.mktemp("tiny-chat"), tokenizer_from=default_model_dir)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"needs the shared data folder at {SHARED} (present in CI and on developer machines)")
    return SHARED


@dataclass
class Served:
    """The application running on a real local Ray and Serve, on loopback ports of its own."""

    config: AppConfig
    http: str  # base URL
    grpc: str  # host:port

    @property
    def model(self) -> str:
        return self.config.served_name()

    def replica(self):
        return serve.get_deployment_handle("PipelineReplica", APP_NAME)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Speculative requests draft beside other requests (a CPU's default speculative_max_batch is 1).
SERVED_ENGINE = dict(max_model_len=1024, max_inflight_batches=2, speculative_max_batch=8)


@pytest.fixture(scope="session")
def otlp_collector():
    """A local OTLP/HTTP collector that the session's server exports its traces to."""
    collector, http_server = otlp.start()
    yield collector
    http_server.shutdown()


@pytest.fixture(scope="session")
def served(default_model_dir, otlp_collector) -> Served:
    """Ray, Serve and the application on the default model, started once for the whole test session.
    Tracing exports to the local collector; the sampling ratio is 0, so only requests that arrive with a
    sampled traceparent are traced."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # no token files for a throwaway local cluster
    os.environ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] = otlp_collector.endpoint  # Ray's processes inherit it
    os.environ["OTEL_BSP_SCHEDULE_DELAY"] = "200"  # ms: spans reach the collector quickly
    config = AppConfig(
        trace_sampling_ratio=0.0,
        engine=EngineConfig(**SERVED_ENGINE),
        http=Listener(host="127.0.0.1", port=free_port()),
        grpc=Listener(host="127.0.0.1", port=free_port()),
    )
    # Metrics reach the node's exporter every second instead of every ten (tests read /metrics).
    server.init_ray(config, num_cpus=2, _system_config={"metrics_report_interval_ms": 1000})
    try:
        server.start(config, build_app(config))
        yield Served(config, f"http://127.0.0.1:{config.http.port}", f"127.0.0.1:{config.grpc.port}")
    finally:
        server.stop()
