"""Exits scored on the model's own chat continuations (`adept eval --chats`): the continuations are the
engine's greedy output (Hugging Face's too) and are cached, and the per-exit agreement `adept eval` reports
equals a direct computation on the model's hidden states. A tiny random model with the real tokenizer."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json

import torch

from serving.cli import main
from serving.engine import Engine
from serving.engine.config import EngineConfig
from serving.quality.continuations import continuations
from tests.helpers import hf_model
from workers.model_store import load_tokenizer

CHATS = ("Name a river.", "Why is the sky blue?", "Count to five.")
TOKENS = 10


def _prompts(model_dir) -> list[list[int]]:
    tokenizer = load_tokenizer(model_dir)
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": c}], add_generation_prompt=True,
                                           tokenize=False) for c in CHATS]  # fmt: skip
    return [tokenizer.encode(t, add_special_tokens=False) for t in texts]


def _hf_greedy(model, prompt: list[int]) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=TOKENS, do_sample=False, eos_token_id=2)
    return out[0, len(prompt) :].tolist()


def test_continuations_are_the_engines_greedy_output_and_are_cached(tiny_chat_dir, tmp_path, monkeypatch):
    prompts = _prompts(tiny_chat_dir)
    model = hf_model(tiny_chat_dir)

    async def run() -> tuple[list[list[int]], list[list[int]]]:
        engine = Engine.local(EngineConfig(model=str(tiny_chat_dir), exit_pack="none", max_num_seqs=4))
        try:
            first = await continuations(engine, prompts, TOKENS, cache=tmp_path)

            def refuse(*_args, **_kwargs):
                raise AssertionError("cached continuations must not be generated again")

            monkeypatch.setattr(engine, "submit", refuse)
            again = await continuations(engine, prompts, TOKENS, cache=tmp_path)
        finally:
            await engine.shutdown()
        return first.tokens, again.tokens

    first, again = asyncio.run(run())
    assert first == again == [_hf_greedy(model, p) for p in prompts]
    assert all(0 < len(t) <= TOKENS for t in first)
    assert len(list(tmp_path.glob("*.json"))) == 1


def test_eval_reports_per_exit_agreement_equal_to_a_direct_computation(tiny_chat_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("ADEPT_CACHE_DIR", str(tmp_path / "cache"))
    corpus = tmp_path / "text.txt"
    corpus.write_text("The river runs to the sea, and the sea is wide and deep.\n" * 20)
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"prompt": c}) + "\n" for c in CHATS))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main([
            "eval", "--model", str(tiny_chat_dir), "--exit-pack", "none", "--corpus", str(corpus),
            "--max-tokens", "64", "--window", "32", "--chats", str(chats), "--chat-part", "0,1", "--chat-tokens", "0",
            "--continuation-tokens", str(TOKENS), "--policies", "confidence-untrained",
            "--backfills", "exact,decoupled", "--thresholds", "0.01,0.99", "--json",
        ])  # fmt: skip
    assert code == 0
    served = json.loads(out.getvalue())["served"]

    # The direct computation: each generated token's hidden state at depth d through the final norm and the
    # LM head (the identity head; exact caches, since the prompt runs at full depth and static exits with
    # exact back-fill keep every cache the full model's), against the full model's prediction there.
    model = hf_model(tiny_chat_dir)
    hits: dict[int, list[torch.Tensor]] = {}
    positions = 0
    for prompt in _prompts(tiny_chat_dir):
        window = prompt + _hf_greedy(model, prompt)
        with torch.no_grad():
            forward = model(torch.tensor([window]), output_hidden_states=True)
        states = forward.hidden_states
        generated = slice(len(prompt), len(window) - 1)  # generated tokens with a next one to predict
        full = forward.logits[0, generated].argmax(-1)
        positions += len(full)
        for d in map(int, served["heads"]):
            with torch.no_grad():
                hits.setdefault(d, []).append(
                    model.lm_head(model.model.norm(states[d][0, generated])).argmax(-1) == full
                )
    assert served["full"]["tokens"] == positions and served["full"]["chat_prompts"] == len(CHATS)
    assert hits, "no exit point was scored"
    for d, parts in hits.items():
        expected = float(torch.cat(parts).double().mean())
        assert abs(served["heads"][str(d)]["untrained"] - expected) < 1e-4, d
        assert served["heads"][str(d)]["adapted"] == served["heads"][str(d)]["untrained"]  # no pack: one head
    reached = float(torch.stack([torch.cat(p) for p in hits.values()]).any(0).double().mean())
    assert abs(served["oracle"]["reached"] - reached) < 1e-4
    rows = {(r["backfill"], r["threshold"]): r for r in served["rows"]}
    assert set(rows) == {("exact", 0.01), ("exact", 0.99), ("decoupled", 0.01), ("decoupled", 0.99)}
    assert rows[("decoupled", 0.01)]["compute_saved"] > 0 and rows[("exact", 0.01)]["compute_saved"] <= 1e-9
    assert rows[("decoupled", 0.01)]["mean_exit_depth"] < rows[("decoupled", 0.99)]["mean_exit_depth"]
