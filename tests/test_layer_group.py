"""Layer groups on tiny random models against Hugging Face's own forward: logits, KV caches, back-fill."""

from __future__ import annotations

import asyncio

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from tests.helpers import (
    full_logprobs,
    group_kv,
    hf_cache,
    hf_model,
    load_groups,
    pipeline_of,
    rows,
    run,
    slot_table,
)
from workers.kv_cache import KVHoleError
from workers.modes import Backfill, Policy
from workers.protocol import Continuing, GroupSpec, Rows, SkippedRows

VOCAB = 128
LAYERS = 6


def _hf_logprobs(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(ids[None]).logits[0].float(), dim=-1)


@pytest.mark.parametrize("family", ["tiny_llama_dir", "tiny_qwen2_dir", "tiny_mistral_dir", "tiny_llama3_dir"])
@pytest.mark.parametrize("bounds", [[0, 6], [0, 2, 4, 6]])
def test_full_depth_logits_match_hf(request, family, bounds):
    """Prefill of every position, then token-by-token decoding: full distributions match HF within 1e-4."""
    path = request.getfixturevalue(family)
    model = hf_model(path)
    ids = torch.randint(0, VOCAB, (16,), generator=torch.Generator().manual_seed(0))
    reference = _hf_logprobs(model, ids)
    pipe = pipeline_of(load_groups(path, bounds, [LAYERS]))

    prefill = run(pipe, rows(ids, torch.arange(16), slot=1, logprobs=VOCAB, sample_all=True))
    assert torch.allclose(full_logprobs(prefill, VOCAB), reference, atol=1e-4)
    assert prefill.exit_layer.tolist() == [LAYERS] * 16

    run(pipe, rows(ids[:9], torch.arange(9), slot=2))
    for t in range(9, 16):
        step = run(pipe, rows(ids[t : t + 1], [t], slot=2, logprobs=VOCAB))
        assert torch.allclose(full_logprobs(step, VOCAB)[0], reference[t], atol=1e-4), f"position {t}"


def test_mixed_batch_of_prefill_and_decode_rows(tiny_qwen2_dir):
    """Rows of several sequences in one call, in scrambled order: each matches HF on its own sequence."""
    model = hf_model(tiny_qwen2_dir)
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randint(0, VOCAB, (10,), generator=gen), torch.randint(0, VOCAB, (7,), generator=gen)
    pipe = pipeline_of(load_groups(tiny_qwen2_dir, [0, 3, 6], [LAYERS]))
    run(pipe, rows(a[:9], torch.arange(9), slot=0))  # sequence a is decoding; b arrives as a prompt
    batch = Rows.cat(
        [rows(a[9:], [9], slot=0, logprobs=VOCAB), rows(b, torch.arange(7), slot=3, logprobs=VOCAB, sample_all=True)]
    )
    order = torch.randperm(len(batch), generator=gen)
    result = run(pipe, batch.select(order))
    got = torch.empty(len(batch), VOCAB)
    got[order] = full_logprobs(result, VOCAB)
    assert torch.allclose(got[0], _hf_logprobs(model, a)[9], atol=1e-4)
    assert torch.allclose(got[1:], _hf_logprobs(model, b), atol=1e-4)


@pytest.mark.parametrize("bounds", [[0, 6], [0, 2, 4, 6]])
def test_exact_backfill_reproduces_the_full_cache(tiny_llama_dir, bounds):
    """Random forced exits at every token, prefill and decode, with exact back-fill: every group's cache
    equals the full model's cache."""
    model = hf_model(tiny_llama_dir)
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, VOCAB, (20,), generator=gen)
    groups = load_groups(tiny_llama_dir, bounds, list(range(1, LAYERS + 1)))
    pipe = pipeline_of(groups)

    def depths(n: int) -> torch.Tensor:
        return torch.randint(1, LAYERS + 1, (n,), generator=gen)

    seen = []
    out = run(
        pipe, rows(ids[:12], torch.arange(12), policy=Policy.STATIC, max_depth=depths(12), backfill=Backfill.EXACT)
    )
    seen += out.exit_layer.tolist()
    for t in range(12, 20):
        out = run(pipe, rows(ids[t : t + 1], [t], policy=Policy.STATIC, max_depth=depths(1), backfill=Backfill.EXACT))
        seen += out.exit_layer.tolist()
    assert len(set(seen)) >= 4, "the exits should be spread over the depths"
    reference = hf_cache(model, ids)
    for group in groups:
        for layer in range(group.spec.start, group.spec.end):
            k, v = group_kv(group, layer, slot=0, length=20)
            assert torch.allclose(k, reference.layers[layer].keys[0], atol=1e-4), f"K of layer {layer}"
            assert torch.allclose(v, reference.layers[layer].values[0], atol=1e-4), f"V of layer {layer}"


