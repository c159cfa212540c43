"""Streaming detokenization with the default model's real tokenizer: whole characters, stop strings held
back until they can no longer match."""

from __future__ import annotations

import pytest

from serving.engine.detokenizer import Detokenizer
from workers.model_store import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    return load_tokenizer(default_model_dir)


def stream(tokenizer, text: str, stop: list[str], prompt: str = "Say:") -> tuple[list[str], Detokenizer]:
    detok = Detokenizer(tokenizer, stop, tokenizer.encode(prompt, add_special_tokens=False))
    pieces = []
    for token in tokenizer.encode(text, add_special_tokens=False):
        pieces.append(detok.add(token))
        if detok.stopped:
            break
    pieces.append(detok.flush())
    return pieces, detok


def test_multibyte_characters_come_out_whole(tokenizer):
    text = " café ☃ 日本語 🎉 ok"
    pieces, _ = stream(tokenizer, text, [])
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_stop_string_across_tokens_is_never_emitted(tokenizer):
    text = " User: hi\n\nAssistant: hello there"
    pieces, detok = stream(tokenizer, text, ["\n\nAssistant:"])
    assert detok.stopped
    assert "".join(pieces) == " User: hi"
    # the first newline was held back while it could still begin the stop string
    assert not any("\n" in p for p in pieces)


def test_stop_string_inside_a_token_cuts_the_text(tokenizer):
    pieces, detok = stream(tokenizer, " The end is near, ENDING soon", ["END"])
    assert detok.stopped and "".join(pieces) == " The end is near, "


def test_held_back_text_is_released_when_it_cannot_match(tokenizer):
    text = " User: hi\n\nBob: hello"
    pieces, detok = stream(tokenizer, text, ["\n\nAssistant:"])
    assert not detok.stopped and "".join(pieces) == text
    # nothing is held longer than the stop string needs: the newlines came out before the end
    assert "\n\n" in "".join(pieces[:-1])
