"""Greedy outputs of the real default model that a code change must not alter: 12 `adept generate --json`
requests (plain and chat prompts, every exit policy and back-fill mode) recorded in tests/golden/greedy.json
before serving/ moved into wings (re-recorded when the shipped pack changed; its full-depth cases did not),
replayed through the CLI's own argument parser and request path on one in-process engine (an engine per
request, as the command makes, costs 10 s each here)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
from pathlib import Path

import pytest

from serving import cli
from serving.engine import Engine

GOLDEN = Path(__file__).parent / "golden" / "greedy.json"
COMPARED = ("text", "token_ids", "exit_layers", "finish_reason", "prompt_tokens", "completion_tokens")
COMPARED += ("layers_computed", "layers_total")

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("default_model_dir")]


def test_greedy_outputs_are_unchanged() -> None:
    cases = json.loads(GOLDEN.read_text())
    assert len(cases) == 12
    parsed = [cli.parser().parse_args(case["argv"]) for case in cases]
    engine_configs = {cli._app_config(args).engine.model_dump_json() for args in parsed}
    assert len(engine_configs) == 1, "the cases must share one engine configuration"
    engine = Engine.local(cli._app_config(parsed[0]).engine)

    async def replay() -> list[dict]:
        got = []
        try:
            for args in parsed:
                out = io.StringIO()
                with contextlib.redirect_stdout(out):
                    assert await cli.generate_with(engine, args) == 0
                got.append(json.loads(out.getvalue().strip().splitlines()[-1]))
                await engine.drain()
        finally:
            await engine.shutdown()
        return got

    got = asyncio.run(replay())
    for case, result in zip(cases, got, strict=True):
        assert {k: result[k] for k in COMPARED} == case["output"], f"adept {' '.join(case['argv'])}"