def _reference_kv(model, layer: int, layer_input: torch.Tensor, positions: torch.Tensor):
    """K, V of one layer computed straight from its input, with HF's own modules: [kv_heads, n, head_dim]."""
    attn = model.model.layers[layer].self_attn
    x = model.model.layers[layer].input_layernorm(layer_input)
    head_dim = attn.head_dim
    k = attn.k_proj(x).view(1, -1, model.config.num_key_value_heads, head_dim).transpose(1, 2)
    v = attn.v_proj(x).view(1, -1, model.config.num_key_value_heads, head_dim).transpose(1, 2)
    cos, sin = model.model.rotary_emb(x[None], positions[None])
    _, k = apply_rotary_pos_emb(k, k, cos, sin)
    return k[0], v[0]


@pytest.mark.parametrize("family", ["tiny_llama_dir", "tiny_qwen2_dir"])
def test_decoupled_kv_equals_per_layer_reference(request, family, monkeypatch):
    """Tokens exit at depth 2: the skipped layers' K/V in this group (same call) and in the next group (a
    back-fill call) equal k_l, v_l = rope(W_k norm_l(h_e)), W_v norm_l(h_e), computed layer by layer; and
    each group's back-fill is one batched product over all its skipped layers and rows."""
    import workers.layer_group as lg

    path = request.getfixturevalue(family)
    model = hf_model(path)
    g0, g1 = load_groups(path, [0, 3, 6], [2, 3, 6])
    calls = []
    real = lg.decoupled_kv
    monkeypatch.setattr(lg, "decoupled_kv", lambda *a, **k: calls.append(a[2].shape) or real(*a, **k))

    ids = torch.randint(0, VOCAB, (8,), generator=torch.Generator().manual_seed(3))
    positions = torch.arange(8)
    result, continuing = g0.forward(rows(ids, positions, policy=Policy.STATIC, max_depth=2))
    assert result.results.exit_layer.tolist() == [2] * 8 and continuing.hidden.shape[0] == 0
    assert calls == [torch.Size([1, 2 * g0.arch.kv_size, g0.arch.hidden_size])]  # layer 2, all 8 rows at once
    carry = continuing.skipped_hidden  # the 8 exit hidden states, which group 1 back-fills from
    assert continuing.skipped.positions.tolist() == positions.tolist() and len(continuing.rows) == 0
    g1.forward(continuing)
    assert calls[1] == torch.Size([3, 2 * g0.arch.kv_size, g0.arch.hidden_size])  # layers 3-5 in one bmm

    with torch.no_grad():
        for group, layers in ((g0, [2]), (g1, [3, 4, 5])):
            for layer in layers:
                k_ref, v_ref = _reference_kv(model, layer, carry, positions)
                k, v = group_kv(group, layer, slot=0, length=8)
                assert torch.allclose(k, k_ref, atol=1e-5) and torch.allclose(v, v_ref, atol=1e-5), f"layer {layer}"


