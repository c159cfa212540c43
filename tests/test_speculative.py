"""Speculative decoding (serving/engine/speculative.py) on tiny random Llamas with the default model's real
tokenizer: greedy output identical to full depth whatever the draft depth, draft count, batch, block size,
stop strings, preemption or abort; the K/V after a rejected draft equals a cache that never saw it; the
request fields are checked."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest
import torch

from serving.engine import Engine
from serving.engine.config import EngineConfig
from serving.engine.exceptions import RequestError
from serving.engine.speculative import FIRST_BACKOFF, PROBE_TOKENS, RoundCost, SpecConfig, SpecState
from tests.helpers import load_groups, pipeline_of, rows, slot_table, weak_late_layers
from tests.test_engine import PROMPTS
from workers.modes import Backfill, Policy
from workers.protocol import TokenResults


@pytest.fixture(scope="module")
def mixed_dir(tiny_chat_dir, tmp_path_factory) -> Path:
    """Layers 4-5 weakened: drafts at depth 4 are often, not always, what full depth says."""
    return weak_late_layers(tiny_chat_dir, tmp_path_factory.mktemp("mixed"), 0.3, 4)


@pytest.fixture(scope="module")
def exact_dir(tiny_chat_dir, tmp_path_factory) -> Path:
    """Layers 4-5 add nothing: every draft at depth 4 is full depth's token."""
    return weak_late_layers(tiny_chat_dir, tmp_path_factory.mktemp("exact"), 0.0, 4)


def make_engine(path: Path, **kw) -> Engine:
    """Drafting every round (not only where it pays: on these tiny models with a 49,152-token LM head it
    never does) unless `speculative_adaptive` is given, with up to 8 sequences at once (a CPU's default is
    1); drafts over the whole vocabulary (a random model's
    token ids do not come by frequency) unless `draft_vocab_size` is."""
    config = dict(model=str(path), num_layer_groups=3, max_num_seqs=8, max_model_len=128, exit_pack="none",
                  speculative_adaptive=False, draft_vocab_size=None, speculative_max_batch=8)  # fmt: skip
    return Engine.local(EngineConfig(**{**config, **kw}))


