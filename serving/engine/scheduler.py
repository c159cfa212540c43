"""Continuous batching: which rows (prompt chunks and decode tokens of many sequences) go into each step.

The scheduler owns the KV blocks (workers/kv_cache.py): each sequence's block table grows as its tokens are
fed, and a new sequence is admitted only while free blocks stay above a watermark. When a running sequence
needs a block and none is free, the newest sequences are preempted, as vLLM does by default: their blocks
are freed and they wait at the head of the queue, to be recomputed (prompt and generated tokens) when
blocks free up. It knows nothing about how layer groups are called: the engine hands its batches, and the
blocks to clear, to a pipeline."""

from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass, field

import torch

from serving.engine.exceptions import QueueFullError
from serving.engine.params import FULL_DEPTH, PhaseExits, SamplingParams
from serving.engine.speculative import SpecState
from workers.kv_cache import BlockPool, blocks_for
from workers.modes import Policy
from workers.protocol import Rows, TokenResults, pad_cat

log = logging.getLogger(__name__)


@dataclass(eq=False)  # a sequence is itself, not its contents
class Sequence:
    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams
    exit: PhaseExits
    seed: int
    max_tokens: int  # 0: score the prompt (prompt_logprobs) and generate nothing
    output_ids: list[int] = field(default_factory=list)
    exit_layers: list[int] = field(default_factory=list)  # per generated token
    layers_computed: int = 0  # sum of exit depths of every token fed through the model
    prompt_layers_computed: int = 0  # the same, of prompt tokens only
    # With sampling.prompt_logprobs: per prompt position, its exit layer; per prompt position p but the last,
    # the log-probability of prompt token p + 1 at p's exit, and the best alternatives there.
    prompt_exit_layers: list[int] = field(default_factory=list)
    prompt_logprobs: list[float] = field(default_factory=list)
    prompt_top_logprobs: list[dict[int, float]] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)  # its KV blocks, in position order
    num_computed: int = 0  # positions fed through the model (speculative drafts: once verified)
    in_flight: bool = False
    aborted: bool = False
    spec: SpecState | None = None  # speculative decoding's round, if the request asked for it

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def prefill_done(self) -> bool:
        return self.num_computed >= len(self.prompt_ids)

    @property
    def drafting(self) -> bool:
        """Its next row is a speculative draft (it decodes, one token unfed, in a round with drafts)."""
        return self.spec is not None and self.spec.drafting

    def reset(self) -> None:
        """Start over from position 0 (preempted, or a worker lost its cache): drafts are forgotten."""
        self.num_computed = 0
        if self.spec is not None:
            self.spec.reset()


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    counts: list[int]  # rows of each sequence, in order
    rows: Rows
    hidden: torch.Tensor | None = None  # a verification batch: the rows' hidden states at the draft depth ...
    depth: int = 0  # ... which is where the batch enters

    @property
    def verifies(self) -> bool:
        return self.hidden is not None


@dataclass
class SequenceUpdate:
    seq: Sequence
    # the rows of the sequence's new tokens (one, or a verified speculative round's); None: no new token yet
    # (a prompt chunk before the end, a draft)
    sampled: TokenResults | None
    prompt_done: bool = False  # this step fed the prompt's last token
    accepted: list[bool] | None = None  # speculative: per new token, whether it was a draft the model kept
    drafted: int = 0  # a verified round's drafts