def test_missing_backfill_is_a_hole_not_silent(tiny_llama_dir):
    """A deeper group asked to run a position whose predecessors were never back-filled refuses loudly."""
    g0, g1 = load_groups(tiny_llama_dir, [0, 3, 6], [2, 6])
    ids = torch.arange(6)
    policy = torch.tensor([Policy.STATIC] * 5 + [Policy.NONE])
    result, continuing = g0.forward(rows(ids, torch.arange(6), policy=policy, max_depth=2))
    assert result.results.exit_layer.tolist() == [2] * 5  # five rows exited in group 0; the last one continues
    lost = Continuing(continuing.rows, continuing.hidden, SkippedRows.empty(), continuing.hidden[:0])
    with pytest.raises(KVHoleError, match="no K/V at position 0"):
        g1.forward(lost)  # the back-fill of positions 0-4 was "lost"

    # The same through a pipeline whose first group "loses" the back-fills it hands on.
    groups = load_groups(tiny_llama_dir, [0, 3, 6], [2, 6])
    real = groups[0].forward

    def lossy(batch, owed=None):
        result, out = real(batch, owed)
        return result, Continuing(out.rows, out.hidden, SkippedRows.empty(), out.hidden[:0])

    groups[0].forward = lossy
    with pytest.raises(KVHoleError, match="layer 3: the sequence in KV block 0 has no K/V at position 0"):
        run(pipeline_of(groups), rows(ids, torch.arange(6), policy=policy, max_depth=2))


def test_backfill_off_the_critical_path_gives_the_same_result(tiny_llama_dir, monkeypatch):
    """Positions 0-9 exit in group 0 over several steps, and the pipeline does not wait for the deeper
    groups' back-fills; position 10 then goes full depth: the same as when every back-fill is awaited.
    (OWED_CALLS 1: the groups no row reaches are called every step, off the critical path.)"""
    import serving.engine.pipeline as pipeline_module

    monkeypatch.setattr(pipeline_module, "OWED_CALLS", 1)
    ids = torch.randint(0, VOCAB, (11,), generator=torch.Generator().manual_seed(4))

    async def main(sync: bool):
        pipe = pipeline_of(load_groups(tiny_llama_dir, [0, 3, 6], [2, 6]), sync_backfill=sync)
        await pipe.execute(rows(ids[:6], torch.arange(6), policy=Policy.STATIC, max_depth=2))
        unawaited = len(pipe._trailing)
        for t in range(6, 10):
            await pipe.execute(rows(ids[t : t + 1], [t], policy=Policy.STATIC, max_depth=2))
        last = await pipe.execute(rows(ids[10:], [10], logprobs=VOCAB))
        await pipe.drain()
        return unawaited, full_logprobs(last.results, VOCAB)

    (unawaited, off_path), (awaited, synchronous) = asyncio.run(main(False)), asyncio.run(main(True))
    assert unawaited == 1 and awaited == 0  # group 1 was still back-filling when the step returned
    assert torch.allclose(off_path, synchronous, atol=1e-6)


def test_loads_only_its_own_layers(tiny_llama_dir, monkeypatch):
    """A group reads its layers, plus embeddings if first, plus final norm and (tied) LM head if it has exits
    or is not the last (speculative drafts exit at its end)."""
    import workers.layer_group as lg

    read: set[str] = set()
    real = lg.load_tensors
    monkeypatch.setattr(lg, "load_tensors", lambda *a: read.update(out := real(*a)) or out)

    def loaded(start: int, end: int, points: tuple[int, ...]) -> tuple[set[str], set[str]]:
        read.clear()
        lg.LayerGroup.load(tiny_llama_dir, GroupSpec(start, end, points, 16, num_blocks=2))
        layers = {n.split(".")[2] for n in read if n.startswith("model.layers.")}
        return layers, {n for n in read if not n.startswith("model.layers.")}

    head = {"model.embed_tokens.weight", "model.norm.weight"}
    assert loaded(2, 4, ()) == ({"2", "3"}, head)
    assert loaded(0, 2, ()) == ({"0", "1"}, head)
    assert loaded(4, 6, (6,)) == ({"4", "5"}, {"model.embed_tokens.weight", "model.norm.weight"})