async def generate(engine: Engine, prompt: str, spec: dict | None, max_tokens: int = 20, stop=None) -> dict:
    sampling = {"max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True, "stop": stop or []}
    tokens, accepted, text, last = [], [], "", None
    async for out in engine.generate(prompt, sampling, None, None, spec):
        tokens += out.token_ids
        accepted += out.accepted or []
        text += out.text
        assert all(layer == engine.plan.num_layers for layer in out.exit_layers)  # every token is full depth's
        last = out
    return {"tokens": tokens, "accepted": accepted, "text": text, "usage": last.usage, "reason": last.finish_reason}


async def assert_clean(engine: Engine) -> None:
    await asyncio.wait_for(engine.drain(), timeout=30)
    blocks = await engine.kv_blocks()
    assert blocks["free"] == blocks["capacity"]
    assert blocks["workers"] == [[], [], []]


@pytest.mark.parametrize(
    "engine_kw",
    [
        {},
        # drafts end where no exit point is (and at 3, one), and choose among the first 30,000 token ids only
        {"block_size": 4, "max_inflight_batches": 2, "exit_points": [3, 6], "draft_vocab_size": 30000},
        {"block_size": 4, "max_model_len": 64, "kv_cache_memory": 24 * 4 * 6 * 2 * 2 * 16 * 4},  # 24 blocks
    ],
    ids=["default", "small-blocks-two-micro-batches", "preempting"],
)
def test_greedy_output_is_full_depths(mixed_dir, engine_kw):
    async def main():
        engine = make_engine(mixed_dir, **engine_kw)
        full = await asyncio.gather(*(generate(engine, p, None) for p in PROMPTS))
        runs = {}
        # boundaries (2, 4), and depths inside a group: the first (1), the second (3), the last (5)
        for spec in [(1, 4), (3, 4), (5, 2), (4, 2), (2, 3), (3, 5), (2, 1)]:
            params = {"num_tokens": spec[0], "draft_depth": spec[1]}
            runs[spec] = await asyncio.gather(*(generate(engine, p, params) for p in PROMPTS))
        alone = await generate(engine, PROMPTS[1], {"num_tokens": 3, "draft_depth": 4})
        await assert_clean(engine)
        preemptions = engine.scheduler.preemptions
        await engine.shutdown()
        return full, runs, alone, preemptions

    full, runs, alone, preemptions = asyncio.run(main())
    assert alone["tokens"] == full[1]["tokens"]
    for spec, outs in runs.items():
        for out, ref in zip(outs, full, strict=True):
            assert out["tokens"] == ref["tokens"], spec
            assert out["text"] == ref["text"]
            usage = out["usage"]
            assert usage.completion_tokens == len(out["tokens"]) == 20
            assert sum(out["accepted"]) == usage.accepted_tokens <= usage.draft_tokens
            assert len(out["accepted"]) == len(out["tokens"])  # a flag per token (False: the model's own)
    # Both outcomes were exercised: drafts kept at depth 4, drafts rejected at depth 2.
    deep = sum(o["usage"].accepted_tokens for o in runs[(3, 4)])
    assert 0 < deep < sum(o["usage"].draft_tokens for o in runs[(3, 4)])
    assert sum(o["usage"].draft_tokens - o["usage"].accepted_tokens for o in runs[(5, 2)]) > 0
    if "kv_cache_memory" in engine_kw:
        assert preemptions > 0


def test_drafts_that_agree_are_all_kept(exact_dir):
    async def main():
        engine = make_engine(exact_dir)
        full = await generate(engine, PROMPTS[0], None, max_tokens=21)
        spec = await generate(engine, PROMPTS[0], {"num_tokens": 4, "draft_depth": 4}, max_tokens=21)
        await assert_clean(engine)
        await engine.shutdown()
        return full, spec

    full, spec = asyncio.run(main())
    assert spec["tokens"] == full["tokens"]
    # 20 tokens after the first in rounds of 4 drafts + 1: every draft kept, no round rejected
    assert spec["usage"].draft_tokens == spec["usage"].accepted_tokens == 16
    assert spec["accepted"] == [False] + ([True] * 4 + [False]) * 4  # the first token comes from the prompt
    # layers run: the prompt and first token at full depth, then per round 5 positions to depth 4 (the last
    # only feeds) and 5 positions through the other 2 layers
    prompt_len = spec["usage"].prompt_tokens
    assert spec["usage"].layers_computed == prompt_len * 6 + 4 * (5 * 4 + 5 * 2)


def test_stop_strings_and_eos_end_within_a_round(mixed_dir):
    async def main():
        engine = make_engine(mixed_dir)
        full = await generate(engine, PROMPTS[3], None, max_tokens=30)
        stop = full["text"][len(full["text"]) // 2 :][:4]
        ref = await generate(engine, PROMPTS[3], None, max_tokens=30, stop=[stop])
        spec = await generate(engine, PROMPTS[3], {"num_tokens": 5, "draft_depth": 4}, max_tokens=30, stop=[stop])
        short = await generate(engine, PROMPTS[3], {"num_tokens": 5, "draft_depth": 4}, max_tokens=3)
        await assert_clean(engine)
        await engine.shutdown()
        return full, ref, spec, short

    full, ref, spec, short = asyncio.run(main())
    assert ref["reason"] == spec["reason"] == "stop"
    assert spec["text"] == ref["text"] and spec["tokens"] == ref["tokens"]
    assert spec["usage"].completion_tokens == len(ref["tokens"])
    assert short["tokens"] == full["tokens"][:3] and short["reason"] == "length"


def test_abort_mid_round_frees_everything(mixed_dir):
    async def main():
        engine = make_engine(mixed_dir)
        stream = engine.submit(PROMPTS[1], {"max_tokens": 60, "temperature": 0.0, "ignore_eos": True}, None, None,
                               {"num_tokens": 4, "draft_depth": 4})  # fmt: skip
        got = 0
        async for out in stream:
            got += len(out.token_ids)
            if got >= 3:
                stream.abort()
                break
        other = await generate(engine, PROMPTS[0], {"num_tokens": 2, "draft_depth": 2})
        await assert_clean(engine)
        await engine.shutdown()
        return other

    assert len(asyncio.run(main())["tokens"]) == 20


@pytest.mark.parametrize("depth", [4, 3])  # a group boundary, and inside the group [2, 4)
def test_rejected_drafts_leave_the_cache_as_if_never_drafted(mixed_dir, depth):
    """Below the scheduler: draft 4 tokens at the draft depth, verify them, keep 2 and roll back the rest;
    every group's cache then equals, in its fill map and in K/V, a cache that saw only the kept tokens."""
    prompt, drafts, kept = [5, 17, 301, 42, 7, 1000, 64], [11, 12, 13, 14], 2
    b = len(prompt)

    def groups():
        return load_groups(mixed_dir, [0, 2, 4, 6], [6])

    async def speculate():
        gs = groups()
        pipe = pipeline_of(gs)
        await pipe.execute(rows(prompt, range(b)))  # say the full model's next token is 9
        inputs, hidden = [9, *drafts], []
        for i, token in enumerate(inputs):  # drafts, one position a step, to depth 4
            r = rows([token], [b + i], policy=Policy.STATIC, max_depth=depth, backfill=Backfill.DRAFT)
            hidden.append((await pipe.execute(r)).draft_hidden)
        hidden = torch.cat(hidden)
        verify = rows(inputs, range(b, b + 5), sample_all=True)
        result = await pipe.collect(pipe.submit(verify, hidden=hidden, depth=depth))
        assert (result.results.exit_layer == 6).all()
        table = torch.tensor([slot_table(0)] * (len(drafts) - kept))
        await pipe.confirm(pipe.rollback(table, torch.arange(b + 1 + kept, b + 1 + len(drafts))))
        return gs

    async def clean():
        gs = groups()
        pipe = pipeline_of(gs)
        await pipe.execute(rows([*prompt, 9, *drafts[:kept]], range(b + 1 + kept)))
        return gs

    spec, ref = asyncio.run(speculate()), asyncio.run(clean())
    for s, r in zip(spec, ref, strict=True):
        assert torch.equal(s.cache.filled, r.cache.filled)
        filled = r.cache.filled[:, None, :, :, None]  # as K/V: [layer, kv_head, block, offset, head_dim]
        for a, c in ((s.cache.k, r.cache.k), (s.cache.v, r.cache.v)):
            mask = filled.expand_as(a)
            torch.testing.assert_close(a[mask], c[mask], rtol=1e-4, atol=1e-4)  # batched vs one by one
    assert int(ref[0].cache.filled[0].sum()) == b + 1 + kept


def test_speculative_fields_are_checked(mixed_dir):
    engine = make_engine(mixed_dir)
    greedy = {"max_tokens": 4, "temperature": 0.0}

    async def refused(spec, exit=None):
        with pytest.raises(RequestError) as e:
            engine.submit("Hello", greedy, exit, None, spec)
        return e.value

    async def main():
        errors = [
            await refused({"num_tokens": 17}),
            await refused({"num_tokens": 2, "draft_depth": 6}),
            await refused({"num_tokens": 2, "bogus": 1}),
            await refused({"num_tokens": 2, "min_confidence": 1.5}),
            await refused({"num_tokens": 2, "draft_depth": 4}, {"policy": "static", "max_depth": 2}),
        ]
        # a speculative request may read its prompt with exits of its own
        ok = await generate(engine, "Hello", {"num_tokens": 2, "draft_depth": 4})
        await engine.shutdown()
        return errors, ok

    errors, ok = asyncio.run(main())
    assert errors[0].param == "adept.speculative.num_tokens"
    assert errors[1].param == "adept.speculative.draft_depth" and "from 1 to 5" in str(errors[1])
    assert errors[2].param == "adept.speculative.bogus"
    assert errors[3].param == "adept.speculative.min_confidence"
    assert errors[4].param == "adept.policy" and "full depth" in str(errors[4])
    assert len(ok["tokens"]) == 20


def test_server_default_applies_unless_a_request_sets_its_own(mixed_dir):
    """engine.speculative applies to requests that leave it unset; a request turns it off with 0."""

    async def main():
        engine = make_engine(mixed_dir, speculative={"num_tokens": 3, "draft_depth": 4})
        default = await generate(engine, PROMPTS[0], None)
        off = await generate(engine, PROMPTS[0], {"num_tokens": 0})
        shallow = await generate(engine, PROMPTS[0], {"draft_depth": 2})  # num_tokens: the default's 3
        await assert_clean(engine)
        await engine.shutdown()
        return default, off, shallow

    default, off, shallow = asyncio.run(main())
    assert default["tokens"] == off["tokens"] == shallow["tokens"]
    assert default["usage"].draft_tokens > 0 and off["usage"].draft_tokens == 0
    assert shallow["usage"].accepted_tokens < default["usage"].accepted_tokens  # depth 2 drafts worse than 4
    with pytest.raises(ValueError, match=r"engine.speculative.draft_depth: 6 is not a depth a draft can stop at"):
        make_engine(mixed_dir, speculative={"num_tokens": 2, "draft_depth": 6})


async def sampled(engine: Engine, prompt: list[int], seed: int, spec: dict | None, max_tokens: int, **kw) -> dict:
    sampling = {"max_tokens": max_tokens, "temperature": 1.0, "seed": seed, "ignore_eos": True, **kw}
    tokens, accepted, last = [], [], None
    async for out in engine.generate(prompt, sampling, None, None, spec):
        tokens += out.token_ids
        accepted += out.accepted or []
        last = out
    return {"tokens": tokens, "accepted": accepted, "usage": last.usage}


def test_sampled_speculation_emits_what_plain_sampling_would(mixed_dir):
    """A draft samples with the noise the full model's token at its position uses (seeded by request seed
    and position), so a sampled speculative request emits plain decoding's tokens for its seed, whatever its
    rounds, and keeps the drafts that agree. Top-p and top-k apply to drafts and full model alike."""
    prompt = list(range(300, 310))

    async def main():
        engine = make_engine(mixed_dir, speculative_max_batch=16)
        runs = []
        for kw in ({}, {"top_p": 0.9}, {"top_k": 5}):
            for spec in (None, {"num_tokens": 3, "draft_depth": 4}, {"num_tokens": 2, "draft_depth": 2}):
                runs.append(await asyncio.gather(*(sampled(engine, prompt, s, spec, 16, **kw) for s in range(8))))
        await assert_clean(engine)
        await engine.shutdown()
        return runs

    runs = asyncio.run(main())
    for plain, deep, shallow in zip(runs[::3], runs[1::3], runs[2::3], strict=True):
        assert [r["tokens"] for r in plain] == [r["tokens"] for r in deep] == [r["tokens"] for r in shallow]
        assert len({tuple(r["tokens"]) for r in plain}) > 4  # the seeds really sample
        drafted = sum(r["usage"].draft_tokens for r in deep)
        kept = sum(r["usage"].accepted_tokens for r in deep)
        assert 0 < kept < drafted  # drafts were kept and rejected
        assert sum(r["usage"].draft_tokens for r in plain) == 0


def test_sampled_speculation_follows_full_depths_distribution(mixed_dir):
    """The distribution test: 1,600 seeds, top-4 sampling at temperature 1. The first token comes from the
    prompt at full depth; the second is the first one a round verifies. Grouped by the first, the second's
    counts match full depth's next-token distribution computed by Hugging Face transformers (Pearson
    chi-square over the four groups)."""
    from scipy.stats import chi2
    from transformers import AutoModelForCausalLM

    prompt, n, k = list(range(300, 310)), 1600, 4

    async def main():
        engine = make_engine(mixed_dir, max_num_seqs=64, max_waiting_requests=n, speculative_max_batch=64)
        spec = {"num_tokens": 2, "draft_depth": 4}
        out = await asyncio.gather(*(sampled(engine, prompt, s, spec, 4, top_k=k) for s in range(n)))
        await assert_clean(engine)
        await engine.shutdown()
        return out

    out = asyncio.run(main())
    assert sum(r["usage"].accepted_tokens for r in out) > n / 4  # many second tokens were accepted drafts
    model = AutoModelForCausalLM.from_pretrained(mixed_dir).eval()
    firsts = sorted({r["tokens"][0] for r in out})
    with torch.no_grad():
        logits = model(torch.tensor([[*prompt, t] for t in firsts])).logits[:, -1].float()
    statistic, dof = 0.0, 0
    for t, row in zip(firsts, logits, strict=True):
        top = row.topk(k)
        expected_p = torch.softmax(top.values, dim=-1)
        seconds = [r["tokens"][1] for r in out if r["tokens"][0] == t]
        assert set(seconds) <= set(top.indices.tolist())  # never outside full depth's top 4
        observed = torch.tensor([seconds.count(v) for v in top.indices.tolist()], dtype=torch.float64)
        expected = expected_p.double() * len(seconds)
        statistic += float(((observed - expected) ** 2 / expected).sum())
        dof += k - 1
    assert chi2.sf(statistic, dof) > 1e-3, (statistic, dof)


def _round(state: SpecState, kept: int) -> int:
    """One round as the scheduler runs it: its draft count, and the full model keeping `kept` drafts."""
    state.start(room=1000)
    k = state.k
    if k:
        state.drafts = [1] * k
        results = TokenResults.empty(k + 1, 0)
        results.tokens[:] = torch.tensor([1] * min(kept, k) + [2] * (k + 1 - min(kept, k)))
        state.verified(results)
        state.reset()
    return k


def test_drafting_steps_aside_when_it_does_not_pay_and_comes_back_when_it_does():
    """The default model's shapes (30 layers, an LM head worth 8, drafts to 20) on a CPU: drafts must be kept
    about 9 times in 10 to pay; below that the sequence decodes plainly, probing with a short round after
    back-offs that double; once probes are kept, drafting resumes and grows."""
    cost = RoundCost(30, 20, 8.0, 0.145)
    assert 0.85 < cost.break_even(4) < 0.97
    assert cost.best(0.3, 4) == 0 and cost.best(0.99, 4) >= 3
    assert RoundCost(30, 20, 8.0, 1.0).break_even(4) is None  # verifying as dear as 5 steps never pays
    state = SpecState(SpecConfig(4, 20, 2, cost))
    ks = [_round(state, kept=0) for _ in range(3 * FIRST_BACKOFF + 3)]
    assert ks[0] == PROBE_TOKENS  # the first round measures
    probes = [i for i, k in enumerate(ks) if k]
    assert probes == [0, FIRST_BACKOFF + 1, 3 * FIRST_BACKOFF + 2]  # back-offs of 32 then 64 plain steps
    assert state.acceptance < 0.3  # three rejected probes (older evidence ages while it decodes plainly)
    ks = [_round(state, kept=100) for _ in range(8 * FIRST_BACKOFF)]
    assert ks[-1] >= 3 and all(ks[-8:])  # kept drafts bring it back, every round, more per round
    assert state.acceptance > 0.9
    crowded = SpecState(SpecConfig(4, 20, 2, None))
    crowded.start(room=1000, crowded=True)
    assert crowded.k == 0
    # a round kept whole measures on only while the acceptance half a standard deviation up would pay (one
    # draft pays from 81% kept here): after 1 draft of 1 it may; after 12 of 20 (60%, sd 10%) it may not
    for kept, trials, probes in ((1, 1, True), (12, 20, False)):
        state = SpecState(SpecConfig(4, 20, 2, cost), successes=kept, trials=trials, wait=0, kept_all=True)
        assert cost.best(state.acceptance, 4) == 0 and (cost.best(state.optimistic, 4) > 0) == probes
        state.start(room=1000)
        assert state.k == (PROBE_TOKENS if probes else 0)


def test_adaptive_engine_keeps_full_depths_text_and_drafts_only_probes(mixed_dir):
    """On a tiny model whose LM head outweighs its layers (49,152 x 64 against 6 layers of width 64) drafts
    pay only when almost all are kept, and these are kept about a quarter of the time: only the probe
    rounds draft.
    With more sequences running than speculative_max_batch, none do."""

    async def main():
        adaptive = make_engine(mixed_dir, speculative_adaptive=True)
        full = await asyncio.gather(*(generate(adaptive, p, None) for p in PROMPTS))
        probed = await asyncio.gather(*(generate(adaptive, p, {"num_tokens": 4, "draft_depth": 4}) for p in PROMPTS))
        await assert_clean(adaptive)
        await adaptive.shutdown()
        crowded = make_engine(mixed_dir, speculative_max_batch=1)
        busy = await asyncio.gather(*(generate(crowded, p, {"num_tokens": 4, "draft_depth": 4}) for p in PROMPTS))
        alone = await generate(crowded, PROMPTS[0], {"num_tokens": 4, "draft_depth": 4})
        await crowded.shutdown()
        return full, probed, busy, alone

    full, probed, busy, alone = asyncio.run(main())
    for ref, a, b in zip(full, probed, busy, strict=True):
        assert a["tokens"] == b["tokens"] == ref["tokens"]
        assert 0 < a["usage"].draft_tokens <= 2 * PROBE_TOKENS  # the first round and one after the back-off
    # 5 running, at most 1 may speculate: only the last to finish drafted, at the end
    assert sum(b["usage"].draft_tokens for b in busy) < alone["usage"].draft_tokens


def test_drafts_choose_within_the_draft_vocabulary(mixed_dir):
    """A group's draft_vocab limits what its exit head drafts to the first token ids: the draft is the best
    of those at the draft depth, by the hidden state the draft hands back."""
    groups = load_groups(mixed_dir, [0, 2, 4, 6], [6])
    groups[1].spec = dataclasses.replace(groups[1].spec, draft_vocab=100)

    async def main():
        pipe = pipeline_of(groups)
        await pipe.execute(rows([5, 17, 301], range(3)))
        return await pipe.execute(rows([42], [3], policy=Policy.STATIC, max_depth=4, backfill=Backfill.DRAFT))

    result = asyncio.run(main())
    token = int(result.results.tokens[0])
    logits = groups[1].head.project(result.draft_hidden)
    assert token < 100 and token == int(logits[0, :100].argmax())
    assert int(result.results.exit_layer[0]) == 4


def test_unconfident_drafts_end_the_round(mixed_dir):
    """min_confidence: a draft its head gives less probability ends the round without it (the round verifies
    what was fed, possibly no draft at all); the text stays full depth's, and a stricter threshold drafts
    fewer tokens and has more of them kept."""
    state = SpecState(SpecConfig(3, 4, 2, None, min_confidence=0.5))
    state.start(room=10)
    hidden = torch.zeros(4)
    state.fed_one(hidden, 7, 0.9)
    state.fed_one(hidden, 8, 0.2)  # unconfident: dropped, the round is x1 only
    assert (state.k, state.drafts, state.fed, state.verifying, state.drafting) == (1, [7], 2, True, False)
    state.reset()
    state.start(room=10)
    state.fed_one(hidden, 7, 0.1)  # the first draft already: the round verifies position b alone
    assert (state.k, state.fed, state.verifying) == (0, 1, True)
    assert state.verified(TokenResults.empty(1, 0)) == 0 and state.trials == 0  # nothing measured

    async def main():
        engine = make_engine(mixed_dir)
        full = await asyncio.gather(*(generate(engine, p, None) for p in PROMPTS))
        runs = []
        for confidence in (0.0, 0.6, 1.0):
            spec = {"num_tokens": 4, "draft_depth": 4, "min_confidence": confidence}
            runs.append(await asyncio.gather(*(generate(engine, p, spec) for p in PROMPTS)))
        await assert_clean(engine)
        await engine.shutdown()
        return full, runs

    full, runs = asyncio.run(main())
    for outs in runs:
        assert [o["tokens"] for o in outs] == [r["tokens"] for r in full]
    drafted = [sum(o["usage"].draft_tokens for o in outs) for outs in runs]
    kept = [sum(o["usage"].accepted_tokens for o in outs) for outs in runs]
    assert drafted[0] > drafted[1] > drafted[2] == 0
    assert kept[1] / drafted[1] > kept[0] / drafted[0]


def test_auto_depth_maximises_the_promised_speed_up(mixed_dir):
    """'auto' picks, among the depths with a measured agreement, the one whose best round promises most by
    the cost model (not simply the deepest or the most agreeing); without figures, the deepest exit head."""
    from serving.engine.speculative import auto_depth

    def cost_of(d: int) -> RoundCost:
        return RoundCost(30, d, 8.0, 0.02)

    agreement = {8: 0.3, 16: 0.8, 28: 0.85}
    promise = {d: max(cost_of(d).speedup(a, k) for k in range(1, 5)) for d, a in agreement.items()}
    assert auto_depth(4, [8, 16, 28], agreement, cost_of) == max(promise, key=promise.get) == 16
    assert auto_depth(4, [8, 16, 28], {}, cost_of) == 28

    async def main():
        engine = make_engine(mixed_dir, exit_points=[2, 3, 6])
        out = await generate(engine, PROMPTS[0], {"num_tokens": 2})  # auto, no pack: the deepest head, 3
        await engine.shutdown()
        return out, engine.admission.auto_depth(2)

    out, depth = asyncio.run(main())
    assert depth == 3 and out["usage"].draft_tokens > 0
