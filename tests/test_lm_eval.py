"""lm-evaluation-harness against the real server: its `local-completions` model (no network) on the
repository's offline tasks (benchmarks/lm_eval_tasks over ../shared/data), with the server's default exit
controls (the shipped pack's), and its numbers against the in-process engine scoring the same tokens."""

from __future__ import annotations

import asyncio
import math
import os
from pathlib import Path

import pytest

from serving.engine import Engine
from serving.engine.config import EngineConfig
from serving.quality.evaluation import continuation_logprobs

TASKS = Path(__file__).resolve().parents[1] / "benchmarks" / "lm_eval_tasks"
MAX_LENGTH = 256  # lm-eval's window: short, so that a WikiText article is several requests


@pytest.fixture(scope="module")
def harness(served, shared_dir, default_model_dir, monkeypatch_module):
    """lm-eval's local-completions model pointed at the served application, and its task manager."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.models.openai_completions import LocalCompletionsAPI
    from lm_eval.tasks import TaskManager

    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch_module.setenv(name, "1")
    monkeypatch_module.chdir(TASKS.parents[1])  # the task files name ../shared/data from the repository root
    lm = LocalCompletionsAPI(
        base_url=f"{served.http}/v1/completions",
        model=served.model,
        tokenizer=str(default_model_dir),
        tokenizer_backend="huggingface",
        max_length=MAX_LENGTH,
        batch_size=4,
    )
    return lm_eval, lm, TaskManager(include_path=str(TASKS), include_defaults=False)


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def in_process(pairs: list[tuple[list[int], list[int]]]) -> list[float]:
    """The log-likelihood of each continuation after its context, scored by the in-process engine (three
    layer groups, the shipped pack's default exit controls, as the server has them)."""

    async def main():
        engine = Engine.local(EngineConfig(num_layer_groups=3, max_model_len=1024))
        try:
            return await continuation_logprobs(engine, pairs)
        finally:
            await engine.shutdown()

    return asyncio.run(main())


def test_sst2_and_wikitext_through_lm_eval_match_in_process(harness):
    lm_eval, lm, tasks = harness
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=["sst2_adept_report", "wikitext_adept_report"],
        task_manager=tasks,
        samples={"sst2_adept_report": [0, 1, 2, 3], "wikitext_adept_report": [2]},  # an article of ~1,000 tokens
        bootstrap_iters=0,
        log_samples=True,
    )
    sst2, wiki = out["samples"]["sst2_adept_report"], out["samples"]["wikitext_adept_report"]
    assert 0 <= out["results"]["sst2_adept_report"]["acc,none"] <= 1 and len(sst2) == 4 and len(wiki) == 1

    # SST-2: each document's two choices, scored by the harness through the server and in-process
    pairs, served = [], []
    for doc in sst2:
        for (context, continuation), response in zip(doc["arguments"], doc["resps"], strict=True):
            pairs.append(lm._encode_pair(context, continuation))  # as the harness splits them
            served.append(response[0][0])
    reference = in_process(pairs)
    assert served == pytest.approx(reference, rel=1e-3, abs=1e-3)
    predictions = [max(range(2), key=lambda c, i=i: served[2 * i + c]) for i in range(len(sst2))]
    assert predictions == [max(range(2), key=lambda c, i=i: reference[2 * i + c]) for i in range(len(sst2))]

    # WikiText: an article's rolling log-likelihood is lm-eval's disjoint windows, each scored in-process
    from lm_eval import utils

    doc = wiki[0]
    (page,) = doc["arguments"][0]
    tokens = lm.tok_encode(page)
    windows = [
        utils.make_disjoint_window(w)
        for w in utils.get_rolling_token_windows(tokens, lm.prefix_token_id, lm.max_length - 1, 1)  # as lm-eval does
    ]
    assert len(windows) > 1
    total = sum(in_process([(list(ctx), list(cont)) for ctx, cont in windows]))
    assert doc["resps"][0][0] == pytest.approx(total, rel=1e-3)
    ppl = out["results"]["wikitext_adept_report"]["word_perplexity,none"]
    assert math.isfinite(ppl) and ppl > 1
    assert os.environ["HF_DATASETS_OFFLINE"] == "1"
