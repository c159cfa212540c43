"""Document preparation for the offline lm-evaluation-harness tasks in this folder (their YAML files name
these functions with `!function`). Data: ../shared/data, read through the `datasets` csv and text builders,
so nothing is fetched from a hub. Each data set is split in two halves that never mix: the tune part
(for choosing exit defaults) and the report part (for the figures)."""

from __future__ import annotations

import re

import datasets

SST2_TUNE = 218  # dev.tsv rows [0, 218) tune, [218, 436) report
# valid.txt lines [0, 1880) trained the shipped exit pack; [1880, 3760) is held out. Of the held-out
# lines, articles starting before WIKITEXT_REPORT tune, the rest report.
WIKITEXT_HELD_OUT = 1880
WIKITEXT_REPORT = 2820
_ARTICLE = re.compile(r"^ = [^=].* = $")


def _sst2(rows: datasets.Dataset) -> datasets.Dataset:
    return rows.map(lambda r: {"text": r["text"].strip(), "label": int(r["label"])})


def sst2_tune(rows: datasets.Dataset) -> datasets.Dataset:
    return _sst2(rows.select(range(SST2_TUNE)))


def sst2_report(rows: datasets.Dataset) -> datasets.Dataset:
    return _sst2(rows.select(range(SST2_TUNE, len(rows))))


def _articles(lines: list[str], first: int) -> list[tuple[int, str]]:
    """(first line, text) of each article: lines joined from one top-level heading to the next."""
    articles: list[tuple[int, list[str]]] = []
    for i, line in enumerate(lines):
        if _ARTICLE.match(line) or not articles:
            articles.append((first + i, []))
        articles[-1][1].append(line)
    return [(start, "\n".join(body).strip() + "\n") for start, body in articles if "".join(body).strip()]


def _wikitext(rows: datasets.Dataset, start: int, end: int) -> datasets.Dataset:
    lines = rows["text"][WIKITEXT_HELD_OUT:]
    articles = [text for first, text in _articles(lines, WIKITEXT_HELD_OUT) if start <= first < end]
    return datasets.Dataset.from_dict({"page": articles})


def wikitext_tune(rows: datasets.Dataset) -> datasets.Dataset:
    return _wikitext(rows, WIKITEXT_HELD_OUT, WIKITEXT_REPORT)


def wikitext_report(rows: datasets.Dataset) -> datasets.Dataset:
    return _wikitext(rows, WIKITEXT_REPORT, len(rows))