class Scheduler:
    def __init__(
        self,
        pool: BlockPool,
        block_size: int,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_waiting: int,
        max_model_len: int,
        speculative_max_batch: int = 8,
        watermark: float = 0.01,
    ) -> None:
        self.pool, self.block_size, self.max_model_len = pool, block_size, max_model_len
        self.speculative_max_batch = speculative_max_batch
        self.max_num_seqs = max_num_seqs
        self.token_budget = max_num_batched_tokens
        self.max_waiting = max_waiting
        # Free blocks kept back when admitting (vLLM's watermark): room for running sequences to grow
        # before anything has to be preempted.
        self.watermark = int(watermark * pool.capacity)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions = 0
        self._freed: list[int] = []  # blocks of preempted sequences that the workers still hold
        self._rejected: list[tuple[list[int], int, int]] = []  # (blocks, first, end): rejected draft positions

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def gauges(self) -> tuple[int, int, int, int, int]:
        """Running and waiting sequences, used and free blocks, preemptions so far (for metrics)."""
        pool = self.pool
        return len(self.running), len(self.waiting), pool.capacity - pool.num_free, pool.num_free, self.preemptions

    def per_micro_batch(self, micro_batches: int) -> int:
        """Sequences per micro-batch: the work split evenly over the micro-batches in flight, so that while
        group g runs one micro-batch, group g+1 has another (layer-group pipelining)."""
        return max(1, -(-(len(self.running) + len(self.waiting)) // micro_batches))

    def add(self, seq: Sequence) -> None:
        # Waiting requests beyond the free places of the running batch are the real queue.
        if len(self.waiting) - (self.max_num_seqs - len(self.running)) >= self.max_waiting:
            raise QueueFullError(
                f"the admission queue is full ({self.max_waiting} requests waiting for {self.max_num_seqs} "
                "places); retry later"
            )
        self.waiting.append(seq)

    def abort(self, request_id: str) -> Sequence | None:
        """Marks the sequence aborted; returns it if it has no work in flight (free it now)."""
        for seq in self.waiting:
            if seq.request_id == request_id:
                self.waiting.remove(seq)
                seq.aborted = True
                return seq
        for seq in self.running:
            if seq.request_id == request_id:
                seq.aborted = True
                return None if seq.in_flight else seq
        return None

    def rebuild(self) -> list[Sequence]:
        """Every running sequence starts over from position 0 in the blocks it holds (prompt and generated
        tokens are fed again, the last one sampling the next token): after a worker lost its KV cache."""
        for seq in self.running:
            seq.reset()
            seq.in_flight = False
        return list(self.running)

    def teacher_forcing(
        self, token_ids: list[list[int]], exits: PhaseExits, max_model_len: int, chunk: int, exit_every: int,
        exit_from: list[int] | None, as_prompt: bool = False,
    ) -> TeacherForcing:  # fmt: skip
        """Sequences the caller feeds itself (Engine.teacher_forced), their KV blocks reserved; a step's rows
        within the token budget."""
        forced = TeacherForcing(token_ids, exits, max_model_len, chunk, exit_every, exit_from, self.token_budget,
                                as_prompt)  # fmt: skip
        self.reserve(forced.seqs)
        return forced

    def reserve(self, seqs: list[Sequence]) -> None:
        """KV blocks for the whole of sequences the caller feeds itself (teacher forcing), outside the
        running batch."""
        need = [blocks_for(len(s.tokens), self.block_size) for s in seqs]
        if sum(need) > self.pool.num_free:
            raise RuntimeError(
                f"{len(seqs)} sequences need {sum(need)} KV blocks, {self.pool.num_free} are free: raise "
                "kv_cache_memory or feed fewer sequences at once"
            )
        for seq, n in zip(seqs, need, strict=True):
            seq.blocks = self.pool.allocate(n)

    def remove(self, seq: Sequence) -> list[int]:
        """Drop a finished or aborted sequence; returns its blocks, which the caller clears on every worker."""
        if seq in self.running:
            self.running.remove(seq)
        blocks, seq.blocks = seq.blocks, []
        self.pool.free(blocks)
        return blocks

    def take_freed(self) -> list[int]:
        """Blocks of sequences preempted since the last call: clear them on every worker before the next
        batch is submitted (a later call may reuse them)."""
        freed, self._freed = self._freed, []
        return freed

    def take_rejected(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Positions of rejected speculative drafts since the last call, as (block table rows, positions):
        forget their K/V on every worker before the next batch is submitted."""
        rejected, self._rejected = self._rejected, []
        if not rejected:
            return None
        tables = [torch.tensor(blocks).expand(end - first, -1) for blocks, first, end in rejected]
        positions = torch.cat([torch.arange(first, end) for _, first, end in rejected])
        return pad_cat(tables), positions

    def schedule(self, max_seqs: int | None = None) -> ScheduledBatch | None:
        """The next batch: at most `max_seqs` sequences and the token budget's worth of rows. Sequences whose
        drafts are all fed go first, in a verification batch of their own (it enters past the draft depth)."""
        room = max_seqs or self.max_num_seqs
        verify = self._verification(room)
        if verify is not None:
            return verify
        budget = self.token_budget
        picked: list[tuple[Sequence, int]] = []
        # Decode rows first (one token each), then unfinished prompts, then new sequences; the oldest first.
        ready = [s for s in self.running if not s.in_flight and not s.aborted]
        # Unfed tokens: 1 for a decoding sequence; more for a prompt in chunks, or for a sequence whose K/V is
        # rebuilt (prompt and generated tokens) after a worker was lost.
        for seq in sorted(ready, key=lambda s: len(s.tokens) - s.num_computed > 1):
            if budget == 0 or len(picked) == room:
                break
            if not seq.blocks:  # preempted this step for an older one (a running sequence holds blocks)
                continue
            n = min(len(seq.tokens) - seq.num_computed, budget)
            decoding = seq.prefill_done and len(seq.tokens) - seq.num_computed == 1
            if seq.spec is not None and decoding and seq.spec.fed == 0:  # a new speculative round
                seq.spec.start(self._draft_room(seq), crowded=len(self.running) > self.speculative_max_batch)
            if self._grow(seq, seq.spec.fed + 1 if seq.drafting else n, picked):
                picked.append((seq, n))
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and len(picked) < room:
            seq = self.waiting[0]
            n = min(len(seq.tokens) - seq.num_computed, budget)
            need = blocks_for(n, self.block_size)
            if self.pool.num_free - need < (self.watermark if self.running else 0):
                break
            self.waiting.popleft()
            seq.blocks = self.pool.allocate(need)
            self.running.append(seq)
            picked.append((seq, n))
            budget -= n
        if not picked:
            return None
        for seq, _ in picked:
            seq.in_flight = True
        return ScheduledBatch([s for s, _ in picked], [n for _, n in picked], rows_for(picked))

    def _draft_room(self, seq: Sequence) -> int:
        """Drafts this round may hold: a round emits up to k + 1 tokens and feeds k + 1 positions."""
        return min(seq.max_tokens - len(seq.output_ids) - 1, self.max_model_len - 2 - seq.num_computed)

    def _verification(self, room: int) -> ScheduledBatch | None:
        """A batch of every sequence whose drafts are all fed (as many as fit), those that draft at the same
        depth as the first: positions b..b+k each, at full depth from the draft depth on."""
        ready = [s for s in self.running if not s.in_flight and not s.aborted and s.spec and s.spec.verifying]
        if not ready:
            return None
        depth, budget, picked = ready[0].spec.config.depth, self.token_budget, []
        for seq in ready:
            n = seq.spec.k + 1
            if seq.spec.config.depth != depth or len(picked) == room or (picked and n > budget):
                continue
            picked.append((seq, n))
            budget -= n
        for seq, _ in picked:
            seq.in_flight = True
        hidden = torch.stack([h for seq, _ in picked for h in seq.spec.hidden])
        return ScheduledBatch([s for s, _ in picked], [n for _, n in picked], verify_rows(picked), hidden, depth)

    def _grow(self, seq: Sequence, n: int, picked: list[tuple[Sequence, int]]) -> bool:
        """Blocks for `seq`'s next `n` positions, preempting the newest sequences not in flight if none are
        free; False if `seq` cannot run this step (it was preempted itself, or every candidate is busy)."""
        need = max(blocks_for(seq.num_computed + n, self.block_size) - len(seq.blocks), 0)
        while self.pool.num_free < need:
            busy = {id(s) for s, _ in picked}
            victim = next((s for s in reversed(self.running) if not s.in_flight and id(s) not in busy), None)
            if victim is None:
                return False
            self._preempt(victim)
            if victim is seq:
                return False
        seq.blocks += self.pool.allocate(need)
        return True

    def _preempt(self, seq: Sequence) -> None:
        """Free the sequence's blocks; it waits at the head of the queue and is recomputed from position 0."""
        self._freed += self.remove(seq)
        seq.reset()
        self.waiting.appendleft(seq)
        self.preemptions += 1

    def update(
        self, batch: ScheduledBatch, results: TokenResults, draft_hidden: torch.Tensor | None = None
    ) -> list[SequenceUpdate]:
        """Apply a step's results (per row) to its sequences (`draft_hidden`: per row, the hidden state a
        draft stopped with)."""
        if batch.verifies:
            return self._verified(batch, results)
        updates = []
        start = 0
        for seq, n in zip(batch.seqs, batch.counts, strict=True):
            end = start + n
            seq.in_flight = False
            if seq.drafting:  # not verified yet: nothing to emit
                token = int(results.tokens[start]) if bool(batch.rows.sample[start]) else None
                asked = token is not None and seq.spec.config.min_confidence > 0  # rows_for asked for its logprob
                seq.spec.fed_one(draft_hidden[start], token, math.exp(results.logprobs[start]) if asked else 1.0)
                seq.layers_computed += int(results.exit_layer[start])
                updates.append(SequenceUpdate(seq, None))
                start = end
                continue
            first, prompt_len = seq.num_computed, len(seq.prompt_ids)
            seq.num_computed += n
            seq.layers_computed += int(results.exit_layer[start:end].sum())
            if first < prompt_len:
                prompt_rows = slice(start, start + min(n, prompt_len - first))
                seq.prompt_layers_computed += int(results.exit_layer[prompt_rows].sum())
                if seq.sampling.prompt_logprobs is not None:  # only scoring requests keep per-position results
                    _record_prompt(seq, first, results.select(prompt_rows))
            sampled = None
            if seq.num_computed == len(seq.tokens) and seq.max_tokens > 0:  # the last row sampled the next token
                sampled = results.select(slice(end - 1, end))
                seq.output_ids.append(int(sampled.tokens[0]))
                seq.exit_layers.append(int(sampled.exit_layer[0]))
            plain = None if seq.spec is None or sampled is None else [False]  # speculative, but no draft this step
            updates.append(SequenceUpdate(seq, sampled, first < prompt_len <= seq.num_computed, plain))
            start = end
        return updates

    def _verified(self, batch: ScheduledBatch, results: TokenResults) -> list[SequenceUpdate]:
        """A verification batch's results: each sequence keeps its agreeing drafts and the full model's next
        token; the K/V of the positions after them is to be forgotten (`take_rejected`)."""
        updates, start = [], 0
        for seq, n in zip(batch.seqs, batch.counts, strict=True):
            seq.in_flight = False
            rows, spec, b = results.select(slice(start, start + n)), seq.spec, seq.num_computed
            start += n
            k, j = spec.k, spec.verified(rows)
            kept = rows.select(slice(0, j + 1))
            seq.layers_computed += int(rows.exit_layer.sum()) - n * spec.config.depth  # the layers past D
            seq.num_computed = b + j + 1
            seq.output_ids += kept.tokens.tolist()
            seq.exit_layers += kept.exit_layer.tolist()
            if j < k:
                self._rejected.append((list(seq.blocks), b + j + 1, b + k + 1))
            spec.reset()
            updates.append(SequenceUpdate(seq, kept, accepted=[True] * j + [False], drafted=k))
        return updates


def check_kv_capacity(pool: BlockPool, block_size: int, max_model_len: int, block_bytes: int) -> None:
    """The pool must hold one sequence of max_model_len; says at start-up how much it holds."""
    tokens, need = pool.capacity * block_size, blocks_for(max_model_len, block_size)
    per_token = block_bytes // block_size
    log.info(
        "KV cache: %d blocks of %d positions, %d tokens (%.0f MiB of K/V per pipeline, %d bytes per token)",
        pool.capacity, block_size, tokens, tokens * per_token / 2**20, per_token,
    )  # fmt: skip
    if pool.capacity < need:
        raise ValueError(
            f"the KV cache holds {tokens} tokens, fewer than one sequence of max_model_len {max_model_len}: "
            f"raise kv_cache_memory (it needs at least {need * block_size * per_token} bytes) or lower max_model_len"
        )


class TeacherForcing:
    """Given token sequences fed in chunks beside the running batch (Engine.teacher_forced): every chunk's
    rows (at most `max_rows` a step), and each sequence's results put back together. With `exit_every` k,
    only every k-th position takes the sequences' exit controls, and with `exit_from`, only a sequence's
    positions from its entry on (a chat's generated tokens after its prompt, say); the others run at full
    depth. Exits take the generated tokens' heads and routers, or with `as_prompt` the prompt tokens'."""

    def __init__(
        self, token_ids: list[list[int]], exits: PhaseExits, max_model_len: int, chunk: int, exit_every: int = 1,
        exit_from: list[int] | None = None, max_rows: int | None = None, as_prompt: bool = False,
    ) -> None:  # fmt: skip
        for ids in token_ids:
            if len(ids) >= max_model_len:
                raise ValueError(f"{len(ids)} tokens do not fit the context of {max_model_len}")
        greedy = SamplingParams(temperature=0.0)
        self.seqs = [Sequence(f"teacher-forced-{i}", list(ids), greedy, exits, 0, 1) for i, ids in enumerate(token_ids)]
        self.chunk, self.exit_every = chunk, exit_every
        self.max_rows = max_rows or chunk * len(token_ids)  # a step's rows: their logits are the memory it takes
        self.exit_from = [0] * len(token_ids) if exit_from is None else exit_from
        self.as_prompt = as_prompt
        self.parts: list[list[TokenResults]] = [[] for _ in token_ids]  # per sequence, per chunk
        self.picked: list[tuple[int, Sequence, int]] = []

    def next_rows(self) -> Rows | None:
        self.picked, room = [], self.max_rows
        for i, s in enumerate(self.seqs):
            n = min(self.chunk, len(s.tokens) - s.num_computed, room)
            if n > 0:
                self.picked.append((i, s, n))
                room -= n
        if not self.picked:
            return None
        rows = rows_for([(s, n) for _, s, n in self.picked], teacher_forced=True)
        start = torch.cat([torch.full((n,), self.exit_from[i]) for i, _, n in self.picked])
        rows.policy[(rows.positions % self.exit_every != 0) | (rows.positions < start)] = int(Policy.NONE)
        # A fed sequence is all "prompt" to the scheduler: its phase is what the caller says, the positions
        # before exit_from a prompt, the rest generated (or all of them prompt tokens, as_prompt).
        rows.prompt = torch.full_like(rows.prompt, True) if self.as_prompt else rows.positions < start
        return rows

    def record(self, results: TokenResults) -> None:
        at = 0
        for i, s, n in self.picked:
            self.parts[i].append(results.select(slice(at, at + n)))
            at += n
            s.num_computed += n

    def results(self) -> list[TokenResults]:
        return [TokenResults.cat(p) for p in self.parts]


def _record_prompt(seq: Sequence, first: int, rows: TokenResults) -> None:
    """What prompt positions first, first + 1, ... produced for a scoring request (fed again after a
    preemption: replaced)."""
    layers = rows.exit_layer.tolist()
    del seq.prompt_exit_layers[first:]
    seq.prompt_exit_layers += layers
    k = seq.sampling.prompt_logprobs
    scored = min(len(layers), len(seq.prompt_ids) - 1 - first)  # the last prompt position scores nothing
    del seq.prompt_logprobs[first:], seq.prompt_top_logprobs[first:]
    seq.prompt_logprobs += rows.target_logprobs[:scored].tolist()
    ids, lps = rows.top_ids[:scored, :k].tolist(), rows.top_logprobs[:scored, :k].tolist()
    seq.prompt_top_logprobs += [dict(zip(i, v, strict=True)) for i, v in zip(ids, lps, strict=True)]


def rows_for(picked: list[tuple[Sequence, int]], teacher_forced: bool = False) -> Rows:
    """The next `n` unfed tokens of each (sequence, n). Teacher-forced, every row samples (greedy, at its
    exit) and scores the sequence's actual next token; otherwise only a sequence's last token samples (none
    when it generates nothing), and with prompt_logprobs each prompt position scores the next prompt token.
    Each row takes its phase's exit controls (prompt or generated token)."""
    width = max(len(seq.blocks) for seq, _ in picked)
    tables, positions, token_ids, sample, target, logprobs, exits, prompt = [], [], [], [], [], [], [], []
    per_seq: list[tuple[Sequence, int]] = []
    for seq, n in picked:
        tokens, prompt_len = seq.tokens, len(seq.prompt_ids)
        start = seq.num_computed
        if seq.drafting and not teacher_forced:  # one row: the round's next position, up to the draft depth
            spec = seq.spec
            tables.append(seq.blocks + [-1] * (width - len(seq.blocks)))
            positions.append(start + spec.fed)
            token_ids.append(spec.input_token(tokens[start]))
            exits.append(spec.config.draft_exit)
            prompt.append(False)
            sample.append(spec.fed < spec.k)  # the last step only feeds the last draft
            target.append(-1)
            logprobs.append(0 if spec.config.min_confidence > 0 else -1)
            per_seq.append((seq, 1))
            continue
        span = range(start, start + n)
        tables += [seq.blocks + [-1] * (width - len(seq.blocks))] * n
        positions += span
        token_ids += tokens[start : start + n]
        exits += [seq.exit.at(p, prompt_len) for p in span]
        prompt += [p < prompt_len for p in span]
        asked = -1 if seq.sampling.logprobs is None else seq.sampling.logprobs
        if teacher_forced:
            sample += [True] * n
            target += [tokens[p + 1] if p + 1 < len(tokens) else -1 for p in span]
            logprobs += [asked] * n
        else:
            sample += [False] * (n - 1) + [start + n == len(tokens) and seq.max_tokens > 0]
            scoring = seq.sampling.prompt_logprobs
            scored = [scoring is not None and p + 1 < prompt_len for p in span]
            target += [tokens[p + 1] if s else -1 for p, s in zip(span, scored, strict=True)]
            logprobs += [scoring if s else asked for s in scored]
        per_seq.append((seq, n))

    return _rows(per_seq, tables, width, positions, token_ids, exits, sample, logprobs, target, prompt)


def verify_rows(picked: list[tuple[Sequence, int]]) -> Rows:
    """Each sequence's round, positions b..b+k (its next token and drafts), at full depth; every row samples."""
    width = max(len(seq.blocks) for seq, _ in picked)
    tables, positions, token_ids, sample, target, logprobs, exits, prompt = [], [], [], [], [], [], [], []
    for seq, n in picked:
        b = seq.num_computed
        tables += [seq.blocks + [-1] * (width - len(seq.blocks))] * n
        positions += range(b, b + n)
        token_ids += [seq.tokens[b], *seq.spec.drafts]
        exits += [FULL_DEPTH] * n
        prompt += [False] * n
        sample += [True] * n
        target += [-1] * n
        logprobs += [-1 if seq.sampling.logprobs is None else seq.sampling.logprobs] * n
    return _rows(picked, tables, width, positions, token_ids, exits, sample, logprobs, target, prompt)


def _rows(
    per_seq: list[tuple[Sequence, int]], tables: list, width: int, positions: list, token_ids: list, exits: list,
    sample: list, logprobs: list, target: list, prompt: list,
) -> Rows:  # fmt: skip
    def each(value_of, dtype) -> torch.Tensor:
        return torch.tensor([value_of(s) for s, n in per_seq for _ in range(n)], dtype=dtype)

    return Rows(
        block_table=torch.tensor(tables, dtype=torch.int64).view(-1, width),
        positions=torch.tensor(positions, dtype=torch.int64),
        token_ids=torch.tensor(token_ids, dtype=torch.int64),
        policy=torch.tensor([int(e.policy) for e in exits], dtype=torch.int64),
        threshold=torch.tensor([e.threshold for e in exits], dtype=torch.float32),
        min_depth=torch.tensor([e.min_depth for e in exits], dtype=torch.int64),
        max_depth=torch.tensor([e.max_depth for e in exits], dtype=torch.int64),
        backfill=torch.tensor([int(e.backfill) for e in exits], dtype=torch.int64),
        sample=torch.tensor(sample, dtype=torch.bool),
        temperature=each(lambda s: s.sampling.temperature, torch.float32),
        top_p=each(lambda s: s.sampling.top_p, torch.float32),
        top_k=each(lambda s: s.sampling.top_k, torch.int64),
        seed=each(lambda s: s.seed, torch.int64),
        logprobs=torch.tensor(logprobs, dtype=torch.int64),
        target=torch.tensor(target, dtype=torch.int64),
        prompt=torch.tensor(prompt, dtype=torch.bool),
    )
