"""Exit calibration and evaluation end to end on a tiny random Llama (with the real tokenizer), through the
`adept calibrate` and `adept eval` commands; and the shipped pack on the real default model."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import json
import shutil

import pytest
import torch

from serving.cli import main
from serving.engine import Engine
from serving.engine.config import EngineConfig
from serving.engine.exceptions import RequestError
from serving.quality.continuations import Traffic, self_generated
from serving.quality.evaluation import teacher_forced
from workers.calibration import HEAD_KINDS, CalibrationSettings, Window, calibrate, head_cost
from workers.exit_pack import SHIPPED, VERSION, ExitPack, ExitPackError, load_pack
from workers.model_store import DEFAULT_MODEL, fingerprint, load_config, load_tokenizer

POINTS = "2,3,4,5"
# Plain English, long enough for a few thousand tokens; calibration on a random model needs no meaning.
TEXT = "\n".join(
    f"Line {i}: the {w} river runs past {i % 7} old mills and {i % 5} bridges before it reaches the sea."
    for i, w in enumerate(["quiet", "broad", "cold", "slow", "bright", "narrow"] * 60)
)


def adept(*args: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main([str(a) for a in args])
    return code, out.getvalue()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text(TEXT)
    return path


def calibrate_tiny(model, corpus, out) -> None:
    code, _ = adept(
        "calibrate", "--model", model, "--corpus", corpus, "--holdout", 0.3, "--exit-points", POINTS,
        "--max-tokens", 3000, "--window", 64, "--steps", 40, "--batch-size", 128, "--lr", 3e-3,
        "--adapter-rank", 16, "--map-rank", 8, "--router-steps", 150, "--output", out,
    )  # fmt: skip
    assert code == 0


@pytest.fixture(scope="module")
def pack_dir(tiny_chat_dir, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("pack") / "tiny-pack"
    calibrate_tiny(tiny_chat_dir, corpus, out)
    return out


def test_calibration_trains_every_part_and_lowers_the_distillation_loss(pack_dir, tiny_chat_dir, corpus):
    pack = ExitPack.load(pack_dir, fingerprint(tiny_chat_dir))
    assert pack.exit_points == [2, 3, 4, 5, 6] and pack.has_routers()
    keys = {"linear": {"weight", "bias"}, "mlp": {"weight", "bias", "w1", "b1", "w2"}}  # the default kinds
    for d in (2, 3, 4, 5):
        figures = pack.manifest["evaluation"]["validation"][str(d)]
        assert figures["head"] == pack.manifest["heads"][str(d)] and set(figures["heads"]) == {"linear", "mlp"}
        assert pack.prefixed(f"adapter.{d}.").keys() == keys[figures["head"]]
        assert pack.prefixed(f"router.{d}.").keys() == {"w1", "b1", "w2", "b2"}
        assert all(pack.map_for(d, layer) is not None for layer in range(d + 1, 6))
        # KL(full || exit head) on held-out tokens: the adapters lower it
        assert figures["kl_adapted"] < figures["kl_untrained"] and figures["kl_least_squares"] < figures["kl_untrained"]
        assert 0.0 <= figures["router_auc"] <= 1.0
    training = pack.manifest["training"]
    assert all(loss["after"] < loss["before"] for loss in training["distillation_loss"].values())
    tuned = pack.manifest["evaluation"]["defaults"]  # the lowest threshold within 5% of full depth's perplexity
    assert pack.defaults["policy"] == ("learned" if tuned["compute_saved"] > 0 else "none")
    assert pack.defaults["backfill"] == "mapped"
    assert tuned["threshold"] == pack.defaults["threshold"] and tuned["targets"]["max_perplexity_increase"] == 0.05
    assert tuned["perplexity"] <= 1.05 * tuned["perplexity_full"] or tuned["threshold"] == 1.0
    assert "prefill" not in pack.defaults  # no labelled data: prompt tokens take the same defaults
    harm = pack.manifest["router"]["cost"]["harm"]
    assert set(harm) == {"decoupled", "mapped"} and all(h >= 0 for h in harm["decoupled"].values())
    assert 1000 < training["tokens"] <= 3000
    data = training["data"]["corpus"]
    assert data["path"] == str(corpus) and data["lines"][0] == 0 and data["lines"][1] < data["total"]
    assert training["settings"]["steps"] == 40


def test_calibration_is_reproducible(pack_dir, tiny_chat_dir, corpus, tmp_path):
    calibrate_tiny(tiny_chat_dir, corpus, tmp_path / "again")
    first, again = ExitPack.load(pack_dir), ExitPack.load(tmp_path / "again")
    assert again.tensors.keys() == first.tensors.keys()
    assert all(torch.equal(again.tensors[k], v) for k, v in first.tensors.items())
    assert again.manifest["router"] == first.manifest["router"]  # the measured back-fill harm included


def test_pack_round_trips_and_refuses_another_model(pack_dir, tiny_chat_dir, tiny_llama_dir, tmp_path):
    pack = ExitPack.load(pack_dir, fingerprint(tiny_chat_dir))
    again = ExitPack.load(pack.save(tmp_path / "copy"), fingerprint(tiny_chat_dir))
    assert again.manifest == {**pack.manifest, "format": "adept-exit-pack", "version": VERSION}
    assert again.tensors.keys() == pack.tensors.keys()
    assert all(torch.equal(again.tensors[k], v) for k, v in pack.tensors.items())
    with pytest.raises(ExitPackError, match="made for another model"):
        load_pack(str(pack_dir), "tiny", tiny_llama_dir)
    with pytest.raises(ExitPackError, match="made for another model"):  # and so does the engine
        Engine.local(EngineConfig(model=str(tiny_llama_dir), exit_pack=str(pack_dir)))


def test_exit_points_without_routers_refuse_learned_clearly(tiny_chat_dir, pack_dir):
    """Configured exit points the pack has no router for: policy learned is refused by name, and the
    defaults fall back to full depth, instead of a worker failing mid-batch."""

    async def run():
        engine = Engine.local(EngineConfig(model=str(tiny_chat_dir), exit_pack=str(pack_dir), exit_points=[1, 3]))
        try:
            with pytest.raises(RequestError, match=r"adept\.policy"):
                engine.submit("hello", {"max_tokens": 2}, {"policy": "learned"})
            assert engine.exit_defaults.policy is None
            outs = [o async for o in engine.submit("hello", {"max_tokens": 2, "temperature": 0})]
            assert [d for o in outs for d in o.exit_layers] == [6, 6]
        finally:
            await engine.shutdown()

    asyncio.run(run())


def _mean_depths(path, pack_dir, exits: list[dict]) -> list[float]:
    ids = load_tokenizer(path).encode(TEXT[:2000], add_special_tokens=False)[:200]

    async def run():
        engine = Engine.local(EngineConfig(model=str(path), exit_pack=str(pack_dir), min_exit_depth=2))
        try:
            return [float((await teacher_forced(engine, [ids], e)).exit_layers.float().mean()) for e in exits]
        finally:
            await engine.shutdown()

    return asyncio.run(run())


def test_learned_router_respects_the_request_threshold(tiny_chat_dir, pack_dir):
    thresholds = [0.0, 0.2, 0.5, 0.8, 1.0]
    depths = _mean_depths(tiny_chat_dir, pack_dir, [{"policy": "learned", "threshold": t} for t in thresholds])
    assert depths == sorted(depths)  # a higher threshold never exits earlier
    assert depths[0] == 2.0  # threshold 0: every token exits at the first exit point
    assert depths[1] < depths[3] and depths[-1] > 4.0


def test_eval_json_and_plot(tiny_chat_dir, pack_dir, corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("ADEPT_CACHE_DIR", str(tmp_path / "cache"))  # the chat continuations' cache
    plot = tmp_path / "pareto.png"
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("Name a river.", "Why?", "x " * 600)))
    code, out = adept(
        "eval", "--model", tiny_chat_dir, "--exit-pack", pack_dir, "--corpus", corpus, "--max-tokens", 128,
        "--window", 64, "--chat-tokens", 4, "--chats", chats, "--chat-part", "0,1", "--continuation-tokens", 6,
        "--policies", "static,confidence-untrained,confidence,learned",
        "--backfills", "exact,decoupled,mapped", "--thresholds", "0.5", "--learned-thresholds", "0.2,0.8",
        "--json", "--plot", plot,
    )  # fmt: skip
    assert code == 0
    report = json.loads(out)
    # held out: the eval reads only the lines the pack did not train on
    trained = ExitPack.load(pack_dir).manifest["training"]["data"]["corpus"]["lines"]
    assert report["corpus"]["lines"] == [trained[1], report["corpus"]["total"]]
    rows = [r for r in report["rows"] if r["policy"] != "oracle"]
    assert len(rows) == 3 * (4 + 1 + 1 + 2)
    # a perfect decision on the same heads, per approximate back-fill mode (static exact covers every point)
    oracles = {r["backfill"]: r for r in report["rows"] if r["policy"] == "oracle"}
    assert set(oracles) == {"decoupled", "mapped"}
    for row in oracles.values():
        assert row["agreement"] == 1.0 and 2.0 <= row["mean_exit_depth"] <= 6.0 and row["perplexity"] > 0
    assert oracles["decoupled"]["compute_saved"] >= oracles["mapped"]["compute_saved"]  # maps cost more
    for row in rows:
        for key in ("policy", "backfill", "threshold", "mean_exit_depth", "compute_saved", "agreement", "perplexity"):
            assert key in row, key
        assert 2.0 <= row["mean_exit_depth"] <= 6.0 and 0.0 <= row["agreement"] <= 1.0 and row["perplexity"] > 0
        assert 0.0 <= row["free_running_agreement"] <= 1.0 and row["free_running_perplexity"] > 0
        if row["backfill"] == "exact":
            assert row["compute_saved"] <= 1e-9  # exact back-fill runs every skipped layer
        else:  # the others save what the tokens skipped, less the back-fill
            skipped = 1 - row["mean_exit_depth"] / 6
            assert 0.5 * skipped <= row["compute_saved"] <= skipped + 1e-9
    static = {(r["backfill"], r["max_depth"]): r for r in rows if r["policy"] == "static"}
    assert static[("decoupled", 2)]["mean_exit_depth"] == 2.0
    assert static[("decoupled", 2)]["compute_saved"] > static[("decoupled", 5)]["compute_saved"]
    assert report["full"]["perplexity"] > 0 and set(report["at_agreement"]) == {"0.95", "0.99"}
    # the two chat prompts that fit the context; full depth's own continuations are the reference
    assert report["full"]["chat_prompts"] == 2 and report["full"]["free_running_perplexity"] > 0
    for r in [r for r in rows if r["free_running_agreement"] == 1.0]:  # the same continuations score the same
        assert r["free_running_perplexity"] == pytest.approx(report["full"]["free_running_perplexity"], rel=1e-4)
        assert r["free_running_rouge_l"] == 1.0  # the same text
    assert all(0.0 <= r["free_running_rouge_l"] <= 1.0 for r in rows)
    # the same settings and every exit head on full depth's own continuations of those two prompts
    served = report["served"]
    assert served["full"]["chat_prompts"] == 2 and 0 < served["full"]["tokens"] <= 2 * 5
    assert set(served["heads"]) == {"2", "3", "4", "5"} and len(served["rows"]) == len(rows)
    for figures in served["heads"].values():
        assert set(figures) == {"adapted", "untrained"} and all(0.0 <= v <= 1.0 for v in figures.values())
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.integration
def test_shipped_pack_beats_the_untrained_heads(default_model_dir):
    """The pack shipped for the default model loads by default and, exiting every token at the same depth
    (the same exit rate), its adapted heads agree with the full model far more often than the raw heads."""
    pack = load_pack("auto", DEFAULT_MODEL, default_model_dir)
    assert pack is not None and (SHIPPED / DEFAULT_MODEL).is_dir() and pack.has_routers()
    text = "The history of the city begins in the Roman period, when a small fort was built by the river. " * 3
    ids = load_tokenizer(default_model_dir).encode(text, add_special_tokens=False)

    async def agreement(exit_pack: str, depth: int) -> float:
        engine = Engine.local(EngineConfig(exit_pack=exit_pack, num_layer_groups=1, max_num_seqs=2))
        try:
            full = await teacher_forced(engine, [ids], {"policy": "none"})
            tf = await teacher_forced(engine, [ids], {"policy": "static", "max_depth": depth})
            return float((tf.predictions == full.predictions).float().mean())
        finally:
            await engine.shutdown()

    for depth in (12, 20):
        adapted, raw = asyncio.run(agreement("auto", depth)), asyncio.run(agreement("none", depth))
        assert adapted > raw + 0.1, (depth, adapted, raw)


def test_calibration_from_jsonl_and_self_generated_continuations(tiny_chat_dir, tmp_path):
    """A JSONL corpus of texts, plus chat prompts the model continues itself (data like served traffic),
    and chat prompts alone (no corpus: tuning reads their greedy continuations)."""
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": line}) for line in TEXT.splitlines()[:200]) + "\n")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        json.dumps({"prompt": "Tell me about rivers."}) + "\n"
        + json.dumps({"messages": [{"role": "user", "content": "Name a bridge."}]}) + "\n"
    )  # fmt: skip
    small = ("--exit-points", POINTS, "--max-tokens", 1200, "--window", 64, "--steps", 5, "--router-steps", 20,
             "--adapter-rank", 8, "--map-rank", 4)  # fmt: skip
    out = tmp_path / "pack"
    code, _ = adept(
        "calibrate", "--model", tiny_chat_dir, "--corpus", corpus, "--prompts", prompts, "--prompts-part", "0,1",
        "--generate-tokens", 16, "--samples", 2, "--seed", 3, *small, "--output", out,
    )  # fmt: skip
    assert code == 0
    data = ExitPack.load(out, fingerprint(tiny_chat_dir)).manifest["training"]["data"]
    assert data["prompts"]["path"] == str(prompts) and data["prompts"]["max_tokens"] == 16
    assert data["prompts"]["samples"] == 2 and data["prompts"]["seed"] == 3 and data["prompts"]["temperature"] == 0.7
    assert data["prompts"]["prompts_used"] == 2 and data["prompts"]["continuations"] == 6
    assert 0 < data["prompts"]["generated_tokens"] <= 6 * 16
    assert data["corpus"]["path"] == str(corpus) and data["corpus"]["lines"] == [0, 100]
    code, _ = adept("calibrate", "--model", tiny_chat_dir, "--prompts", prompts, *small, "--output", tmp_path / "p2")
    assert code == 0
    data = ExitPack.load(tmp_path / "p2", fingerprint(tiny_chat_dir)).manifest["training"]["data"]
    assert "corpus" not in data and data["prompts"]["lines"] == [0, 1]  # the first half of the prompts


def test_self_generated_continuations_are_the_engines_and_seeded(tiny_chat_dir, tmp_path):
    """Calibration's continuations come from the engine: the greedy one of each prompt is what `adept
    generate --chat` prints, the sampled ones repeat with their seed (generated again, not only cached),
    and a second calibration reads them from the cache."""
    chats = [[{"role": "user", "content": "Tell me about rivers."}], [{"role": "user", "content": "Name a bridge."}]]
    traffic = Traffic(max_tokens=12, samples=2, temperature=1.0, seed=5)

    def generated(traffic: Traffic, cache: str) -> tuple[list, dict]:
        return self_generated(str(tiny_chat_dir), chats, traffic, lambda _: None, tmp_path / cache)

    windows, described = generated(traffic, "a")
    assert described["continuations"] == len(windows) == 6 and described["prompts_used"] == 2
    assert [w.group for w in windows] == [0, 1, 0, 0, 1, 1]  # greedy ones first, then the samples per prompt
    assert len(list((tmp_path / "a").iterdir())) == 2  # greedy and sampled, cached
    again, _ = generated(traffic, "b")
    other, _ = generated(dataclasses.replace(traffic, seed=6), "c")
    assert again == windows and other[:2] == windows[:2] and other[2:] != windows[2:]
    cached, _ = generated(traffic, "a")
    assert cached == windows
    for messages, window in zip(chats, windows[:2], strict=True):
        code, out = adept("generate", messages[0]["content"], "--chat", "--json", "--max-tokens", 12,
                          "--model", tiny_chat_dir, "--exit-pack", "none")  # fmt: skip
        assert code == 0
        generated = json.loads(out.strip().splitlines()[-1])["token_ids"]
        assert window.ids[window.start :] == generated and window.start > 0  # the heads train on these


def test_retune_chooses_defaults_from_task_quality(tiny_chat_dir, pack_dir, corpus, tmp_path):
    """--retune keeps the trained pack and chooses its defaults on the first halves of the tuning data: the
    decode threshold within the perplexity targets (held-out and free-running), prompt tokens' exits by
    classification accuracy on labelled texts."""
    pack = tmp_path / "pack"
    shutil.copytree(pack_dir, pack)
    trained = (pack / "tensors.safetensors").read_bytes()
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"prompt": f"Tell me about river {i}."}) + "\n" for i in range(6)))
    labelled = tmp_path / "labelled.tsv"
    rows = [f"the {w} river {i}\t{i % 2}" for i, w in enumerate(["quiet", "broad", "cold", "slow", "wide"] * 5)]
    labelled.write_text("text\tlabel\n" + "\n".join(rows) + "\n")
    code, _ = adept(
        "calibrate", "--model", tiny_chat_dir, "--corpus", corpus, "--holdout", 0.3, "--output", pack, "--retune",
        "--max-tokens", 3000, "--tune-chats", chats, "--chat-tokens", 8, "--labelled", labelled,
        "--template", "Review: {text}\\nSentiment:", "--choices", " bad, good", "--max-accuracy-drop", 0.2,
    )  # fmt: skip
    assert code == 0
    tuned = ExitPack.load(pack, fingerprint(tiny_chat_dir))
    assert (pack / "tensors.safetensors").read_bytes() == trained  # re-tuning trains nothing
    d = tuned.manifest["evaluation"]["defaults"]
    assert d["chat_prompts"] == 3 and d["targets"]["max_accuracy_drop"] == 0.2
    assert d["targets"]["max_free_running_increase"] == 0.15  # the default target
    if d["threshold"] < 1.0:  # a threshold is only chosen within both perplexity targets
        assert d["perplexity"] <= 1.05 * d["perplexity_full"]
        assert d["free_running_perplexity"] <= 1.15 * d["free_running_perplexity_full"]
    # it is the default only where it saves enough to pay for its decisions
    assert d["targets"]["min_compute_saved"] == 0.12
    assert (tuned.defaults["policy"] == "learned") == (d["compute_saved"] >= 0.12)
    prefill = tuned.manifest["evaluation"]["prefill"]
    assert prefill["texts"] == 12 and 0.0 <= prefill["accuracy_full"] <= 1.0
    if tuned.defaults["prefill"] != {"policy": "none"}:  # the most prompt compute saved within the accuracy target
        assert prefill["accuracy"] >= prefill["accuracy_full"] - 0.2 and prefill["prompt_compute_saved"] >= 0.12
        assert tuned.defaults["prefill"]["full_depth_last"] == 1
    else:  # none kept the targets: prompt tokens at full depth, not the generated tokens' default
        assert "accuracy" not in prefill


def test_pack_prefill_defaults_and_the_configurations_own(tiny_chat_dir, pack_dir, tmp_path):
    """A pack's prompt-token defaults apply to requests that set nothing; a configuration's own exit
    controls override them for prompt tokens too, as a request's do."""
    pack = tmp_path / "pack"
    shutil.copytree(pack_dir, pack)
    p = ExitPack.load(pack)
    p.manifest["defaults"]["prefill"] = {"policy": "static", "max_depth": 3, "full_depth_last": 1}
    p.save(pack)
    prompt = list(range(10, 30))

    async def prompt_exits(exit: dict) -> list[int]:
        config = EngineConfig(model=str(tiny_chat_dir), exit_pack=str(pack), num_layer_groups=1, max_num_seqs=2,
                              min_exit_depth=2, exit=exit)  # fmt: skip
        engine = Engine.local(config)
        try:
            outs = [o async for o in engine.submit(prompt, {"max_tokens": 0, "prompt_logprobs": 0})]
            return outs[0].prompt.exit_layers
        finally:
            await engine.shutdown()

    assert asyncio.run(prompt_exits({})) == [3] * 19 + [6]
    assert asyncio.run(prompt_exits({"policy": "none"})) == [6] * 20
    assert asyncio.run(prompt_exits({"prefill": {"max_depth": 4}})) == [4] * 19 + [6]


def test_every_head_kind_trains_and_lowers_its_loss(tiny_chat_dir):
    """Each head kind starts from least squares and distillation lowers its KL to the full model; each
    exit point keeps the kind that saves the most on validation after its cost, and heads train only on
    positions from each window's start, validated on whole groups."""
    tokenizer = load_tokenizer(tiny_chat_dir)
    lines = TEXT.splitlines()
    windows = [Window(tokenizer.encode(" ".join(lines[i : i + 4])), start=8, group=i // 16) for i in range(0, 160, 4)]
    settings = CalibrationSettings(exit_points=[2, 4], heads=list(HEAD_KINDS), max_tokens=100_000, steps=30,
                                   batch_size=128, lr=3e-3, adapter_rank=8, mlp_hidden=32, router_steps=20,
                                   prompt_heads=[])  # fmt: skip
    pack = calibrate(tiny_chat_dir, windows, settings, {"test": True})
    training = pack.manifest["training"]
    assert training["tokens"] == sum(len(w.ids) - w.start for w in windows)
    assert set(training["distillation_loss"]) == {"low_rank", "linear", "mlp"}
    for kind, loss in training["distillation_loss"].items():
        assert loss["after"] < loss["before"], kind
    validation = pack.manifest["evaluation"]["validation"]
    config = load_config(tiny_chat_dir)
    for d in ("2", "4"):
        table = validation[d]["heads"]
        assert set(table) == set(HEAD_KINDS)
        for kind in ("low_rank", "linear", "mlp"):
            assert table[kind]["kl"] < table["identity"]["kl"], (d, kind)
        costs = {k: head_cost(k, config, settings) for k in HEAD_KINDS}
        assert costs["identity"] == 0 < costs["low_rank"] < costs["linear"] < costs["mlp"]
        layers_after = 6 - int(d)
        best = max(table, key=lambda k: table[k]["agreement"] * layers_after - costs[k])
        assert validation[d]["head"] == pack.manifest["heads"][d] == best
    # validation holds out the last tenth of the groups (here 10 groups of 4 windows: the last one)
    assert training["validation_tokens"] == sum(len(w.ids) - w.start for w in windows if w.group == 9)
    assert "prompt_heads" not in pack.manifest and not pack.prefixed("prompt_")
    with pytest.raises(ValueError, match="head kinds must be some of"):
        calibrate(tiny_chat_dir, windows, dataclasses.replace(settings, heads=["attention"]), {})


def test_prompt_heads_train_on_prompt_positions_once_per_prompt(tiny_chat_dir):
    """Positions before a window's start train the prompt tokens' own heads and routers, once per group (a
    prompt's sampled continuations repeat it); the generated tokens' train on the rest."""
    tokenizer = load_tokenizer(tiny_chat_dir)
    lines = TEXT.splitlines()
    windows = [Window(tokenizer.encode(" ".join(lines[i : i + 4])), start=12, group=i // 8) for i in range(0, 240, 4)]
    settings = CalibrationSettings(exit_points=[2, 4], heads=["linear"], prompt_heads=["low_rank", "linear"],
                                   max_tokens=100_000, steps=20, batch_size=128, lr=3e-3, adapter_rank=8,
                                   router_steps=20)  # fmt: skip
    pack = calibrate(tiny_chat_dir, windows, settings, {})
    training = pack.manifest["training"]
    assert training["tokens"] == sum(len(w.ids) - 12 for w in windows)
    assert training["prompt"]["tokens"] == 12 * len({w.group for w in windows})  # one window of two per group
    assert set(training["prompt"]["distillation_loss"]) == {"low_rank", "linear"}
    assert set(pack.manifest["prompt_heads"]) == {"2", "4"}
    for d, kind in pack.manifest["prompt_heads"].items():
        names = {"low_rank": {"down", "up", "bias"}, "linear": {"weight", "bias"}}[kind]
        assert pack.prefixed(f"prompt_adapter.{d}.").keys() == names
        assert pack.prefixed(f"prompt_router.{d}.").keys() == {"w1", "b1", "w2", "b2"}
        figures = pack.manifest["evaluation"]["prompt_validation"][d]
        assert figures["kl_adapted"] < figures["kl_untrained"]
    # the prompt tokens' adapters are their own, not the generated tokens'
    assert not torch.equal(pack.tensors["prompt_adapter.2.bias"], pack.tensors["adapter.2.bias"])


def test_adapters_are_stored_and_validated_in_their_dtype(tiny_chat_dir):
    """--adapter-dtype float8_e4m3fn stores the heads' matrices in float8 (biases float16, maps float16,
    routers float32); validation judges the stored heads, so its figures differ from float16's; a dtype that
    is not one of the choices is refused before any work."""
    tokenizer = load_tokenizer(tiny_chat_dir)
    lines = TEXT.splitlines()
    windows = [Window(tokenizer.encode(" ".join(lines[i : i + 4])), group=i // 16) for i in range(0, 160, 4)]
    settings = CalibrationSettings(exit_points=[2, 4], heads=["linear"], prompt_heads=[], max_tokens=100_000,
                                   steps=10, batch_size=128, lr=3e-3, router_steps=10)  # fmt: skip
    half = calibrate(tiny_chat_dir, windows, settings, {})
    small = calibrate(tiny_chat_dir, windows, dataclasses.replace(settings, adapter_dtype="float8_e4m3fn"), {})
    assert small.tensors["adapter.2.weight"].dtype == torch.float8_e4m3fn
    assert small.tensors["adapter.2.bias"].dtype == half.tensors["adapter.2.weight"].dtype == torch.float16
    assert small.tensors["map.2.3.down"].dtype == torch.float16 and small.tensors["router.2.w1"].dtype == torch.float32
    assert torch.allclose(small.tensors["adapter.2.weight"].float(), half.tensors["adapter.2.weight"].float(),
                          atol=0.02, rtol=0.07)  # fmt: skip
    kl = [p.manifest["evaluation"]["validation"]["2"]["kl_adapted"] for p in (half, small)]
    assert kl[0] != kl[1]
    with pytest.raises(ValueError, match="adapter dtype must be one of"):
        calibrate(tiny_chat_dir, windows, dataclasses.replace(settings, adapter_dtype="int4"), {})


def test_the_shipped_pack_is_small_enough_to_track():
    """Tracked files stay under 5 MiB: the shipped pack stores its heads' matrices in float8 and no prompt
    heads (its defaults run prompt tokens at full depth)."""
    for path in SHIPPED.rglob("*"):
        if path.is_file():
            assert path.stat().st_size < 5 * 2**20, path


def test_the_shipped_packs_defaults_respect_the_targets_it_records():
    """Every pack shipped with the package chose its defaults within the targets its manifest records:
    generated tokens within the perplexity targets (held-out text, free-running chat), prompt tokens within
    the accuracy drop, saving at least the recorded minimum wherever a default exits."""
    packs = [p for p in SHIPPED.iterdir() if (p / "manifest.json").is_file()]
    assert packs
    for path in packs:
        manifest = json.loads((path / "manifest.json").read_text())
        tuned, defaults = manifest["evaluation"]["defaults"], manifest["defaults"]
        targets = tuned["targets"]
        if defaults["policy"] != "none":
            assert tuned["compute_saved"] >= max(targets.get("min_compute_saved", 0), 1e-9), path
            assert tuned["perplexity"] <= tuned["perplexity_full"] * (1 + targets["max_perplexity_increase"]), path
            if "free_running_perplexity" in tuned:
                limit = tuned["free_running_perplexity_full"] * (1 + targets["max_free_running_increase"])
                assert tuned["free_running_perplexity"] <= limit, path
        if defaults.get("prefill", {"policy": "none"}) != {"policy": "none"}:
            prefill = manifest["evaluation"]["prefill"]
            assert prefill["accuracy"] >= prefill["accuracy_full"] - targets["max_accuracy_drop"] - 1e-9, path
            assert prefill["perplexity"] <= prefill["perplexity_full"] * (1 + targets["max_perplexity_increase"]), path
            assert prefill["prompt_compute_saved"] >= max(targets.get("min_compute_saved", 0), 1e-9), path
