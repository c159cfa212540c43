"""The real default model: with exit policy `none` the engine is the model, token for token, whether the
layers run as one group or three, and whether requests run alone or batched together."""

from __future__ import annotations

import asyncio

import pytest
import torch
from transformers import AutoModelForCausalLM

from serving.engine import Engine
from serving.engine.config import EngineConfig
from workers.model_store import load_tokenizer

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea,",
    "The three primary colors are",
    "Water boils at a temperature of",
]
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def hf_greedy(default_model_dir) -> list[list[int]]:
    tokenizer = load_tokenizer(default_model_dir)
    model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    # Like the engine's ignore_eos: keep going past end-of-sequence (min_new_tokens would mask it instead).
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    out = []
    for prompt in PROMPTS:
        ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=False)])
        with torch.inference_mode():
            gen = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
        out.append(gen[0, ids.shape[1] :].tolist())
    return out


def run(path, groups: int, together: bool) -> list[list[int]]:
    async def main():
        engine = Engine.local(EngineConfig(model=str(path), num_layer_groups=groups, max_num_seqs=8))
        sampling = {"max_tokens": NEW_TOKENS, "temperature": 0.0, "ignore_eos": True}

        async def one(prompt):
            return [t async for out in engine.generate(prompt, sampling, {"policy": "none"}) for t in out.token_ids]

        if together:
            results = await asyncio.gather(*(one(p) for p in PROMPTS))
        else:
            results = [await one(p) for p in PROMPTS]
        await engine.shutdown()
        return results

    return asyncio.run(main())


@pytest.mark.parametrize("groups", [1, 3])
def test_full_depth_greedy_equals_hf_generate(default_model_dir, hf_greedy, groups):
    got = run(default_model_dir, groups, together=False)
    for prompt, mine, ref in zip(PROMPTS, got, hf_greedy, strict=True):
        assert len(mine) == NEW_TOKENS
        assert mine == ref, prompt


def test_batched_requests_equal_hf_generate(default_model_dir, hf_greedy):
    assert run(default_model_dir, 3, together=True) == hf_greedy
