"""Exit policies, exit packs (adapters, routers, mapped back-fill maps) on a tiny random Llama."""

from __future__ import annotations

import asyncio

import pytest
import torch

from tests.helpers import full_logprobs, group_kv, hf_model, load_groups, pipeline_of, rows, run
from tests.test_layer_group import _reference_kv
from workers.exit_pack import ExitPack, ExitPackError
from workers.exits import Adapter, ExitCost, ExitHead, Phase
from workers.layers import rms_norm
from workers.model_store import fingerprint
from workers.modes import Backfill, Policy

VOCAB, LAYERS, HIDDEN = 128, 6, 64
POINTS = [2, 3, 4, 5, 6]


def _pack(path, tensors: dict[str, torch.Tensor], **manifest) -> ExitPack:
    return ExitPack(
        manifest={"model": {"name": "tiny", "fingerprint": fingerprint(path)}, "exit_points": POINTS, **manifest},
        tensors=tensors,
    )


def _single_token_max_probs(path, token: int) -> dict[int, float]:
    """Top probability of the exit head at each exit point for one token at position 0 (no cache involved)."""
    probs = {}
    for d in POINTS:
        pipe = pipeline_of(load_groups(path, [0, 3, 6], POINTS))
        out = run(pipe, rows([token], [0], policy=Policy.STATIC, max_depth=d, logprobs=VOCAB))
        assert out.exit_layer.item() == d
        probs[d] = full_logprobs(out, VOCAB).exp().max().item()
    return probs


def test_policies_exit_where_they_should(tiny_llama_dir):
    probs = _single_token_max_probs(tiny_llama_dir, token=17)

    def depth(**kw) -> int:
        pipe = pipeline_of(load_groups(tiny_llama_dir, [0, 3, 6], POINTS))
        return run(pipe, rows([17], [0], **kw)).exit_layer.item()

    assert depth(policy=Policy.NONE, max_depth=2) == LAYERS  # none ignores depth bounds
    assert depth(policy=Policy.STATIC, max_depth=4) == 4
    assert depth(policy=Policy.CONFIDENCE, threshold=0.0, min_depth=3) == 3
    for d in POINTS[:-1]:  # a threshold just at the head's confidence at d exits at the first point reaching it
        tau = probs[d]
        expected = next(p for p in POINTS if probs[p] >= tau or p == LAYERS)
        assert depth(policy=Policy.CONFIDENCE, threshold=tau, min_depth=2) == expected
    # max_depth caps the confidence policy
    assert depth(policy=Policy.CONFIDENCE, threshold=1.5, max_depth=4) == 4


def test_adapter_from_pack_changes_the_exit_head(tiny_llama_dir):
    gen = torch.Generator().manual_seed(5)
    w, b = 0.1 * torch.randn(HIDDEN, HIDDEN, generator=gen), 0.1 * torch.randn(HIDDEN, generator=gen)
    pack = _pack(tiny_llama_dir, {"adapter.2.weight": w, "adapter.2.bias": b})
    (g0,) = load_groups(tiny_llama_dir, [0, 3], [2, 3], pack=pack)
    r = rows([5, 9, 11], [0, 1, 2], policy=Policy.STATIC, max_depth=2, logprobs=VOCAB, sample_all=True)
    result, continuing = g0.forward(r)
    h_exit = continuing.skipped_hidden
    model = hf_model(tiny_llama_dir)
    with torch.no_grad():
        adapted = h_exit + h_exit @ w.T + b
        logits = rms_norm(adapted, model.model.norm.weight, model.config.rms_norm_eps) @ model.lm_head.weight.T
    assert torch.allclose(full_logprobs(result.results, VOCAB), torch.log_softmax(logits, -1), atol=1e-4)
    # without the adapter the head is different
    (plain,) = load_groups(tiny_llama_dir, [0, 3], [2, 3])
    other, _ = plain.forward(r)
    assert not torch.allclose(full_logprobs(other.results, VOCAB), full_logprobs(result.results, VOCAB), atol=1e-3)