@pytest.mark.parametrize("backfill", [Backfill.DECOUPLED, Backfill.EXACT])
def test_owed_backfills_in_one_call_equal_one_call_each(tiny_llama_dir, backfill):
    """Outputs a group was owed while no row reached it (a prompt chunk and three decoding steps that all
    exited earlier) back-filled in one call leave the same K/V as one call each."""
    g0, one_each = load_groups(tiny_llama_dir, [0, 3, 6], [2, 6])
    _, at_once = load_groups(tiny_llama_dir, [0, 3, 6], [2, 6])
    ids = torch.randint(0, VOCAB, (7,), generator=torch.Generator().manual_seed(5))
    steps = [(ids[:4], torch.arange(4))] + [(ids[t : t + 1], [t]) for t in range(4, 7)]
    outputs = []
    for token_ids, positions in steps:
        result, out = g0.forward(rows(token_ids, positions, policy=Policy.STATIC, max_depth=2, backfill=backfill))
        assert set(result.results.exit_layer.tolist()) == {2} and len(out.rows) == 0
        outputs.append(out)
        one_each.forward(out)
    at_once.forward(outputs[-1], outputs[:-1])
    for layer in (3, 4, 5):
        k1, v1 = group_kv(one_each, layer, slot=0, length=7)
        k2, v2 = group_kv(at_once, layer, slot=0, length=7)
        assert torch.allclose(k1, k2, atol=1e-5) and torch.allclose(v1, v2, atol=1e-5), f"layer {layer}"
    assert one_each.cache.occupied() == at_once.cache.occupied() != []
    with pytest.raises(ValueError, match="carries rows"):
        at_once.forward(outputs[0], [g0.forward(rows(ids[:1], [0], slot=1))[1]])  # owed with a row: refused


def test_a_group_no_row_reaches_is_called_with_what_it_owes_later(tiny_llama_dir, monkeypatch):
    """Static depth 2 in three groups: the groups past the exit get no call per step. What they owe goes
    with the next batch that reaches them (a full-depth sequence joining), or every OWED_CALLS steps, or
    before a free; their K/V then equal a pipeline that calls every group every step."""
    import serving.engine.pipeline as pipeline_module

    monkeypatch.setattr(pipeline_module, "OWED_CALLS", 4)
    bounds, points = [0, 2, 4, 6], [2, 4, 6]
    deferring, reference = pipeline_of(load_groups(tiny_llama_dir, bounds, points)), None
    reference = pipeline_of(load_groups(tiny_llama_dir, bounds, points), sync_backfill=True)
    calls = [0, 0, 0]
    for g, handle in enumerate(deferring.groups):
        real = handle.forward
        handle.forward = lambda batch, owed, real=real, g=g: calls.__setitem__(g, calls[g] + 1) or real(batch, owed)

    ids = torch.randint(0, VOCAB, (12,), generator=torch.Generator().manual_seed(6))
    static = {"policy": Policy.STATIC, "max_depth": 2}

    async def main():
        results = {}
        for name, pipe in (("deferring", deferring), ("reference", reference)):
            got = [await pipe.execute(rows(ids[:4], torch.arange(4), **static))]
            for t in range(4, 10):  # six decoding steps of sequence 0, all exiting in group 0
                got.append(await pipe.execute(rows(ids[t : t + 1], [t], **static)))
            # sequence 1 at full depth joins: its batch reaches every group
            joined = Rows.cat([rows(ids[10:11], [10], **static), rows(ids[:3], [0, 1, 2], slot=1)])
            got.append(await pipe.execute(joined))
            await pipe.drain()
            results[name] = [r.results for r in got]
        return results

    results = asyncio.run(main())
    # group 0 every batch (8); group 1 once four steps were owed, and with the full-depth batch; group 2
    # only with the full-depth batch (group 1's first call's output went with it)
    assert calls == [8, 2, 1]
    for a, b in zip(results["deferring"], results["reference"], strict=True):
        assert a.tokens.tolist() == b.tokens.tolist() and a.exit_layer.tolist() == b.exit_layer.tolist()
    for g in (1, 2):
        ours, theirs = deferring.groups[g].group, reference.groups[g].group
        for layer in range(bounds[g], bounds[g + 1]):
            for slot, length in ((0, 11), (1, 3)):
                k1, v1 = group_kv(ours, layer, slot, length)
                k2, v2 = group_kv(theirs, layer, slot, length)
                assert torch.allclose(k1, k2, atol=1e-5) and torch.allclose(v1, v2, atol=1e-5), (layer, slot)

    async def free_sequence_0():
        await pipeline_module.Pipeline.confirm(deferring.free(slot_table(0)))

    for t in range(11, 13):  # two more owed steps, then a free: they land first, then the blocks clear
        asyncio.run(deferring.execute(rows(ids[t - 1 : t], [t], **static)))
    asyncio.run(free_sequence_0())
    assert calls == [10, 3, 2]
