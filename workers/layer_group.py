"""A layer group: decoder layers [start, end) of a Llama-family model, their KV cache, the exit heads at
the group's exit points, and the embeddings if it is the first group.

`forward` is the one call into a group: back-fills of tokens that exited in earlier groups, then the
forward rows, layer by layer, stopping each row at the exit point its policy chooses. Rows that exit
inside the group get the group's remaining layers back-filled in the same call."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from workers.arch import ModelArch, rope_tables
from workers.exit_pack import ExitPack
from workers.exits import ExitHead
from workers.kv_cache import KVCache, pool_size
from workers.kv_projection import decoupled_kv, mapped_inputs, split_rope
from workers.layers import AttentionLayout, apply_rope, rms_norm
from workers.model_store import load_config, load_tensors
from workers.modes import Backfill, Policy
from workers.protocol import (
    Continuing,
    GroupSpec,
    Rows,
    SkippedRows,
    StepResult,
    TokenResults,
    pad_cat,
    sequence_keys,
    to_device,
)
from workers.sampling import logprobs_of, sample


@dataclass
class _Exits:
    """Accumulates what happens to forward rows during a call. `carry_ids` (indices into the concatenation
    [forward rows, skipped rows], see `_run`) and `carry_hidden` list, in one order, the rows whose hidden
    state deeper groups need for back-fill: rows that exited here, and exact skipped rows run here."""

    last: torch.Tensor | None  # bool per forward row: no later row of its sequence is in the call (None: no
    # row can exit before the last layer, so nothing is back-filled here)
    drafting: bool = False  # some forward row is a speculative draft (else no exit looks for drafts)
    rows: list[torch.Tensor] = field(default_factory=list)
    results: list[TokenResults] = field(default_factory=list)
    scoring: list[_Scoring] = field(default_factory=list)
    # exited rows whose back-fill in this group waits for the end of the call (no later row of theirs in it)
    deferred: list[tuple[torch.Tensor, SkippedRows]] = field(default_factory=list)
    carry_ids: list[torch.Tensor] = field(default_factory=list)
    carry_hidden: list[torch.Tensor] = field(default_factory=list)
    drafted: list[torch.Tensor] = field(default_factory=list)  # speculative drafts that exited, and ...
    draft_hidden: list[torch.Tensor] = field(default_factory=list)  # ... their hidden states


@dataclass
class _Scoring:
    """Exited rows whose logits are needed (to sample their token, to score a target), kept until the end
    of the call so that one LM head serves every exit point of the group: the logits a confidence decision
    already computed, or the adapted hidden state the head still has to project."""

    results: TokenResults  # the exit point's results ...
    at: torch.Tensor  # ... rows of it these are
    rows: Rows
    logits: torch.Tensor | None
    adapted: torch.Tensor | None
    vocab: int | None = None  # speculative drafts: the LM head over the first this many token ids


class LayerGroup:
    def __init__(
        self,
        arch: ModelArch,
        spec: GroupSpec,
        weights: dict[str, torch.Tensor],
        rope: tuple[torch.Tensor, torch.Tensor],
        pack: ExitPack | None,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.arch, self.spec, self.pack, self.device, self.dtype = arch, spec, pack, device, dtype
        self.is_first = spec.start == 0
        self.is_last = spec.end == arch.num_layers
        self.windows = arch.sliding_windows[spec.start : spec.end]
        self.act = ACT2FN[arch.hidden_act]

        def stack(name: str) -> torch.Tensor:
            return torch.stack([weights.pop(f"model.layers.{i}.{name}") for i in range(spec.start, spec.end)])

        def stack_cat(names: list[str]) -> torch.Tensor:
            per_layer = [
                torch.cat([weights.pop(f"model.layers.{i}.{n}") for n in names]) for i in range(spec.start, spec.end)
            ]
            return torch.stack(per_layer)

        qkv = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
        gate_up = ["mlp.gate_proj", "mlp.up_proj"]
        # Fused, stacked weights: one matmul for q/k/v and one for gate/up per layer, and the K/V rows of
        # wqkv, viewed across layers, are the decoupled back-fill's batched projection.
        self.wqkv = stack_cat([f"{n}.weight" for n in qkv])
        self.bqkv = stack_cat([f"{n}.bias" for n in qkv]) if arch.qkv_bias else None
        self.wo = stack("self_attn.o_proj.weight")
        self.bo = stack("self_attn.o_proj.bias") if arch.o_bias else None
        self.w13 = stack_cat([f"{n}.weight" for n in gate_up])
        self.b13 = stack_cat([f"{n}.bias" for n in gate_up]) if arch.mlp_bias else None
        self.w2 = stack("mlp.down_proj.weight")
        self.b2 = stack("mlp.down_proj.bias") if arch.mlp_bias else None
        self.ln1 = stack("input_layernorm.weight")
        self.ln2 = stack("post_attention_layernorm.weight")
        self.embed = weights.get("model.embed_tokens.weight") if self.is_first else None
        # Every group has a head, with the pack's adapters at every depth it has them: speculative drafts may
        # stop at any depth (the identity head where the pack has none), not only at exit points.
        lm_head = weights.get("lm_head.weight", weights.get("model.embed_tokens.weight"))
        depths = list(range(spec.start + 1, spec.end + 1))
        self.head = ExitHead.build(
            weights["model.norm.weight"], lm_head, arch.rms_norm_eps, arch.num_layers, depths, pack, dtype, device
        )
        self.cos, self.sin = rope
        self._map_cache: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        n_layers = spec.end - spec.start
        num_blocks = pool_size(spec, arch, dtype, device)
        self.cache = KVCache(n_layers, num_blocks, spec.block_size, arch.num_kv_heads, arch.head_dim, dtype, device)

    @classmethod
    def load(
        cls,
        model_path: Path,
        spec: GroupSpec,
        pack: ExitPack | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> LayerGroup:
        """Load only this group's layers (plus embeddings if first), the final norm and the LM head."""
        device = torch.device(device)
        config = load_config(model_path)
        arch = ModelArch.from_config(config)
        layers = {f"model.layers.{i}." for i in range(spec.start, spec.end)}

        def want(name: str) -> bool:
            if name.startswith("model.layers."):
                return name[: name.index(".", len("model.layers.")) + 1] in layers
            if name == "model.embed_tokens.weight":
                return spec.start == 0 or arch.tie_word_embeddings
            return name in ("model.norm.weight", "lm_head.weight")

        weights = {k: v.to(device) for k, v in load_tensors(model_path, want, dtype).items()}
        rope = tuple(t.to(device) for t in rope_tables(config, spec.max_len, dtype))
        return cls(arch, spec, weights, rope, pack, device, dtype)

    # ---- calls ---------------------------------------------------------------------------------------

    @torch.inference_mode()
    def forward(self, batch: Rows | Continuing, owed: list[Continuing] | None = None) -> tuple[StepResult, Continuing]:
        """The one call into a layer group: Rows for the first group, the previous group's Continuing for
        the others (after `owed`: earlier outputs of the previous group, back-fill only, that the pipeline
        held back while no row came this deep). The K/V it owes tokens that skipped its layers land first;
        then the forward rows run layer by layer, each stopping at the exit point its policy chooses.
        Returns the small result (rows that exited here, what their exits produced) and what the next
        group needs."""
        started = time.time_ns()
        if owed:
            batch = Continuing.merge(owed, batch)
        if isinstance(batch, Rows):
            rows, hidden, skipped, skipped_hidden = batch, None, SkippedRows.empty(), None
        else:
            rows, hidden, skipped, skipped_hidden = batch.rows, batch.hidden, batch.skipped, batch.skipped_hidden
        n = len(rows)
        top_k = max(int(rows.logprobs.max()), 0) if n else 0  # alternatives: the most any row asked for
        on_device = to_device(rows, self.device), hidden, to_device(skipped, self.device), skipped_hidden
        exits, h = self._run(*on_device, top_k, 0 if isinstance(batch, Rows) else batch.depth)
        results = TokenResults.cat(exits.results) if exits.results else TokenResults.empty(0, top_k, self.device)
        result = StepResult(_cat_long(exits.rows, self.device).cpu(), to_device(results, torch.device("cpu")))
        if exits.drafted:
            result.drafted = torch.cat(exits.drafted).cpu()
            result.draft_hidden = torch.cat(exits.draft_hidden).cpu()
        result.timing = (started, time.time_ns())
        keep = torch.ones(n, dtype=torch.bool)
        keep[result.exited] = False
        going_on = rows.select(keep.nonzero().flatten())
        if self.is_last:
            return result, Continuing(going_on, h, SkippedRows.empty(), h[:0])
        # Owed by deeper groups: incoming decoupled/mapped rows (every group needs them) and the rows this
        # call carries (rows that exited here, and exact rows whose layers ran here).
        depth = torch.zeros(n, dtype=torch.int64)
        depth[result.exited] = result.results.exit_layer
        exited_here = SkippedRows(rows.block_table, rows.positions, depth, rows.backfill, torch.zeros_like(depth))
        carried = SkippedRows.cat([exited_here, skipped]).select(_cat_long(exits.carry_ids, self.device).cpu())
        carry = torch.cat(exits.carry_hidden) if exits.carry_hidden else h.new_empty(0, self.arch.hidden_size)
        passed = (skipped.backfill != Backfill.EXACT).nonzero().flatten()
        owed = SkippedRows.cat([skipped.select(passed), carried])
        owed.index = torch.arange(len(owed))
        owed_hidden = torch.cat([skipped_hidden[skipped.index[passed]], carry]) if len(passed) else carry
        return result, Continuing(going_on, h, owed, owed_hidden)

    def _run(
        self,
        rows: Rows,
        hidden: torch.Tensor | None,
        skipped: SkippedRows,
        skipped_hidden: torch.Tensor | None,
        top_k: int,
        enter: int = 0,
    ) -> tuple[_Exits, torch.Tensor]:
        """Back-fill the skipped rows, run the forward rows (from layer `enter` on, if past the group's
        start: speculative verification); returns what exited and the hidden states of the forward rows that
        go on."""
        n, first = len(rows), max(enter - self.spec.start, 0)
        if first and bool((skipped.backfill == Backfill.EXACT).any()):
            raise ValueError("rows entering past a group's first layer cannot carry exact back-fills")
        h_skipped = skipped_hidden.to(self.device, self.dtype)[skipped.index] if len(skipped) else None
        exact = torch.empty(0, dtype=torch.int64, device=self.device)
        if len(skipped):
            from_exit = (skipped.backfill != Backfill.EXACT).nonzero().flatten()
            if from_exit.numel():
                self._kv_from_exit(h_skipped[from_exit], skipped.select(from_exit))
            exact = (skipped.backfill == Backfill.EXACT).nonzero().flatten()

        if n == 0:  # a back-fill-only call
            x = torch.empty(0, self.arch.hidden_size, device=self.device, dtype=self.dtype)
        elif hidden is None:
            if not self.is_first:
                raise ValueError(f"layer group [{self.spec.start}, {self.spec.end}) needs hidden states as input")
            x = F.embedding(rows.token_ids, self.embed)
        else:
            x = hidden.to(self.device, self.dtype)
        # The rows run through the layers: forward rows, then exact skipped rows (which attend together with
        # the forward rows, in position order, so neither sees a hole in the other). `ids` index the
        # concatenation [forward rows, skipped rows].
        h = torch.cat([x, h_skipped[exact]]) if exact.numel() else x
        ids = torch.cat([torch.arange(n, device=self.device), n + exact])
        tables = pad_cat([rows.block_table, skipped.block_table[exact]]) if exact.numel() else rows.block_table
        positions = torch.cat([rows.positions, skipped.positions[exact]]) if exact.numel() else rows.positions
        deciding = ids < n  # forward rows that have not exited yet
        # Rows with policy none only exit at the last layer: skip the exit points in between for them.
        flags = torch.stack([(rows.policy != Policy.NONE).any(), (rows.backfill == Backfill.DRAFT).any()]).tolist()
        can_exit_early, drafting = flags if n else (False, False)
        last = _last_of_each_sequence(rows.block_table, rows.positions) if can_exit_early else None
        out = _Exits(last=last, drafting=drafting)
        draft_at = set(rows.max_depth[rows.backfill == Backfill.DRAFT].tolist()) if drafting else set()

        layout = None
        for i in range(first, self.spec.end - self.spec.start):
            if h.shape[0] == 0:
                break
            if layout is None:  # built once per set of rows, read by every layer
                layout = AttentionLayout.build(tables, positions, self.cos, self.sin, self.spec.block_size)
                at = self.cache.locate(tables, positions)
            h = self._layer(i, h, at, layout)
            depth = self.spec.start + i + 1
            at_point = depth in self.spec.exit_points
            draft_here = depth in draft_at and not at_point  # drafts exit at any depth (only they, here)
            if not (at_point or draft_here) or not (can_exit_early or depth == self.arch.num_layers):
                continue
            if not bool(deciding.any()):
                continue
            leaving = self._exit(depth, h, rows, ids, deciding, out, top_k, drafts_only=draft_here)
            if leaving is not None:  # decoupled/mapped rows leave; exact rows keep running this group's layers
                keep = torch.ones(h.shape[0], dtype=torch.bool, device=self.device)
                keep[leaving] = False
                h, ids, tables, positions, deciding = h[keep], ids[keep], tables[keep], positions[keep], deciding[keep]
                layout = None

        if not self.is_last:
            exact_done = ~deciding
            out.carry_ids.append(ids[exact_done])
            out.carry_hidden.append(h[exact_done])
        if out.deferred:
            self._kv_from_exit(torch.cat([d[0] for d in out.deferred]), SkippedRows.cat([d[1] for d in out.deferred]))
        if out.scoring:
            self._score(out.scoring, top_k)
        return out, h[deciding]

    def _score(self, items: list[_Scoring], top_k: int) -> None:
        """Sample the exited rows' tokens and score their targets, for every exit point of the call at once:
        one LM head for all rows whose logits no decision computed (it weighs as much as several layers), one
        more over the draft vocabulary for speculative drafts."""
        for vocab in dict.fromkeys(i.vocab for i in items):
            self._score_part([i for i in items if i.vocab == vocab], top_k, vocab)

    def _score_part(self, items: list[_Scoring], top_k: int, vocab: int | None) -> None:
        adapted = [i.adapted for i in items if i.logits is None]
        projected = None
        if adapted:
            projected = iter(self.head.project(torch.cat(adapted), vocab).split([len(a) for a in adapted]))
        logits = torch.cat([i.logits if i.logits is not None else next(projected) for i in items])
        rows = Rows.cat([i.rows for i in items])
        res = TokenResults.cat([i.results.select(i.at) for i in items])
        scored = (rows.target >= 0).nonzero().flatten()
        if scored.numel():
            logp = torch.log_softmax(logits[scored], dim=-1)
            res.target_logprobs[scored] = logp.gather(1, rows.target[scored, None]).squeeze(1)
            # rows that only score (prompt positions) and asked for alternatives: the best at their exit
            alt = (~rows.sample[scored] & (rows.logprobs[scored] > 0)).nonzero().flatten()
            if alt.numel() and top_k:
                best = logp[alt].topk(top_k, dim=-1)
                keep = torch.arange(top_k, device=self.device)[None, :] < rows.logprobs[scored[alt]][:, None]
                res.top_ids[scored[alt]] = torch.where(keep, best.indices, -1)
                res.top_logprobs[scored[alt]] = torch.where(keep, best.values, float("-inf"))
        sampling = rows.sample.nonzero().flatten()
        if sampling.numel():
            s, row_logits = rows.select(sampling), logits[sampling]
            full = None if vocab is None else self.head.lm_head.shape[0]  # drafts share the full head's noise
            chosen = sample(row_logits, s.temperature, s.top_p, s.top_k, s.seed, s.positions, full)
            res.tokens[sampling] = chosen
            asked = (s.logprobs >= 0).nonzero().flatten()
            if asked.numel():
                chosen_lp, best_ids, best_lp = logprobs_of(row_logits[asked], chosen[asked], top_k)
                at = sampling[asked]
                res.logprobs[at] = chosen_lp
                if top_k:  # each row keeps as many alternatives as it asked for
                    keep = torch.arange(top_k, device=self.device)[None, :] < s.logprobs[asked][:, None]
                    res.top_ids[at] = torch.where(keep, best_ids, -1)
                    res.top_logprobs[at] = torch.where(keep, best_lp, float("-inf"))
        start = 0
        for i in items:
            i.results.put(i.at, res.select(slice(start, start + len(i.at))))
            start += len(i.at)

    def free(self, blocks: torch.Tensor) -> None:
        self.cache.free(blocks.to(self.device))

    def rollback(self, block_table: torch.Tensor, positions: torch.Tensor) -> None:
        """Forget the K/V of these positions (rows of sequences' block tables): rejected speculative drafts."""
        self.cache.clear(self.cache.locate(block_table.to(self.device), positions.to(self.device)))

    def info(self) -> dict:
        """Which layers, which process, its pool's size, which blocks hold K/V: for operators (and the tests)."""
        return {
            "layers": [self.spec.start, self.spec.end],
            "pid": os.getpid(),
            "num_blocks": self.cache.num_blocks,
            "kv_cache_bytes": self.cache.nbytes,
            "occupied": self.cache.occupied(),
        }

    # ---- internals -----------------------------------------------------------------------------------

    def _layer(
        self, i: int, h: torch.Tensor, at: tuple[torch.Tensor, torch.Tensor], layout: AttentionLayout
    ) -> torch.Tensor:
        a = self.arch
        p = h.shape[0]
        x = rms_norm(h, self.ln1[i], a.rms_norm_eps)
        qkv = F.linear(x, self.wqkv[i], None if self.bqkv is None else self.bqkv[i])
        q, k, v = qkv.split([a.q_size, a.kv_size, a.kv_size], dim=-1)
        q = apply_rope(q.view(p, a.num_heads, a.head_dim), layout.cos, layout.sin)
        k = apply_rope(k.view(p, a.num_kv_heads, a.head_dim), layout.cos, layout.sin)
        self.cache.write(i, at, k, v.view(p, a.num_kv_heads, a.head_dim))

        mask, needed = layout.masks(self.windows[i])
        self.cache.check_complete(i, layout.tables, needed, self.spec.start + i)
        keys, values = self.cache.gather(i, layout.tables, layout.length)
        queries = q[layout.query_index].transpose(1, 2)  # [S, heads, Qmax, head_dim]
        attn = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask[:, None], enable_gqa=True)
        attn = attn.transpose(1, 2).reshape(-1, a.q_size)[layout.row_index]
        h = h + F.linear(attn, self.wo[i], None if self.bo is None else self.bo[i])

        x = rms_norm(h, self.ln2[i], a.rms_norm_eps)
        gate, up = F.linear(x, self.w13[i], None if self.b13 is None else self.b13[i]).chunk(2, dim=-1)
        return h + F.linear(self.act(gate) * up, self.w2[i], None if self.b2 is None else self.b2[i])

    def _exit(
        self,
        depth: int,
        h: torch.Tensor,
        rows: Rows,
        ids: torch.Tensor,
        deciding: torch.Tensor,
        out: _Exits,
        top_k: int,
        drafts_only: bool = False,
    ) -> torch.Tensor | None:
        """Decide exits at `depth`; record exited rows (sampling those that produce a token) and back-fill
        their remaining layers in this group (drafts: none, their hidden state goes back instead). Returns
        the positions in `h` of rows that leave the batch. `drafts_only`: a depth where only drafts exit."""
        if len(ids) == len(rows) and bool(deciding.all()):  # every forward row, in order: nothing to gather
            idx = row_ids = ids
            sub, h_deciding = rows, h
        else:
            idx = deciding.nonzero().flatten()
            row_ids = ids[idx]
            sub, h_deciding = rows.select(row_ids), h[idx]
        if drafts_only:
            exiting = (sub.backfill == Backfill.DRAFT) & (depth >= sub.max_depth)
            has_logits, logits = torch.zeros_like(exiting), None
        else:
            exiting, has_logits, logits = self.head.decide(depth, depth == self.arch.num_layers, h_deciding, sub)
        if not bool(exiting.any()):
            return None
        idx, row_ids, sub = idx[exiting], row_ids[exiting], sub.select(exiting.nonzero().flatten())
        deciding[idx] = False
        res = TokenResults.empty(idx.numel(), top_k, self.device)
        res.exit_layer[:] = depth
        need = (sub.sample | (sub.target >= 0)).nonzero().flatten()  # rows whose logits are needed
        if need.numel():
            if logits is not None and bool(has_logits[exiting][need].all()):
                # reuse what the confidence decision computed: logits rows follow has_logits' order
                pos_in_logits = torch.cumsum(has_logits.long(), 0) - 1
                scoring = _Scoring(
                    res, need, sub.select(need), logits[pos_in_logits[exiting.nonzero().flatten()[need]]], None
                )
                out.scoring.append(scoring)
            elif not out.drafting:
                adapted = self.head.adapt(h[idx[need]], depth, sub.prompt[need])
                out.scoring.append(_Scoring(res, need, sub.select(need), None, adapted))
            else:  # drafts project onto the draft vocabulary (a cheaper head), every other row onto all of it
                drafts = sub.backfill[need] == Backfill.DRAFT
                for part, vocab in ((need[drafts], self.spec.draft_vocab), (need[~drafts], None)):
                    if part.numel():
                        adapted = self.head.adapt(h[idx[part]], depth, sub.prompt[part])
                        out.scoring.append(_Scoring(res, part, sub.select(part), None, adapted, vocab))
        out.rows.append(row_ids)
        out.results.append(res)

        from_exit = sub.backfill != Backfill.EXACT
        if out.drafting:  # drafts leave too, with their hidden state and nothing to back-fill
            draft = sub.backfill == Backfill.DRAFT
            from_exit &= ~draft
            out.drafted.append(row_ids[draft])
            out.draft_hidden.append(h[idx[draft]].clone())
        backfilled = idx[from_exit]
        if backfilled.numel():
            if not self.is_last:
                out.carry_ids.append(row_ids[from_exit])
                out.carry_hidden.append(h[backfilled].clone())
            if depth < self.spec.end:
                meta = SkippedRows(
                    block_table=sub.block_table[from_exit],
                    positions=sub.positions[from_exit],
                    exit_layer=torch.full_like(backfilled, depth),
                    backfill=sub.backfill[from_exit],
                    index=torch.arange(backfilled.numel(), device=self.device),
                )
                # A row whose sequence has later rows in this call (a prompt chunk) needs its K/V before they
                # reach the next layer: then these rows back-fill now, in one product. Otherwise (decoding)
                # their back-fill joins one product for every exit point at the end of the call.
                if bool(out.last[row_ids[from_exit]].all()):
                    out.deferred.append((h[backfilled], meta))
                else:
                    self._kv_from_exit(h[backfilled], meta)
        return idx[from_exit | draft] if out.drafting else backfilled

    def _kv_from_exit(self, h_exit: torch.Tensor, meta: SkippedRows) -> None:
        """Decoupled/mapped back-fill of this group's layers that rows skipped (from each row's exit layer,
        or all of them for rows that exited in earlier groups): one batched product over the layers from the
        earliest exit on, for every row whatever its exit point (the weights are read once); each row's K/V
        is written from its own exit layer on."""
        a = self.arch
        first = (meta.exit_layer - self.spec.start).clamp(min=0)
        layers = slice(int(first.min()), self.spec.end - self.spec.start)
        mapped = meta.backfill == Backfill.MAPPED
        inputs = None
        if self.pack is not None and bool(mapped.any()):
            inputs = h_exit[None].expand(layers.stop - layers.start, *h_exit.shape).clone()
            for e in meta.exit_layer[mapped].unique().tolist():
                sel = (mapped & (meta.exit_layer == e)).nonzero().flatten()
                inputs[:, sel] = mapped_inputs(h_exit[sel], *self._maps(int(e), layers))
        kv = decoupled_kv(
            h_exit,
            self.ln1[layers],
            self.wqkv[layers, a.q_size :],
            None if self.bqkv is None else self.bqkv[layers, a.q_size :],
            a.rms_norm_eps,
            inputs,
        )
        k, v = split_rope(kv, a.num_kv_heads, a.head_dim, self.cos[meta.positions], self.sin[meta.positions])
        for f in first.unique().tolist():
            rows = (first == f).nonzero().flatten()
            where = self.cache.locate(meta.block_table[rows], meta.positions[rows])
            self.cache.write(slice(f, layers.stop), where, k[f - layers.start :, rows], v[f - layers.start :, rows])

    def _maps(self, exit_depth: int, layers: slice) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Stacked maps from the exit depth to each layer's input: down [Lk, r, H], up [Lk, H, r], bias
        [Lk, H]; zero (identity) where the pack has no map for a layer."""
        key = (exit_depth, layers.start)
        if key in self._map_cache:
            return self._map_cache[key]
        found = [self.pack.map_for(exit_depth, self.spec.start + i) for i in range(layers.start, layers.stop)]
        rank = max((m[0].shape[0] for m in found if m is not None), default=1)
        hsz = self.arch.hidden_size
        identity = (torch.zeros(rank, hsz), torch.zeros(hsz, rank), torch.zeros(hsz))
        stacked = tuple(
            torch.stack([(m or identity)[part] for m in found]).to(self.device, self.dtype) for part in range(3)
        )
        self._map_cache[key] = stacked
        return stacked


def _cat_long(items: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    return torch.cat(items) if items else torch.empty(0, dtype=torch.int64, device=device)


def _last_of_each_sequence(block_table: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Per row: no other row of the same sequence comes at a later position."""
    unique, inverse = torch.unique(sequence_keys(block_table), return_inverse=True)
    latest = torch.full((unique.numel(),), -1, dtype=positions.dtype, device=positions.device)
    latest.scatter_reduce_(0, inverse, positions, reduce="amax")
    return positions == latest[inverse]