@pytest.mark.parametrize("bias,expected", [(20.0, 3), (-20.0, LAYERS)])
def test_learned_router_plugs_in(tiny_llama_dir, bias, expected):
    """A router whose score is ~1 exits at the first point past min_depth; ~0 never exits early."""
    tensors = {}
    for d in POINTS:
        tensors |= {
            f"router.{d}.w1": torch.zeros(8, HIDDEN),
            f"router.{d}.b1": torch.zeros(8),
            f"router.{d}.w2": torch.zeros(1, 8),
            f"router.{d}.b2": torch.full((1,), bias),
        }
    pack = _pack(tiny_llama_dir, tensors, router={"features": ["hidden"]})
    pipe = pipeline_of(load_groups(tiny_llama_dir, [0, 3, 6], POINTS, pack=pack))
    out = run(pipe, rows([3, 4, 5], [0, 1, 2], policy=Policy.LEARNED, threshold=0.5, min_depth=3))
    assert out.exit_layer.tolist() == [expected] * 3


def test_learned_policy_without_router_is_refused(tiny_llama_dir):
    pipe = pipeline_of(load_groups(tiny_llama_dir, [0, 6], POINTS))
    with pytest.raises(ExitPackError, match="needs a router"):
        run(pipe, rows([3], [0], policy=Policy.LEARNED))


def _exit_at_2_then_backfill(path, backfill: Backfill, pack=None):
    """8 tokens exit at depth 2; returns (groups, exit hidden states) after every back-fill landed."""
    g0, g1 = load_groups(path, [0, 3, 6], POINTS, pack=pack)
    ids = torch.randint(0, VOCAB, (8,), generator=torch.Generator().manual_seed(6))
    r = rows(ids, torch.arange(8), policy=Policy.STATIC, max_depth=2, backfill=backfill)
    _, continuing = g0.forward(r)
    g1.forward(continuing)  # group 1 back-fills the 8 rows from their exit hidden states
    return (g0, g1), continuing.skipped_hidden


@pytest.mark.parametrize("maps", ["none", "identity"])
def test_mapped_backfill_with_identity_maps_is_decoupled(tiny_llama_dir, maps):
    """No map, or maps that predict each layer's input as the exit hidden state itself."""
    identity = {}
    for layer in range(3, LAYERS):
        identity |= {f"map.2.{layer}.down": torch.zeros(4, HIDDEN), f"map.2.{layer}.up": torch.zeros(HIDDEN, 4),
                     f"map.2.{layer}.bias": torch.zeros(HIDDEN)}  # fmt: skip
    pack = _pack(tiny_llama_dir, identity) if maps == "identity" else None
    mapped, _ = _exit_at_2_then_backfill(tiny_llama_dir, Backfill.MAPPED, pack)
    decoupled, _ = _exit_at_2_then_backfill(tiny_llama_dir, Backfill.DECOUPLED)
    for a, b in zip(mapped, decoupled, strict=True):
        assert torch.allclose(a.cache.k, b.cache.k, atol=1e-6) and torch.allclose(a.cache.v, b.cache.v, atol=1e-6)


def test_mapped_backfill_uses_the_packs_maps(tiny_llama_dir):
    gen = torch.Generator().manual_seed(7)
    maps = {}
    for layer in range(2, LAYERS):
        maps[f"map.2.{layer}.down"] = 0.3 * torch.randn(8, HIDDEN, generator=gen)
        maps[f"map.2.{layer}.up"] = 0.3 * torch.randn(HIDDEN, 8, generator=gen)
        maps[f"map.2.{layer}.bias"] = 0.2 * torch.randn(HIDDEN, generator=gen)
    pack = _pack(tiny_llama_dir, maps)
    groups, h_exit = _exit_at_2_then_backfill(tiny_llama_dir, Backfill.MAPPED, pack)
    model = hf_model(tiny_llama_dir)
    with torch.no_grad():
        for layer in range(2, LAYERS):
            group = groups[0] if layer < 3 else groups[1]
            down, up, bias = (maps[f"map.2.{layer}.{part}"] for part in ("down", "up", "bias"))
            predicted_input = h_exit + h_exit @ down.T @ up.T + bias
            k_ref, v_ref = _reference_kv(model, layer, predicted_input, torch.arange(8))
            k, v = group_kv(group, layer, slot=0, length=8)
            assert torch.allclose(k, k_ref, atol=1e-4) and torch.allclose(v, v_ref, atol=1e-4), f"layer {layer}"


