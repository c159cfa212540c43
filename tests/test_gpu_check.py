"""benchmarks/gpu_check.py in its CPU mode (--tiny): every section is there, the engine at full depth is HF
token for token, speeds are positive, the static exits' bounds are what their depths say, and speculative
decoding gives full depth's tokens with every exact draft kept."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("gpu-check") / "report.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "benchmarks/gpu_check.py", "--tiny", "--device", "cpu", "--json", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout) == json.loads(out.read_text())
    return json.loads(out.read_text())


def speeds(node: object) -> list[float]:
    """Every tokens_per_s figure in the report."""
    if isinstance(node, dict):
        found = [v for k, v in node.items() if k.endswith("tokens_per_s")]
        return found + [s for v in node.values() for s in speeds(v)]
    return []


def test_every_section(report: dict) -> None:
    for key in (
        "machine",
        "model",
        "settings",
        "exit_depths",
        "full_depth",
        "static_exits",
        "layer_groups",
        "speculative",
    ):
        assert key in report
    c = str(report["settings"]["concurrency"])
    assert report["device"] == "cpu" and report["dtype"] == "float32"
    for level in ("1", c):
        assert set(report["full_depth"][level]) == {"hf", "engine"}
        assert set(report["layer_groups"][level]) == {"async", "sync"}
        for row in report["static_exits"].values():
            assert row[level]["ratio_min"] <= row[level]["ratio"] <= row[level]["ratio_max"]
    assert report["layer_groups"]["groups"] == 4
    assert report["layer_groups"]["exit_depth"] == report["exit_depths"][0]


def test_full_depth_is_hf_token_for_token(report: dict) -> None:
    parity = report["full_depth"]["parity"]
    assert parity["batched"]["prompts"] == report["settings"]["concurrency"]
    assert parity["alone"]["prompts"] == report["settings"]["alone"]
    for run in ("alone", "batched"):
        assert parity[run]["matching"] == parity[run]["prompts"]
        assert parity[run]["mean_common_prefix"] == parity["tokens_per_prompt"]


def test_speeds_are_positive(report: dict) -> None:
    found = speeds(report)
    assert len(found) > 20
    assert all(isinstance(s, float | int) and s > 0 for s in found)


def test_static_exit_bounds(report: dict) -> None:
    layers = report["model"]["num_hidden_layers"]
    depths = report["exit_depths"]
    assert depths == [layers // 4, layers // 2, 3 * layers // 4]
    c, alone = report["settings"]["concurrency"], report["settings"]["alone"]
    rows = report["static_exits"]
    assert len(rows) == len(depths) + 1
    for d in depths:
        for level in ("1", str(c)):
            row = rows[f"static {d}"][level]
            assert row["mean_exit_depth"] == d
            assert row["compute_bound"] == row["weight_read_bound"] == round(layers / d, 3)
    mix = next(row for name, row in rows.items() if name.startswith("mix"))
    assert mix["depths"] == depths
    for level, n in (("1", alone), (str(c), c)):
        asked = [depths[i % len(depths)] for i in range(n)]
        assert mix[level]["mean_exit_depth"] == round(statistics.fmean(asked), 3)
        assert mix[level]["compute_bound"] == round(layers / statistics.fmean(asked), 3)
    # one request at a time: each step's deepest row is its own; all together: the deepest depth asked
    assert mix["1"]["weight_read_bound"] == mix["1"]["compute_bound"]
    assert mix[str(c)]["weight_read_bound"] == round(layers / max(depths), 3)


def test_speculative_decoding_is_full_depths_and_keeps_exact_drafts(report: dict) -> None:
    spec = report["speculative"]
    assert spec["draft_depth"] == report["exit_depths"][-1] and spec["num_tokens"] == 4
    for level in ("1", str(report["settings"]["concurrency"])):
        for name in ("adaptive", "every round"):
            row = spec[level][name]
            assert row["identical"] == row["prompts"] > 0
            assert row["ratio_min"] <= row["ratio"] <= row["ratio_max"]
        forced = spec[level]["every round"]
        assert forced["accepted"] == forced["drafted"] > 0  # the copy's drafts are all exact
