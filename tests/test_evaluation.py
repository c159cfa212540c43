"""Teacher-forced evaluation: every token of a text exits per its policy and predicts the next one."""

from __future__ import annotations

import asyncio
import math

import torch

from serving.engine import Engine
from serving.engine.config import EngineConfig
from serving.quality.evaluation import Costs, TeacherForced, agreement, common_prefix, oracle_row, teacher_forced
from tests.helpers import hf_model
from workers.model_store import load_tokenizer


def evaluate(path, token_ids, exit, **config) -> tuple:
    async def main():
        engine = Engine.local(EngineConfig(model=str(path), **{"num_layer_groups": 3, "max_num_seqs": 2, **config}))
        got = await teacher_forced(engine, [token_ids], exit, chunk=16)
        blocks = await engine.kv_blocks()
        held, occupied = blocks["capacity"] - blocks["free"], blocks["workers"]
        await engine.shutdown()
        return got, held, occupied

    return asyncio.run(main())


def test_full_depth_predictions_are_the_models_argmax(tiny_chat_dir):
    ids = torch.randint(0, 49152, (40,), generator=torch.Generator().manual_seed(3))
    got, held, occupied = evaluate(tiny_chat_dir, ids.tolist(), {"policy": "none"}, min_exit_depth=1)
    with torch.no_grad():
        logits = hf_model(tiny_chat_dir)(ids[None]).logits[0]
    assert torch.equal(got.predictions, logits.argmax(-1))
    # each token scores the next one: the perplexity's log-probabilities are the model's
    scored = torch.log_softmax(logits, -1)[torch.arange(39), ids[1:]]
    assert torch.allclose(got.target_logprobs, scored, atol=1e-4)
    assert set(got.exit_layers.tolist()) == {6}
    assert held == 0 and occupied == [[], [], []]  # its blocks are returned and cleared


def test_static_exit_with_exact_backfill_predicts_from_that_layer(tiny_chat_dir):
    """Exact back-fill leaves every cache as the full model's, so each token's depth-3 hidden state (and
    its prediction through the final norm and LM head) is the full model's at layer 3."""
    ids = torch.randint(0, 49152, (40,), generator=torch.Generator().manual_seed(4))
    exit = {"policy": "static", "max_depth": 3, "backfill": "exact"}
    got, _, _ = evaluate(tiny_chat_dir, ids.tolist(), exit, min_exit_depth=1, exit_points=[3])
    model = hf_model(tiny_chat_dir)
    with torch.no_grad():
        h3 = model(ids[None], output_hidden_states=True).hidden_states[3][0]
        ref = model.lm_head(model.model.norm(h3)).argmax(-1)
    assert set(got.exit_layers.tolist()) == {3}
    assert torch.equal(got.predictions, ref)


def test_wikitext_full_depth_matches_hf_on_the_real_model(shared_dir, default_model_dir):
    text = (shared_dir / "data/wikitext-2/valid.txt").read_text()[5000:7000]
    ids = load_tokenizer(default_model_dir).encode(text, add_special_tokens=False)[:200]
    got, _, _ = evaluate(default_model_dir, ids, {"policy": "none"})
    with torch.no_grad():
        ref = hf_model(default_model_dir)(torch.tensor([ids])).logits[0].argmax(-1)
    assert agreement(got.predictions, ref) == 1.0


def test_agreement_measures():
    assert agreement([1, 2, 3, 4], [1, 9, 3, 4, 5]) == 0.75
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix([1, 2], [1, 2, 3]) == 2


def test_oracle_exits_at_the_shallowest_agreeing_head():
    """The oracle row: per token the shallowest exit point whose prediction is the full model's (else full
    depth), its log-probabilities taken there, compute counted with the back-fill's cost per skipped layer."""
    scored = torch.tensor([True, True, True, False])  # one window of four tokens

    def run(predictions: list[int], logprobs: list[float]) -> TeacherForced:
        exits = torch.zeros(4, dtype=torch.int64)
        return TeacherForced(torch.tensor(predictions), exits, torch.tensor(logprobs), scored)

    full = run([5, 6, 7, 8], [-1.0, -1.0, -1.0])
    at = {2: run([5, 0, 0, 8], [-2.0, -9.0, -9.0]), 4: run([5, 6, 0, 0], [-3.0, -1.5, -9.0])}
    costs = Costs(kv=0.1, map=0.05, head=8.0, router=0.01)
    row = oracle_row(at, full, num_layers=6, min_depth=2, backfill="decoupled", costs=costs)
    assert row["mean_exit_depth"] == (2 + 4 + 6 + 2) / 4 and row["agreement"] == 1.0
    layers = ((2 + 4 * 0.1) + (4 + 2 * 0.1) + 6 + (2 + 4 * 0.1)) / 4 / 6
    assert row["compute_saved"] == round(1 - layers, 4)
    assert row["perplexity"] == round(math.exp((2.0 + 1.5 + 1.0) / 3), 3)
    assert row["curve"] == "oracle, decoupled"