def test_pack_round_trip_and_identity_check(tiny_llama_dir, tiny_qwen2_dir, tmp_path):
    pack = _pack(tiny_llama_dir, {"adapter.2.weight": torch.zeros(HIDDEN, HIDDEN)})
    pack.save(tmp_path / "pack")
    loaded = ExitPack.load(tmp_path / "pack", fingerprint(tiny_llama_dir))
    assert loaded.exit_points == POINTS and torch.equal(loaded.tensors["adapter.2.weight"], torch.zeros(HIDDEN, HIDDEN))
    with pytest.raises(ExitPackError, match="made for another model"):
        ExitPack.load(tmp_path / "pack", fingerprint(tiny_qwen2_dir))
    with pytest.raises(ExitPackError, match="not an exit pack"):
        ExitPack.load(tmp_path)


def test_exit_cost_weighs_the_saving_against_the_token_and_the_harm():
    cost = ExitCost(30, weight=1.0, harm={"decoupled": {8: 0.5}})
    p = torch.tensor([0.9, 0.9, 0.9])
    modes = torch.tensor([Backfill.EXACT, Backfill.MAPPED, Backfill.DECOUPLED])
    at_8 = cost.score(p, 8, modes)
    w = 22 / 30
    assert torch.allclose(at_8[:2], torch.tensor(0.9 * w / (0.9 * w + 0.1)))  # no harm measured: none counted
    assert torch.allclose(at_8[2], torch.tensor(0.9 * w / (0.9 * w + 0.1 + 0.5)))  # harmful back-fill: lower
    assert bool((cost.score(p, 28, modes) < at_8[0]).all())  # less left to save deeper: a higher bar
    assert torch.allclose(ExitCost(30, weight=0.0).score(p, 8, modes), p)  # weight 0: the router's p itself
    scores = cost.score(torch.linspace(0, 1, 11), 8, torch.full((11,), int(Backfill.MAPPED)))
    assert bool((scores.diff() > 0).all())  # a more confident router never scores lower


def test_one_lm_head_and_one_backfill_per_group_for_rows_exiting_at_several_points(tiny_llama_dir, monkeypatch):
    """Decoding rows that exit at five points (2, 3 in group 0; 4, 5, 6 in group 1) pay one LM head per group
    and one back-fill product per group for their own exits, not one per exit point; each row's token and
    cached K/V are the ones it gets alone."""
    import workers.layer_group as lg
    from workers.exits import ExitHead

    heads: list[int] = []  # rows per LM head call
    real = ExitHead.project
    monkeypatch.setattr(ExitHead, "project", lambda self, h, vocab=None: heads.append(len(h)) or real(self, h, vocab))
    backfills: list[int] = []  # rows per back-fill product
    real_kv = lg.decoupled_kv
    monkeypatch.setattr(lg, "decoupled_kv", lambda h, *a: backfills.append(len(h)) or real_kv(h, *a))
    depths = torch.tensor([2, 3, 4, 5, 6, 2, 4, 6])
    # eight one-token sequences, each in its own blocks
    r = rows(torch.arange(8) + 7, torch.zeros(8), slot=torch.arange(8), policy=Policy.STATIC, max_depth=depths,
             sample_all=True)  # fmt: skip
    groups = load_groups(tiny_llama_dir, [0, 3, 6], POINTS, slots=8)
    together = run(pipeline_of(groups), r)
    assert together.exit_layer.tolist() == depths.tolist()
    assert heads == [3, 5]  # group 0: the rows exiting at 2 and 3; group 1: those at 4, 5 and 6
    # group 0: the two rows exiting at 2; group 1: the three that exited in group 0, then the three at 4 and 5
    assert backfills == [2, 3, 3]

    for i in range(8):
        alone = load_groups(tiny_llama_dir, [0, 3, 6], POINTS, slots=8)
        assert run(pipeline_of(alone), r.select(torch.tensor([i]))).tokens.item() == together.tokens[i].item()
        for layer in range(LAYERS):
            g = layer // 3
            k, v = group_kv(groups[g], layer, slot=i, length=1)
            k_alone, v_alone = group_kv(alone[g], layer, slot=i, length=1)
            assert torch.allclose(k, k_alone, atol=1e-5) and torch.allclose(v, v_alone, atol=1e-5), (i, layer)


