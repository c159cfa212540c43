"""The in-process engine on a tiny random Llama with the default model's real tokenizer: continuous batching,
KV blocks, aborts, capacity, sampling, stop strings and parameter validation."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest
from pydantic import ValidationError

from serving.config import AppConfig
from serving.engine import Engine
from serving.engine.config import EngineConfig
from serving.engine.exceptions import EngineError, EngineUnavailable, QueueFullError, RequestError
from serving.engine.outputs import auto_interval

PROMPTS = [
    "The quick brown fox",
    "Once upon a time in a land far away there lived",
    "1, 2, 3,",
    "A long time ago",
    "Question: what is the capital of France? Answer:",
]
GREEDY = {"max_tokens": 10, "temperature": 0.0, "ignore_eos": True}


@dataclass
class Done:
    tokens: list[int]
    exits: list[int]
    text: str
    reason: str
    usage: object


def make_engine(path, **kw) -> Engine:
    defaults = dict(model=str(path), num_layer_groups=3, max_num_seqs=4, max_model_len=128)
    return Engine.local(EngineConfig(**{**defaults, **kw}))


async def collect(engine: Engine, prompt, sampling=GREEDY, exit=None) -> Done:
    tokens, exits, text, last = [], [], "", None
    async for out in engine.generate(prompt, sampling, exit):
        tokens += out.token_ids
        exits += out.exit_layers
        text += out.text
        last = out
    return Done(tokens, exits, text, last.finish_reason, last.usage)


async def assert_clean(engine: Engine) -> None:
    """Every KV block back in the pool and empty on every worker."""
    await asyncio.wait_for(engine.drain(), timeout=30)  # a leaked sequence never drains
    blocks = await engine.kv_blocks()
    assert blocks["free"] == blocks["capacity"] > 0
    for occupied in blocks["workers"]:
        assert occupied == []


EXIT_CONFIGS = [
    None,
    {"policy": "confidence", "threshold": 0.6, "backfill": "decoupled"},
    {"policy": "confidence", "threshold": 0.6, "backfill": "exact"},
    {"policy": "static", "max_depth": 3, "backfill": "mapped"},
]


@pytest.mark.parametrize("exit", EXIT_CONFIGS)
def test_batched_requests_match_each_run_alone(tiny_chat_dir, exit):
    async def main():
        engine = make_engine(tiny_chat_dir, exit_points=[2, 3, 4, 5])
        alone = [await collect(engine, p, exit=exit) for p in PROMPTS]
        together = await asyncio.gather(*(collect(engine, p, exit=exit) for p in PROMPTS))
        await assert_clean(engine)
        await engine.shutdown()
        return alone, together

    alone, together = asyncio.run(main())
    for a, t in zip(alone, together, strict=True):
        assert (a.tokens, a.exits) == (t.tokens, t.exits)
        assert len(a.tokens) == GREEDY["max_tokens"] and a.reason == "length"
    if exit is not None and exit["policy"] == "confidence":
        assert any(d < 6 for a in alone for d in a.exits), "some tokens should exit early"


def test_chunked_prefill_and_pipelined_microbatches_change_nothing(tiny_chat_dir):
    exit = {"policy": "confidence", "threshold": 0.6}

    async def outputs(**kw):
        engine = make_engine(tiny_chat_dir, exit_points=[2, 4], **kw)
        out = await asyncio.gather(*(collect(engine, p, exit=exit) for p in PROMPTS))
        await assert_clean(engine)
        await engine.shutdown()
        return [(o.tokens, o.exits) for o in out]

    reference = asyncio.run(outputs())
    assert asyncio.run(outputs(max_num_batched_tokens=3)) == reference
    assert asyncio.run(outputs(max_inflight_batches=3)) == reference


def test_usage_counts_layers(tiny_chat_dir):
    async def main():
        engine = make_engine(tiny_chat_dir)
        full = await collect(engine, PROMPTS[1])
        early = await collect(engine, PROMPTS[1], exit={"policy": "static", "max_depth": 3})
        await engine.shutdown()
        return full, early

    full, early = asyncio.run(main())
    fed = full.usage.prompt_tokens + full.usage.completion_tokens - 1  # the last token is never fed back
    assert full.usage.layers_total == fed * 6 and full.usage.layers_computed == full.usage.layers_total
    assert set(early.exits) == {3} and early.usage.layers_computed < early.usage.layers_total


def test_abort_frees_blocks_and_spares_other_requests(tiny_chat_dir):
    async def main():
        engine = make_engine(tiny_chat_dir)
        reference = await collect(engine, PROMPTS[0], {**GREEDY, "max_tokens": 20})
        stream = engine.submit(PROMPTS[1], {**GREEDY, "max_tokens": 100})
        other = asyncio.create_task(collect(engine, PROMPTS[0], {**GREEDY, "max_tokens": 20}))
        got = [await stream.__anext__(), await stream.__anext__()]
        await stream.aclose()  # the client goes away mid-stream
        assert all(o.token_ids for o in got)
        # a consumer task cancelled while waiting aborts too
        waiting = asyncio.create_task(collect(engine, PROMPTS[2], {**GREEDY, "max_tokens": 100}))
        await asyncio.sleep(0.05)
        waiting.cancel()
        done = await other
        await assert_clean(engine)
        await engine.shutdown()
        return reference, done

    reference, done = asyncio.run(main())
    assert done.tokens == reference.tokens


def test_closing_refuses_new_requests_and_ends_the_running_ones_with_abort(tiny_chat_dir):
    """A server stopping: a new request is refused as unavailable; those still running or waiting when the
    grace ends end with finish_reason "abort", and nothing leaks."""

    async def main():
        engine = make_engine(tiny_chat_dir, max_num_seqs=2, max_model_len=512)
        long = [asyncio.create_task(collect(engine, p, {**GREEDY, "max_tokens": 480, "ignore_eos": True}))
                for p in PROMPTS[1:4]]  # fmt: skip
        await asyncio.sleep(0.2)  # two run, the third waits (two places)
        closing = asyncio.create_task(engine.close(grace_s=0.05))
        await asyncio.sleep(0)
        with pytest.raises(EngineUnavailable, match="shutting down"):
            engine.submit(PROMPTS[0], GREEDY)
        cut = await closing
        done = [await t for t in long]
        await assert_clean(engine)
        await engine.shutdown()
        return cut, done

    cut, done = asyncio.run(main())
    assert cut == 3 and [d.reason for d in done] == ["abort"] * 3
    assert all(len(d.tokens) < 480 for d in done)


def test_capacity_queues_then_refuses_without_disturbing_others(tiny_chat_dir):
    async def main():
        engine = make_engine(tiny_chat_dir, max_num_seqs=2, max_waiting_requests=1)
        alone = [await collect(engine, p) for p in PROMPTS[:3]]
        streams = [engine.submit(p, GREEDY) for p in PROMPTS[:3]]  # two run (max_num_seqs 2), one waits
        with pytest.raises(QueueFullError, match="admission queue is full"):
            engine.submit(PROMPTS[3], GREEDY)
        together = []
        for s in streams:
            together.append([t async for o in s for t in o.token_ids])
        await assert_clean(engine)
        await engine.shutdown()
        return alone, together

    alone, together = asyncio.run(main())
    assert [a.tokens for a in alone] == together


def test_seeds_reproduce_and_do_not_depend_on_the_batch(tiny_chat_dir):
    sampled = {"max_tokens": 12, "temperature": 1.0, "top_p": 0.9, "top_k": 50, "ignore_eos": True}

    async def main():
        engine = make_engine(tiny_chat_dir)
        a = await collect(engine, PROMPTS[0], {**sampled, "seed": 7})
        b = await collect(engine, PROMPTS[0], {**sampled, "seed": 7})
        c = await collect(engine, PROMPTS[0], {**sampled, "seed": 8})
        crowd = await asyncio.gather(*(collect(engine, p, {**sampled, "seed": 7}) for p in PROMPTS))
        await engine.shutdown()
        return a, b, c, crowd

    a, b, c, crowd = asyncio.run(main())
    assert a.tokens == b.tokens == crowd[0].tokens
    assert a.tokens != c.tokens


def test_stop_strings_stop_and_are_not_emitted(tiny_chat_dir):
    async def main():
        engine = make_engine(tiny_chat_dir)
        free = await collect(engine, PROMPTS[3], {**GREEDY, "max_tokens": 30})
        stop = free.text[8:11]
        stopped = await collect(engine, PROMPTS[3], {**GREEDY, "max_tokens": 30, "stop": [stop, "never-there"]})
        await assert_clean(engine)
        await engine.shutdown()
        return free, stop, stopped

    free, stop, stopped = asyncio.run(main())
    assert len(stop) == 3
    assert stopped.text == free.text[: free.text.index(stop)]
    assert stopped.reason == "stop" and len(stopped.tokens) < len(free.tokens)


@pytest.mark.parametrize(
    "prompt,sampling,exit,param",
    [
        ("hi", {"max_tokens": -1}, None, "max_tokens"),
        ("hi", {"max_tokens": 0}, None, "max_tokens"),
        ("hi", {"top_p": 0.0}, None, "top_p"),
        ("hi", {"top_p": 1.5}, None, "top_p"),
        ("hi", {"temperature": -0.1}, None, "temperature"),
        ("hi", {"top_k": -2}, None, "top_k"),
        ("hi", {"logprobs": 50}, None, "logprobs"),
        ("hi", {"stop": [""]}, None, "stop"),
        ("hi", {"max_tokens": "many"}, None, "max_tokens"),
        ("hi", {"bogus": 1}, None, "bogus"),
        ("hi", {"max_tokens": 200}, None, "max_tokens"),  # beyond the 128-token context
        ("hi", None, {"policy": "sometimes"}, "adept.policy"),
        ("hi", None, {"threshold": 1.5}, "adept.threshold"),
        ("hi", None, {"threshold": -0.5}, "adept.threshold"),
        ("hi", None, {"max_depth": 7}, "adept.max_depth"),
        ("hi", None, {"min_depth": 5, "max_depth": 3}, "adept.max_depth"),
        ("hi", None, {"policy": "static"}, "adept.max_depth"),
        ("hi", None, {"policy": "learned"}, "adept.policy"),
        ("hi", None, {"backfill": "none"}, "adept.backfill"),
        ("word " * 200, None, None, "prompt"),
        ("", None, None, "prompt"),
        ([1, 2, 10**6], None, None, "prompt"),
    ],
)
def test_invalid_parameters_are_refused_by_name(tiny_chat_dir, prompt, sampling, exit, param):
    async def main():
        engine = make_engine(tiny_chat_dir)
        with pytest.raises(RequestError) as info:
            engine.submit(prompt, sampling, exit)
        assert info.value.param == param and str(info.value).startswith(param)
        # nothing leaked and the engine still serves
        ok = await collect(engine, "hi", {**GREEDY, "max_tokens": 2})
        await assert_clean(engine)
        await engine.shutdown()
        return ok

    assert len(asyncio.run(main()).tokens) == 2


def test_logprobs_are_reported(tiny_chat_dir):
    async def main():
        engine = make_engine(tiny_chat_dir)
        outs = [o async for o in engine.generate(PROMPTS[0], {**GREEDY, "max_tokens": 4, "logprobs": 3})]
        await engine.shutdown()
        return outs

    outs = asyncio.run(main())
    assert sum(len(o.token_ids) for o in outs) == 4
    for out in outs:
        for token, lp, top in zip(out.token_ids, out.logprobs, out.top_logprobs, strict=True):
            assert len(top) == 3 and lp <= 0.0
            assert max(top, key=top.get) == token and top[token] == pytest.approx(lp)


def test_logprobs_in_a_batch_whose_rows_exit_in_different_groups(tiny_chat_dir):
    """One request asks for alternatives and exits in group 0, another asks for none and goes to the last
    group: each group reports as many alternatives as its own rows asked for, and both streams are whole."""
    early = {"policy": "static", "max_depth": 2}

    async def main():
        engine = make_engine(tiny_chat_dir, min_exit_depth=1)
        alone = await collect(engine, PROMPTS[1], GREEDY, {"policy": "none"})
        asking = engine.generate(PROMPTS[0], {**GREEDY, "logprobs": 3}, early)
        together = await asyncio.gather(_outputs(asking), collect(engine, PROMPTS[1], GREEDY, {"policy": "none"}))
        await assert_clean(engine)
        await engine.shutdown()
        return alone, together

    alone, (outs, plain) = asyncio.run(main())
    assert plain.tokens == alone.tokens and set(plain.exits) == {6}
    assert [e for o in outs for e in o.exit_layers] == [2] * GREEDY["max_tokens"]
    for out in outs:
        for token, lp, top in zip(out.token_ids, out.logprobs, out.top_logprobs, strict=True):
            assert len(top) == 3 and top[token] == pytest.approx(lp)


def test_a_stream_interval_sends_the_first_token_alone_then_chunks(tiny_chat_dir):
    async def main():
        engine = make_engine(tiny_chat_dir)
        along = [o async for o in engine.generate(PROMPTS[2], GREEDY)]
        chunks = [o async for o in engine.submit(PROMPTS[2], GREEDY).chunks(4)]
        await engine.shutdown()
        return along, chunks

    along, chunks = asyncio.run(main())
    sizes = [len(c.token_ids) for c in chunks]  # (a reader that falls behind may get larger chunks)
    assert sizes[0] == 1 and all(n >= 4 for n in sizes[1:-1]) and len(sizes) <= 4
    assert [t for c in chunks for t in c.token_ids] == [t for o in along for t in o.token_ids]
    assert "".join(c.text for c in chunks) == "".join(o.text for o in along) and chunks[-1].finished


def test_a_reader_that_falls_behind_gets_what_queued_up_as_one_output(tiny_chat_dir):
    """Read after the request has finished: one output holding every token, its text, exit layers and
    logprobs, the same as reading along."""

    async def main():
        engine = make_engine(tiny_chat_dir)
        sampling = {**GREEDY, "logprobs": 2}
        along = [o async for o in engine.generate(PROMPTS[1], sampling)]
        stream = engine.submit(PROMPTS[1], sampling)
        await asyncio.wait_for(engine.drain(), 30)  # the request ends before it is read
        behind = [o async for o in stream]
        await engine.shutdown()
        return along, behind

    along, behind = asyncio.run(main())
    (one,) = behind
    assert one.finished and one.finish_reason == "length" and one.usage == along[-1].usage
    assert one.token_ids == [t for o in along for t in o.token_ids]
    assert one.text == "".join(o.text for o in along)
    assert one.exit_layers == [e for o in along for e in o.exit_layers]
    assert one.logprobs == [x for o in along for x in o.logprobs]
    assert one.top_logprobs == [x for o in along for x in o.top_logprobs]


async def _outputs(stream) -> list:
    return [o async for o in stream]


def test_a_failing_worker_call_fails_only_its_batch(tiny_chat_dir):
    async def main():
        engine = make_engine(tiny_chat_dir)
        group = engine.pipeline.groups[1].group
        real = group.forward

        def broken(*args):
            group.forward = real  # fail once
            raise RuntimeError("simulated worker fault")

        group.forward = broken
        with pytest.raises(EngineError, match="simulated worker fault"):
            await collect(engine, PROMPTS[0])
        after = await collect(engine, PROMPTS[0])
        await assert_clean(engine)
        await engine.shutdown()
        return after

    assert len(asyncio.run(main()).tokens) == GREEDY["max_tokens"]


def test_a_worker_that_does_not_come_back_ends_the_streams_with_a_retryable_error(tiny_chat_dir):
    """A lost worker whose restart times out (Ray's TimeoutError has no message): the engine gives up,
    every stream ends with EngineUnavailable (never a hang), and the pipeline refuses new requests. (A Ray
    actor's death is simulated on the in-process group: it cannot die here.)"""

    async def main():
        engine = make_engine(tiny_chat_dir)
        local = engine.pipeline.groups[1]
        local.lost = lambda error: isinstance(error, ConnectionError)

        async def never(timeout: float) -> None:
            raise TimeoutError()

        local.ready = never
        group, real = local.group, local.group.forward

        def dies(*args):
            group.forward = real
            raise ConnectionError("the worker's node is gone")

        group.forward = dies
        with pytest.raises(EngineUnavailable, match="did not come back: TimeoutError"):
            await asyncio.wait_for(collect(engine, PROMPTS[0]), timeout=30)
        with pytest.raises(EngineUnavailable):
            engine.submit(PROMPTS[0], GREEDY)
        await engine.shutdown()

    asyncio.run(main())


def test_stream_interval_auto_grows_with_the_running_batch(tiny_chat_dir):
    """'auto' (the application's default) streams every token at light load and grows the chunks with the
    running batch; a callable interval is asked again for each chunk."""
    assert [auto_interval(n) for n in (0, 1, 16, 17, 32, 64, 128, 1000)] == [1, 1, 1, 2, 2, 4, 8, 8]
    assert AppConfig().stream_interval == "auto" and AppConfig(stream_interval=3).stream_interval == 3
    with pytest.raises(ValidationError):
        AppConfig(stream_interval=0)

    async def main():
        engine = make_engine(tiny_chat_dir)
        asked = []

        def interval():
            asked.append(engine.num_running)
            return auto_interval(engine.num_running) + 2  # one sequence running: 3

        along = [o async for o in engine.generate(PROMPTS[2], GREEDY)]
        chunks = [o async for o in engine.submit(PROMPTS[2], GREEDY).chunks(interval)]
        await engine.shutdown()
        return along, chunks, asked

    along, chunks, asked = asyncio.run(main())
    assert len(asked) >= len(chunks) - 1 and 1 in asked
    sizes = [len(c.token_ids) for c in chunks]
    assert sizes[0] == 1 and all(n >= 3 for n in sizes[1:-1])
    assert [t for c in chunks for t in c.token_ids] == [t for o in along for t in o.token_ids]
