"""KV memory in pages: the block pool, the paged cache (reads and holes across block boundaries), layer
groups on scattered block tables, and the scheduler under memory pressure (preemption and recompute)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from serving.engine import Engine
from serving.engine.config import EngineConfig
from tests.helpers import full_logprobs, load_groups, pipeline_of, rows, run
from tests.test_engine import GREEDY, PROMPTS, assert_clean, collect
from workers.kv_cache import BlockPool, KVCache, KVHoleError
from workers.modes import Backfill, Policy

VOCAB = 128


def test_pool_allocates_frees_reuses_and_refuses_beyond_its_blocks():
    pool = BlockPool(4)
    a = pool.allocate(3)
    assert sorted(a) == [0, 1, 2] and pool.num_free == 1
    with pytest.raises(RuntimeError, match="2 KV blocks asked for, 1 free"):
        pool.allocate(2)
    pool.free(a[:2])
    b = pool.allocate(3)
    assert set(b) == {a[0], a[1], 3} and pool.num_free == 0  # freed blocks are handed out again


def test_cache_reads_a_sequence_across_scattered_blocks_and_finds_holes_at_any_position():
    cache = KVCache(1, 8, 4, 2, 3, torch.float32, torch.device("cpu"))
    table = torch.tensor([[5, 2, 7]])  # positions 0-3 in block 5, 4-7 in block 2, 8-11 in block 7
    written = [p for p in range(10) if p != 6]
    values = torch.tensor(written, dtype=torch.float32)[:, None, None].expand(-1, 2, 3)
    cache.write(0, cache.locate(table.expand(len(written), -1), torch.tensor(written)), values, -values)
    needed = torch.zeros(1, 1, 10, dtype=torch.bool)
    needed[0, 0, :10] = True
    with pytest.raises(KVHoleError, match="no K/V at position 6"):
        cache.check_complete(0, table, needed, 0)
    cache.write(0, cache.locate(table, torch.tensor([6])), torch.full((1, 2, 3), 6.0), torch.full((1, 2, 3), -6.0))
    cache.check_complete(0, table, needed, 0)
    k, v = cache.gather(0, table, 10)
    assert k.shape == (1, 2, 10, 3)
    assert k[0, 1, :, 0].tolist() == list(range(10)) and v[0, 0, :, 2].tolist() == [-p for p in range(10)]
    assert cache.occupied() == [2, 5, 7]
    cache.free(torch.tensor([2]))
    assert cache.occupied() == [5, 7]
    with pytest.raises(ValueError, match="past its sequence's KV blocks"):
        cache.write(0, cache.locate(table, torch.tensor([12])), values[:1], values[:1])


@pytest.mark.parametrize("backfill", [Backfill.DECOUPLED, Backfill.MAPPED, Backfill.EXACT])
def test_scattered_block_tables_give_what_contiguous_ones_give(tiny_llama_dir, backfill):
    """Two sequences, 20 prompt positions each (across a block boundary), even positions exiting early and
    their K/V back-filled, then 3 decode steps: the same results whatever blocks hold them."""
    ids = torch.randint(0, VOCAB, (2, 23), generator=torch.Generator().manual_seed(7))
    scattered = {0: [13, 2, 9, 30, 5, 22, 17, 8], 1: [1, 31, 12, 4, 27, 6, 19, 24]}

    def steps(tables: dict[int, list[int]] | None) -> list[torch.Tensor]:
        pipe = pipeline_of(load_groups(tiny_llama_dir, [0, 3, 6], [2, 4, 6]))
        out = []
        for start, end in [(0, 20), (20, 21), (21, 22), (22, 23)]:
            batch = []
            for s in (0, 1):
                policy = torch.tensor([Policy.STATIC if p % 2 == 0 else Policy.NONE for p in range(start, end)])
                r = rows(ids[s, start:end], torch.arange(start, end), slot=s, policy=policy, max_depth=2 + 2 * s,
                         backfill=backfill, logprobs=VOCAB, sample_all=True)  # fmt: skip
                if tables is not None:
                    r.block_table = torch.tensor([tables[s]] * len(r))
                batch.append(r)
            result = run(pipe, type(batch[0]).cat(batch))
            out += [result.exit_layer, full_logprobs(result, VOCAB)]
        return out

    contiguous, moved = steps(None), steps(scattered)
    assert torch.equal(contiguous[0], moved[0]) and set(contiguous[0].tolist()) == {2, 4, 6}
    for a, b in zip(contiguous, moved, strict=True):
        assert torch.allclose(a, b, atol=1e-5)


def _engine(path, **kw) -> Engine:
    defaults = dict(model=str(path), num_layer_groups=3, max_model_len=64)
    return Engine.local(EngineConfig(**{**defaults, **kw}))


def _block_bytes(path) -> int:
    """Bytes of one KV block over every layer of the tiny model."""
    engine = _engine(path)
    try:
        return sum(g.block_bytes for g in engine.pipeline.groups)
    finally:
        asyncio.run(engine.shutdown())


@pytest.mark.parametrize("exit", [None, {"policy": "confidence", "threshold": 0.3, "backfill": "decoupled"}])
def test_memory_pressure_preempts_and_recomputes_with_the_same_greedy_text(tiny_chat_dir, exit):
    """Eight requests of about 50 tokens (4 blocks each) against a pool of 8 blocks: the newest are
    preempted and recomputed; every request finishes, with the tokens of an unpressured run."""
    sampling = {**GREEDY, "max_tokens": 40}
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(8)]

    async def main(**config) -> tuple[list, int]:
        engine = _engine(tiny_chat_dir, **config)
        done = await asyncio.gather(*(collect(engine, p, sampling, exit) for p in prompts))
        await assert_clean(engine)
        preempted = engine.scheduler.preemptions
        await engine.shutdown()
        return done, preempted

    free_run, none = asyncio.run(main())
    pressed, preempted = asyncio.run(main(kv_cache_memory=8 * _block_bytes(tiny_chat_dir)))
    assert none == 0 and preempted > 0
    for a, b in zip(free_run, pressed, strict=True):
        assert b.reason == "length" and len(b.tokens) == 40
        assert (a.tokens, a.exits) == (b.tokens, b.exits)


def test_more_sequences_than_eight_run_at_once(tiny_chat_dir):
    """With the default max_num_seqs, memory sets concurrency: 16 requests share the running batch."""

    async def main() -> int:
        engine = _engine(tiny_chat_dir)
        streams = [engine.submit(PROMPTS[i % len(PROMPTS)], {**GREEDY, "max_tokens": 8}) for i in range(16)]
        firsts = [await anext(aiter(s)) for s in streams]  # every stream has its first token ...
        running = len(engine.scheduler.running)  # ... and none has finished
        for s in streams:
            async for _ in s:
                pass
        await assert_clean(engine)
        await engine.shutdown()
        assert all(f.token_ids for f in firsts)
        return running

    assert asyncio.run(main()) == 16


def test_a_budget_below_one_sequence_is_a_clear_start_up_error(tiny_chat_dir):
    with pytest.raises(ValueError, match="fewer than one sequence of max_model_len 64: raise kv_cache_memory"):
        _engine(tiny_chat_dir, kv_cache_memory=3 * _block_bytes(tiny_chat_dir))