def test_a_pack_with_every_head_kind_saves_loads_and_serves(tiny_llama_dir, tmp_path):
    """Exit points 2-5 with a low-rank, a full-rank linear (its matrix stored in float8, as the shipped pack's),
    an MLP and the identity head: saved, loaded and served, each exit's log-probabilities are the head's own
    formula on the full model's hidden state."""
    gen = torch.Generator().manual_seed(7)

    def rand(*shape) -> torch.Tensor:
        return 0.1 * torch.randn(*shape, generator=gen)

    mlp = {"weight": rand(HIDDEN, HIDDEN), "bias": rand(HIDDEN), "w1": rand(16, HIDDEN), "b1": rand(16),
           "w2": rand(HIDDEN, 16)}  # fmt: skip
    heads = {2: {"down": rand(4, HIDDEN), "up": rand(HIDDEN, 4), "bias": rand(HIDDEN)},
             3: {"weight": rand(HIDDEN, HIDDEN).to(torch.float8_e4m3fn), "bias": rand(HIDDEN).half()}, 4: mlp,
             5: {}}  # fmt: skip
    tensors = {f"adapter.{d}.{k}": v for d, t in heads.items() for k, v in t.items()}
    _pack(tiny_llama_dir, tensors, heads={"2": "low_rank", "3": "linear", "4": "mlp", "5": "identity"}).save(
        tmp_path / "pack"
    )
    pack = ExitPack.load(tmp_path / "pack", fingerprint(tiny_llama_dir))
    assert pack.manifest["version"] == 2 and pack.tensors["adapter.3.weight"].dtype == torch.float8_e4m3fn
    model = hf_model(tiny_llama_dir)
    tokens = [5, 9, 11, 40]
    with torch.no_grad():
        hidden = model.model(torch.tensor([tokens]), output_hidden_states=True).hidden_states
    eps = model.config.rms_norm_eps

    def expected(d: int) -> torch.Tensor:
        h, t = hidden[d][0], {k: v.float() for k, v in heads[d].items()}
        if "down" in t:
            out = h + (h @ t["down"].T) @ t["up"].T + t["bias"]
        elif "w1" in t:
            scale = (h.pow(2).mean(-1, keepdim=True) + eps).sqrt()
            mlp_out = scale * (torch.nn.functional.gelu((h / scale) @ t["w1"].T + t["b1"]) @ t["w2"].T)
            out = h + h @ t["weight"].T + mlp_out + t["bias"]
        elif t:
            out = h + h @ t["weight"].T + t["bias"]
        else:
            out = h
        return torch.log_softmax(rms_norm(out, model.model.norm.weight, eps) @ model.lm_head.weight.T, -1)

    for d in heads:
        pipe = pipeline_of(load_groups(tiny_llama_dir, [0, 3, 6], POINTS, pack=pack))
        r = rows(tokens, range(4), policy=Policy.STATIC, max_depth=d, backfill=Backfill.EXACT, logprobs=VOCAB,
                 sample_all=True)  # fmt: skip
        out = run(pipe, r)
        assert (out.exit_layer == d).all()
        assert torch.allclose(full_logprobs(out, VOCAB), expected(d), atol=1e-4), d


