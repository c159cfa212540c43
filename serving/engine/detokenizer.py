"""Incremental detokenization with stop strings.

Text is decoded over a short window of recent tokens (so multi-byte characters split across tokens come out
whole), and a tail of the text that could still begin a stop string is held back until it cannot."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase


class Detokenizer:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: list[str], prompt_ids: list[int]) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        # The prompt's last tokens give the first new token its context (a SentencePiece leading space).
        self.ids: list[int] = list(prompt_ids[-4:])
        self.text = ""  # everything decoded so far (truncated at a stop string once one is seen)
        self.emitted = 0  # characters of `text` already handed out
        self.stopped = False
        self._prefix = 0  # token offsets of the decode window
        self._read = len(self.ids)

    def add(self, token_id: int) -> str:
        """Append a token; returns the text that is now safe to emit."""
        self.ids.append(token_id)
        prefix_text = self._decode(self.ids[self._prefix : self._read])
        full_text = self._decode(self.ids[self._prefix :])
        if len(full_text) > len(prefix_text) and not full_text.endswith("\ufffd"):
            searched_from = max(0, len(self.text) - self.hold)
            self.text += full_text[len(prefix_text) :]
            self._prefix, self._read = self._read, len(self.ids)
            self._check_stop(searched_from)
        safe = len(self.text) if self.stopped else max(self.emitted, len(self.text) - self._partial_stop())
        return self._emit(safe)

    def flush(self) -> str:
        """At the end of generation: whatever was held back."""
        return self._emit(len(self.text))

    def _partial_stop(self) -> int:
        """Length of the longest tail of the text that is the beginning of a stop string."""
        for k in range(min(self.hold, len(self.text)), 0, -1):
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in self.stop):
                return k
        return 0

    def _check_stop(self, start: int) -> None:
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True

    def _emit(self, upto: int) -> str:
        out = self.text[self.emitted : upto]
        self.emitted = max(self.emitted, upto)
        return out

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
