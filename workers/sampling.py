"""Sampling, done where the logits are: only token ids and log-probabilities leave the worker.

Random rows draw their noise from a generator seeded by (request seed, position), so a request's tokens do
not depend on which other requests share its batches, and the same seed gives the same output. A head over
fewer token ids (speculative drafts' draft vocabulary) races with the first entries of the full head's noise:
a draft and the full model's token at one position share their noise, which is what makes speculative
sampling lossless (serving/engine/speculative.py)."""

from __future__ import annotations

import torch

_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: spreads (seed, position) pairs over the seed space


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    top_k: torch.Tensor,
    seed: torch.Tensor,
    positions: torch.Tensor,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """Next token per row of logits [R, V] (float32); temperature 0 is greedy. `vocab_size`: the full
    head's, when the logits cover only its first V ids (the noise is drawn for all of them)."""
    tokens = logits.argmax(dim=-1)
    random_rows = (temperature > 0).nonzero().flatten().tolist()
    for r in random_rows:
        scaled = logits[r] / temperature[r]
        k = int(top_k[r])
        if 0 < k < scaled.numel():
            kth = scaled.topk(k).values[-1]
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        probs = torch.softmax(scaled, dim=-1)
        p = float(top_p[r])
        if p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            # drop tokens once the mass before them already reaches top_p (the top token always stays)
            drop = (sorted_probs.cumsum(0) - sorted_probs) >= p
            probs = probs.scatter(0, order[drop], 0.0)
        generator = torch.Generator(device=logits.device)
        generator.manual_seed((int(seed[r]) * _MIX + int(positions[r])) % (1 << 63))
        noise = probs.new_empty(vocab_size or probs.numel()).exponential_(generator=generator)[: probs.numel()]
        tokens[r] = (probs / noise).argmax()  # exponential race: P(token) = probs[token]
    return tokens


def logprobs_of(
    logits: torch.Tensor, tokens: torch.Tensor, top: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities under the model's (untempered) distribution: of each chosen token, and the `top`
    most likely tokens with theirs."""
    logp = torch.log_softmax(logits, dim=-1)
    best = logp.topk(top, dim=-1) if top else None
    empty = logp.new_empty(logp.shape[0], 0)
    return (
        logp.gather(-1, tokens[:, None]).squeeze(-1),
        best.indices if best else empty.long(),
        best.values if best else empty,
    )