def test_an_old_format_pack_still_loads_and_an_unknown_one_is_refused(tiny_llama_dir, tmp_path):
    """Version 1 (low-rank or linear adapters, no "heads" in the manifest) loads and serves as before."""
    w = 0.1 * torch.randn(HIDDEN, HIDDEN, generator=torch.Generator().manual_seed(3))
    _pack(tiny_llama_dir, {"adapter.2.weight": w}).save(tmp_path / "v1")
    manifest = tmp_path / "v1" / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"version": 2', '"version": 1'))
    old = ExitPack.load(tmp_path / "v1", fingerprint(tiny_llama_dir))
    assert old.manifest["version"] == 1 and "heads" not in old.manifest
    pipe = pipeline_of(load_groups(tiny_llama_dir, [0, 3, 6], POINTS, pack=old))
    r = rows([5, 9], [0, 1], policy=Policy.STATIC, max_depth=2, logprobs=VOCAB, sample_all=True)
    out, plain = run(pipe, r), run(pipeline_of(load_groups(tiny_llama_dir, [0, 3, 6], POINTS)), r)
    assert not torch.allclose(full_logprobs(out, VOCAB), full_logprobs(plain, VOCAB), atol=1e-3)  # the adapter acts
    old.save(tmp_path / "again")  # re-saving an old pack keeps its version
    assert ExitPack.load(tmp_path / "again").manifest["version"] == 1
    manifest.write_text(manifest.read_text().replace('"version": 1', '"version": 3'))
    with pytest.raises(ExitPackError, match="of version 1 or 2"):
        ExitPack.load(tmp_path / "v1")


def _routers(bias: float, prefix: str = "") -> dict[str, torch.Tensor]:
    """Routers at every early exit point whose score is ~1 (bias > 0: exit) or ~0 (stay), whatever the row."""
    router = {"w1": torch.zeros(8, HIDDEN), "b1": torch.zeros(8), "w2": torch.zeros(1, 8), "b2": torch.full((1,), bias)}
    return {f"{prefix}router.{d}.{k}": v.clone() for d in POINTS[:-1] for k, v in router.items()}


