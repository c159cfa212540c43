"""Prompt scoring in the engine (tiny random Llama with the default model's tokenizer): prompt
log-probabilities at the exit each prompt token took, scoring only (max_tokens 0), batched against one by
one, against teacher forcing (`adept eval`'s scoring), and exit controls per phase (prompt and generated
tokens)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from serving.engine import Engine
from serving.engine.exceptions import RequestError
from serving.engine.params import ExitLimits, ExitParams, resolve_exit
from tests.helpers import hf_model
from tests.test_engine import PROMPTS, assert_clean, make_engine

SCORE = {"max_tokens": 0, "prompt_logprobs": 3}


async def scored(engine: Engine, prompt, sampling=SCORE, exit=None):
    outs = [o async for o in engine.generate(prompt, sampling, exit)]
    first = next(o for o in outs if o.prompt is not None)
    return first.prompt, outs


def test_prompt_logprobs_at_full_depth_equal_hf(tiny_chat_dir):
    """Scoring only: one output, no token, finish 'length'; each prompt token's log-probability and the
    best three alternatives equal HF's log-softmax of the prompt; usage counts prompt layers apart."""
    model = hf_model(tiny_chat_dir)

    async def main():
        engine = make_engine(tiny_chat_dir)
        ids = engine.admission.prompt_ids(PROMPTS[1])
        prompt, outs = await scored(engine, ids, exit={"policy": "none"})
        await assert_clean(engine)
        await engine.shutdown()
        return ids, prompt, outs

    ids, prompt, outs = asyncio.run(main())
    assert len(outs) == 1 and outs[0].token_ids == [] and outs[0].finished and outs[0].finish_reason == "length"
    with torch.no_grad():
        reference = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    assert prompt.token_ids == ids and prompt.exit_layers == [6] * len(ids)
    assert prompt.logprobs[0] is None and prompt.top_logprobs[0] is None
    expected = reference[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    assert torch.allclose(torch.tensor(prompt.logprobs[1:]), expected, atol=1e-4)
    for p, top in enumerate(prompt.top_logprobs[1:]):
        best = reference[p].topk(3)
        assert list(top) == best.indices.tolist()
        assert torch.allclose(torch.tensor(list(top.values())), best.values, atol=1e-4)
    usage = outs[0].usage
    assert usage.completion_tokens == 0 and usage.prompt_tokens == len(ids)
    assert usage.prompt_layers_computed == usage.prompt_layers_total == usage.layers_total == 6 * len(ids)


def test_batched_prompts_score_as_one_by_one_and_as_teacher_forcing(tiny_chat_dir):
    """Five prompts scored at once (prompt exits by a static depth) give what each gives alone, and what
    teacher forcing (adept eval's scoring) gives for the same tokens and exit controls."""
    exit = {"policy": "static", "max_depth": 2, "backfill": "decoupled"}

    async def main():
        engine = make_engine(tiny_chat_dir, max_num_seqs=8)
        ids = [engine.admission.prompt_ids(p) for p in PROMPTS]
        alone = [(await scored(engine, i, exit=exit))[0] for i in ids]
        together = [p for p, _ in await asyncio.gather(*(scored(engine, i, exit=exit) for i in ids))]
        forced = await engine.teacher_forced(ids, exit)
        await assert_clean(engine)
        await engine.shutdown()
        return alone, together, forced

    alone, together, forced = asyncio.run(main())
    for a, b, f in zip(alone, together, forced, strict=True):
        assert a.exit_layers == b.exit_layers == f.exit_layer.tolist() == [2] * len(a.token_ids)
        assert torch.allclose(torch.tensor(a.logprobs[1:]), torch.tensor(b.logprobs[1:]), atol=1e-5)
        assert torch.allclose(torch.tensor(a.logprobs[1:]), f.target_logprobs[:-1], atol=1e-5)


def test_exit_controls_per_phase(tiny_chat_dir):
    """Prompt tokens exit by `prefill`, generated ones by the request's own controls (the first generated
    token comes from the last prompt position, so it exits as a prompt token); the last prompt positions
    run at full depth when asked; unset prefill fields take the request's own."""
    sampling = {"max_tokens": 5, "temperature": 0.0, "ignore_eos": True, "prompt_logprobs": 0}

    async def main():
        engine = make_engine(tiny_chat_dir)
        ids = engine.admission.prompt_ids(PROMPTS[1])
        runs = {}
        for name, exit in {
            "split": {"policy": "none", "prefill": {"policy": "static", "max_depth": 2}},
            "keep last 2": {"policy": "static", "max_depth": 4, "prefill": {"max_depth": 2, "full_depth_last": 2}},
        }.items():
            prompt, outs = await scored(engine, ids, sampling, exit)
            runs[name] = (prompt, [e for o in outs for e in o.exit_layers], outs[-1].usage)
        await assert_clean(engine)
        await engine.shutdown()
        return len(ids), runs

    n, runs = asyncio.run(main())
    prompt, generated, usage = runs["split"]
    assert prompt.exit_layers == [2] * n and generated == [2] + [6] * 4  # the last prompt row samples the first
    assert usage.prompt_layers_computed == 2 * n and usage.layers_computed == 2 * n + 6 * 4
    prompt, generated, _ = runs["keep last 2"]
    assert prompt.exit_layers == [2] * (n - 2) + [6, 6] and generated == [6] + [4] * 4


def test_bad_scoring_requests_are_refused(tiny_chat_dir):
    async def main():
        engine = make_engine(tiny_chat_dir)
        errors = []
        for sampling, exit in [
            ({"max_tokens": 0}, None),  # scoring needs prompt_logprobs
            ({"prompt_logprobs": 21}, None),  # over MAX_TOP_LOGPROBS
            (SCORE, {"prefill": {"max_depth": 99}}),
            (SCORE, {"prefill": {"full_depth_last": -1}}),
        ]:
            with pytest.raises(RequestError) as error:
                engine.submit("hello", sampling, exit)
            errors.append(error.value.param)
        ok, _ = await scored(engine, "hello there")  # the engine still serves
        await engine.shutdown()
        return errors, ok

    errors, ok = asyncio.run(main())
    assert errors == ["max_tokens", "prompt_logprobs", "adept.prefill.max_depth", "adept.prefill.full_depth_last"]
    assert len(ok.logprobs) == len(ok.token_ids) == 2


def test_prefill_defaults_apply_to_requests_without_controls_of_their_own():
    """The server's prompt-token defaults serve requests that set no exit controls; a request's own controls
    are its prompt tokens' too (a request saying static 12 means every token), unless it sets `prefill`."""
    limits = ExitLimits(num_layers=30, min_depth=8, exit_points=(8, 12, 16, 20, 24, 28, 30), has_routers=True)
    defaults = ExitParams(policy="none", prefill={"policy": "static", "max_depth": 20, "full_depth_last": 1})
    plain = resolve_exit(ExitParams(), defaults, limits)
    assert (plain.decode.name, plain.prefill.name, plain.prefill.max_depth, plain.full_depth_last) == (
        "none", "static", 20, 1)  # fmt: skip
    own = resolve_exit(ExitParams(policy="static", max_depth=12), defaults, limits)
    assert own.prefill == own.decode and own.prefill.max_depth == 12 and own.full_depth_last == 0
    split = resolve_exit(ExitParams(policy="static", max_depth=12, prefill={"max_depth": 16}), defaults, limits)
    assert (split.decode.max_depth, split.prefill.max_depth, split.prefill.name) == (12, 16, "static")
