"""Text corpora for calibration and evaluation, streamed: a plain text file (WikiText and the like) or JSONL
whose lines are {"text": ...} (raw text) or {"prompt": ...} / {"messages": [...]} (chat prompts, which
calibration can extend with the model's own continuations).

A corpus is used by line range, so calibration can train on one part of a file and evaluation can hold
out the rest: `part=(0.0, 0.5)` is the first half of the lines."""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerBase


class CorpusError(ValueError):
    pass


@dataclass(frozen=True)
class CorpusPart:
    """Lines [first, last) of a corpus file; `sha256` identifies the file."""

    path: Path
    sha256: str
    first: int
    last: int
    total: int

    @classmethod
    def of(cls, path: str | Path, part: tuple[float, float] = (0.0, 1.0)) -> CorpusPart:
        path = Path(path).expanduser()
        if not path.is_file():
            raise CorpusError(f"corpus {path} not found: give a text file or a JSONL file of prompts")
        lo, hi = part
        if not 0.0 <= lo < hi <= 1.0:
            raise CorpusError(f"corpus part {part} must satisfy 0 <= start < end <= 1")
        digest, total = hashlib.sha256(), 0
        with path.open("rb") as f:
            for line in f:
                digest.update(line)
                total += 1
        return cls(path, digest.hexdigest(), round(lo * total), round(hi * total), total)

    def after(self) -> CorpusPart:
        """The rest of the file after this part (held out from it)."""
        if self.last >= self.total:
            raise CorpusError(f"nothing of {self.path} is left after lines [{self.first}, {self.last})")
        return CorpusPart(self.path, self.sha256, self.last, self.total, self.total)

    def describe(self) -> dict:
        return {"path": str(self.path), "sha256": self.sha256, "lines": [self.first, self.last], "total": self.total}

    @property
    def is_jsonl(self) -> bool:
        return self.path.suffix == ".jsonl"

    def lines(self) -> Iterator[str]:
        with self.path.open(encoding="utf-8") as f:
            for i, line in enumerate(f):
                if i >= self.last:
                    return
                if i >= self.first:
                    yield line


def text_windows(part: CorpusPart, tokenizer: PreTrainedTokenizerBase, window: int) -> Iterator[list[int]]:
    """Consecutive `window`-token pieces of the part's running text ("text" lines of JSONL, or plain lines)."""
    buffer: list[int] = []
    for line in part.lines():
        text = _record(line).get("text", "") if part.is_jsonl else line
        if not text.strip():
            continue
        buffer += tokenizer.encode(text, add_special_tokens=False)
        while len(buffer) >= window:
            yield buffer[:window]
            buffer = buffer[window:]
    if len(buffer) > 1:
        yield buffer


def chat_prompts(part: CorpusPart) -> Iterator[list[dict]]:
    """The part's chat prompts as message lists (JSONL lines with "prompt" or "messages")."""
    if not part.is_jsonl:
        return
    for line in part.lines():
        record = _record(line)
        if "messages" in record:
            yield record["messages"]
        elif "prompt" in record:
            yield [{"role": "user", "content": record["prompt"]}]


def _record(line: str) -> dict:
    line = line.strip()
    if not line:
        return {}
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise CorpusError(f"a JSONL corpus line is not JSON ({e}): {line[:80]!r}") from e
    if not isinstance(record, dict):
        raise CorpusError(f"a JSONL corpus line must be an object with text, prompt or messages: {line[:80]!r}")
    return record


def labelled_texts(part: CorpusPart) -> list[tuple[str, int]]:
    """The part's (text, label) pairs: JSONL lines with "text" and "label", or TSV with a header row naming
    a `text` and a `label` column (GLUE's layout). Labels are integers (indices into a task's choices)."""
    if part.is_jsonl:
        records = (_record(line) for line in part.lines())
    else:
        with part.path.open(encoding="utf-8", newline="") as f:
            header = next(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE), [])
        if not {"text", "label"} <= set(header):
            raise CorpusError(f"{part.path}: a TSV of labelled texts needs a header row with text and label columns")
        lines = (line for line in part.lines() if line.rstrip("\n") != "\t".join(header))
        records = csv.DictReader(lines, fieldnames=header, delimiter="\t", quoting=csv.QUOTE_NONE)
    out = []
    for r in records:
        if not r:
            continue
        try:
            out.append((str(r["text"]).strip(), int(r["label"])))
        except (KeyError, ValueError) as e:
            raise CorpusError(f"{part.path}: each labelled text needs text and an integer label ({e})") from e
    return out