def test_prompt_and_decode_heads_and_routers_act_on_their_own_phases(tiny_llama_dir):
    """Rows of both phases in one batch: prompt rows take the prompt router and adapter, generated tokens'
    rows the others; without prompt ones, prompt rows take the generated tokens'."""
    w = 0.1 * torch.randn(HIDDEN, HIDDEN, generator=torch.Generator().manual_seed(11))
    phases = torch.tensor([True, True, False, False])
    r = rows([3, 4, 5, 6], [0, 1, 2, 3], policy=Policy.LEARNED, threshold=0.5, min_depth=3, prompt=phases)
    pack = _pack(tiny_llama_dir, _routers(20.0) | _routers(-20.0, "prompt_"), router={"features": ["hidden"]})
    out = run(pipeline_of(load_groups(tiny_llama_dir, [0, 3, 6], POINTS, pack=pack)), r)
    assert out.exit_layer.tolist() == [LAYERS, LAYERS, 3, 3]
    pack = _pack(tiny_llama_dir, _routers(-20.0) | _routers(20.0, "prompt_"), router={"features": ["hidden"]})
    out = run(pipeline_of(load_groups(tiny_llama_dir, [0, 3, 6], POINTS, pack=pack)), r)
    assert out.exit_layer.tolist() == [3, 3, LAYERS, LAYERS]
    pack = _pack(tiny_llama_dir, _routers(20.0), router={"features": ["hidden"]})  # no prompt routers
    out = run(pipeline_of(load_groups(tiny_llama_dir, [0, 3, 6], POINTS, pack=pack)), r)
    assert out.exit_layer.tolist() == [3, 3, 3, 3]

    # A prompt adapter changes prompt rows' exit head only.
    static = rows([3, 4, 5, 6], range(4), policy=Policy.STATIC, max_depth=2, backfill=Backfill.EXACT,
                  logprobs=VOCAB, sample_all=True, prompt=phases)  # fmt: skip
    plain = full_logprobs(run(pipeline_of(load_groups(tiny_llama_dir, [0, 3, 6], POINTS)), static), VOCAB)
    pack = _pack(tiny_llama_dir, {"prompt_adapter.2.weight": w})
    adapted = full_logprobs(run(pipeline_of(load_groups(tiny_llama_dir, [0, 3, 6], POINTS, pack=pack)), static), VOCAB)
    assert torch.allclose(adapted[2:], plain[2:], atol=1e-5)
    assert not torch.allclose(adapted[:2], plain[:2], atol=1e-3)

    # Batches of one phase take one adapter (the other's product is not computed), mixed ones both.
    decode_w = 0.1 * torch.randn(HIDDEN, HIDDEN, generator=torch.Generator().manual_seed(12))
    one = Phase(adapters={2: Adapter(weight=decode_w)})
    other = Phase(adapters={2: Adapter(weight=w)})
    head = ExitHead(torch.ones(HIDDEN), torch.randn(VOCAB, HIDDEN), 1e-6, one, other, ExitCost(LAYERS))
    h = torch.randn(4, HIDDEN)
    assert torch.allclose(head.adapt(h, 2, torch.ones(4, dtype=torch.bool)), h + h @ w.T)
    assert torch.allclose(head.adapt(h, 2, torch.zeros(4, dtype=torch.bool)), h + h @ decode_w.T)
    mixed = head.adapt(h, 2, phases)
    assert torch.allclose(mixed, torch.cat([h[:2] + h[:2] @ w.T, h[2:] + h[2:] @ decode_w.T]), atol=1e-6)


def test_the_scheduler_marks_prompt_rows(tiny_chat_dir, tmp_path):
    """Through the engine: with a prompt router that never exits and a generated tokens' router that
    always does, a request's prompt runs at full depth and its generated tokens exit; teacher forcing takes
    generated tokens' routers from `exit_from` on, or prompt routers with `as_prompt`."""
    from serving.engine import Engine
    from serving.engine.config import EngineConfig

    tensors = _routers(20.0) | _routers(-20.0, "prompt_")
    manifest = {"model": {"name": "tiny", "fingerprint": fingerprint(tiny_chat_dir)}, "exit_points": POINTS}
    ExitPack(manifest | {"router": {"features": ["hidden"]}}, tensors).save(tmp_path / "pack")
    engine = Engine.local(EngineConfig(model=str(tiny_chat_dir), exit_pack=str(tmp_path / "pack"), max_model_len=128,
                                       min_exit_depth=3))  # fmt: skip
    learned = {"policy": "learned", "threshold": 0.5, "prefill": {"policy": "learned", "threshold": 0.5}}

    async def main():
        try:
            last = None
            async for out in engine.generate("The quick brown fox", {"max_tokens": 6, "ignore_eos": True}, learned):
                last = out
            ids = engine.chat_prompt([{"role": "user", "content": "Hello there"}])
            split = await engine.teacher_forced([ids], learned, exit_from=[4])
            as_prompt = await engine.teacher_forced([ids], learned, exit_from=[4], as_prompt=True)
            return last.usage, split[0].exit_layer, as_prompt[0].exit_layer
        finally:
            await engine.shutdown()

    usage, split, as_prompt = asyncio.run(main())
    assert usage.prompt_layers_computed == usage.prompt_layers_total  # prompt rows stayed
    assert usage.layers_computed - usage.prompt_layers_computed == 5 * 3  # 5 generated tokens fed, each exits at 3
    assert split[:4].tolist() == [LAYERS] * 4 and (split[4:] == 3).all()
    assert (as_prompt == LAYERS).all()
