"""Exit policies and back-fill modes as the numbers that travel in a batch's per-row tensors."""

from __future__ import annotations

from enum import IntEnum


class Policy(IntEnum):
    NONE = 0  # full depth
    STATIC = 1  # every token exits at max_depth
    CONFIDENCE = 2  # exit when the exit head's top probability reaches the threshold
    LEARNED = 3  # exit when a trained router's score reaches the threshold


class Backfill(IntEnum):
    EXACT = 0  # run the skipped layers on the exited token (later, batched)
    DECOUPLED = 1  # skipped layers' K/V straight from the exit hidden state
    MAPPED = 2  # like decoupled, through learned per-layer maps of the exit hidden state
    DRAFT = 3  # none: a speculative draft, whose deeper layers its verification runs (it returns its hidden state)
