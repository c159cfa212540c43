"""Continuous batching: which rows (prompt chunks and decode tokens of many sequences) go into each step.

The scheduler owns the KV slot allocation; workers only index their caches by slot. It knows nothing
about how layer groups are called: the engine hands its batches to a pipeline."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from serving.exceptions import QueueFullError
from serving.params import ResolvedExit, SamplingParams
from workers.kv_cache import SlotAllocator
from workers.protocol import Rows, TokenResults


@dataclass
class Sequence:
    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams
    exit: ResolvedExit
    seed: int
    max_tokens: int
    output_ids: list[int] = field(default_factory=list)
    exit_layers: list[int] = field(default_factory=list)  # per generated token
    layers_computed: int = 0  # sum of exit depths of every token fed through the model
    slot: int | None = None
    num_computed: int = 0  # positions fed through the model
    in_flight: bool = False
    aborted: bool = False

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def prefill_done(self) -> bool:
        return self.num_computed >= len(self.prompt_ids)


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    counts: list[int]  # rows of each sequence, in order
    rows: Rows


@dataclass
class SequenceUpdate:
    seq: Sequence
    sampled: TokenResults | None  # the row that sampled the next token; None: a prompt chunk before the end

    @property
    def token(self) -> int | None:
        return None if self.sampled is None else int(self.sampled.tokens[0])


class Scheduler:
    def __init__(self, max_num_seqs: int, max_num_batched_tokens: int, max_waiting: int) -> None:
        self.slots = SlotAllocator(max_num_seqs)
        self.token_budget = max_num_batched_tokens
        self.max_waiting = max_waiting
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        # Waiting requests beyond the free slots are the real queue.
        if len(self.waiting) - self.slots.num_free >= self.max_waiting:
            raise QueueFullError(
                f"the admission queue is full ({self.max_waiting} requests waiting for {self.slots.capacity} "
                "slots); retry later"
            )
        self.waiting.append(seq)

    def abort(self, request_id: str) -> Sequence | None:
        """Marks the sequence aborted; returns it if it holds no slot work in flight (free it now)."""
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
        """Every sequence holding a slot starts over from position 0 (prompt and generated tokens are fed
        again, the last one sampling the next token): after a worker lost its KV cache. Returns them."""
        for seq in self.running:
            seq.num_computed = 0
            seq.in_flight = False
        return list(self.running)

    def reserve(self, seqs: list[Sequence]) -> None:
        """KV slots for sequences the caller feeds itself (teacher forcing), outside the running batch."""
        if len(seqs) > self.slots.num_free:
            raise RuntimeError(f"{len(seqs)} sequences need as many free KV slots: raise max_num_seqs")
        for seq in seqs:
            seq.slot = self.slots.allocate()

    def remove(self, seq: Sequence) -> int | None:
        """Drop a finished or aborted sequence; returns its slot, which the caller frees on every worker."""
        if seq in self.running:
            self.running.remove(seq)
        slot, seq.slot = seq.slot, None
        if slot is not None:
            self.slots.free(slot)
        return slot

    def schedule(self, max_seqs: int | None = None) -> ScheduledBatch | None:
        """The next batch: at most `max_seqs` sequences and the token budget's worth of rows."""
        budget = self.token_budget
        room = max_seqs or self.slots.capacity
        picked: list[tuple[Sequence, int]] = []
        # Decode rows first (one token each), then unfinished prompts, then new sequences.
        ready = [s for s in self.running if not s.in_flight and not s.aborted]
        # Unfed tokens: 1 for a decoding sequence; more for a prompt in chunks, or for a sequence whose K/V is
        # rebuilt (prompt and generated tokens) after a worker was lost.
        for seq in sorted(ready, key=lambda s: len(s.tokens) - s.num_computed > 1):
            if budget == 0 or len(picked) == room:
                break
            n = min(len(seq.tokens) - seq.num_computed, budget)
            picked.append((seq, n))
            budget -= n
        while self.waiting and budget > 0 and self.slots.num_free > 0 and len(picked) < room:
            seq = self.waiting.popleft()
            seq.slot = self.slots.allocate()
            self.running.append(seq)
            n = min(len(seq.prompt_ids), budget)
            picked.append((seq, n))
            budget -= n
        if not picked:
            return None
        for seq, _ in picked:
            seq.in_flight = True
        return ScheduledBatch([s for s, _ in picked], [n for _, n in picked], rows_for(picked))

    def update(self, batch: ScheduledBatch, results: TokenResults) -> list[SequenceUpdate]:
        """Apply a step's results (per row) to its sequences."""
        updates = []
        start = 0
        for seq, n in zip(batch.seqs, batch.counts, strict=True):
            end = start + n
            seq.in_flight = False
            seq.num_computed += n
            seq.layers_computed += int(results.exit_layer[start:end].sum())
            sampled = None
            if seq.num_computed == len(seq.tokens):  # the last row sampled the next token
                sampled = results.select(slice(end - 1, end))
                seq.output_ids.append(int(sampled.tokens[0]))
                seq.exit_layers.append(int(sampled.exit_layer[0]))
            updates.append(SequenceUpdate(seq, sampled))
            start = end
        return updates


def rows_for(picked: list[tuple[Sequence, int]], teacher_forced: bool = False) -> Rows:
    """The next `n` unfed tokens of each (sequence, n). Teacher-forced, every row samples (greedy, at its
    exit) and scores the sequence's actual next token; otherwise only a sequence's last token samples."""
    slots, positions, token_ids, sample, target = [], [], [], [], []
    per_seq: list[tuple[Sequence, int]] = []
    for seq, n in picked:
        tokens = seq.tokens
        start = seq.num_computed
        slots += [seq.slot] * n
        positions += range(start, start + n)
        token_ids += tokens[start : start + n]
        if teacher_forced:
            sample += [True] * n
            target += [tokens[p + 1] if p + 1 < len(tokens) else -1 for p in range(start, start + n)]
        else:
            sample += [False] * (n - 1) + [start + n == len(tokens)]
            target += [-1] * n
        per_seq.append((seq, n))

    def each(value_of, dtype) -> torch.Tensor:
        return torch.tensor([value_of(s) for s, n in per_seq for _ in range(n)], dtype=dtype)

    return Rows(
        slots=torch.tensor(slots, dtype=torch.int64),
        positions=torch.tensor(positions, dtype=torch.int64),
        token_ids=torch.tensor(token_ids, dtype=torch.int64),
        policy=each(lambda s: int(s.exit.policy), torch.int64),
        threshold=each(lambda s: s.exit.threshold, torch.float32),
        min_depth=each(lambda s: s.exit.min_depth, torch.int64),
        max_depth=each(lambda s: s.exit.max_depth, torch.int64),
        backfill=each(lambda s: int(s.exit.backfill), torch.int64),
        sample=torch.tensor(sample, dtype=torch.bool),
        temperature=each(lambda s: s.sampling.temperature, torch.float32),
        top_p=each(lambda s: s.sampling.top_p, torch.float32),
        top_k=each(lambda s: s.sampling.top_k, torch.int64),
        seed=each(lambda s: s.seed, torch.int64),
        logprobs=each(lambda s: -1 if s.sampling.logprobs is None else s.sampling.logprobs, torch.int64),
        target=torch.tensor(target, dtype=torch.int64),
    )
