"""Engine configuration from Python, YAML and the environment, and the pipeline plan derived from it."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from transformers import LlamaConfig

from serving.config import AppConfig
from serving.engine.config import EngineConfig
from serving.engine.plan import default_exit_points, plan_pipeline
from serving.engine.speculative import SpeculativeParams
from workers.arch import ModelArch

ARCH = ModelArch.from_config(
    LlamaConfig(num_hidden_layers=30, hidden_size=64, num_attention_heads=4, max_position_embeddings=8192)
)


def test_environment_and_yaml_feed_the_same_config(tmp_path, monkeypatch):
    monkeypatch.setenv("ADEPT_MAX_NUM_SEQS", "16")
    monkeypatch.setenv("ADEPT_EXIT__POLICY", "confidence")
    monkeypatch.setenv("ADEPT_EXIT__THRESHOLD", "0.7")
    config = EngineConfig()
    assert (config.max_num_seqs, config.exit.policy, config.exit.threshold) == (16, "confidence", 0.7)

    path = tmp_path / "engine.yaml"
    path.write_text("num_layer_groups: 3\nmax_num_seqs: 4\nexit:\n  policy: static\n  max_depth: 12\n")
    config = EngineConfig.from_yaml(path, max_model_len=1024)
    assert (config.num_layer_groups, config.max_num_seqs, config.max_model_len) == (3, 4, 1024)  # YAML beats env
    assert (config.exit.policy, config.exit.max_depth) == ("static", 12)


def test_speculative_default_from_yaml_and_environment(tmp_path, monkeypatch):
    assert EngineConfig().speculative == SpeculativeParams(num_tokens=0, draft_depth="auto")  # off
    monkeypatch.setenv("ADEPT_SPECULATIVE__NUM_TOKENS", "4")
    assert EngineConfig().speculative == SpeculativeParams(num_tokens=4, draft_depth="auto")
    monkeypatch.setenv("ADEPT_SPECULATIVE__DRAFT_DEPTH", "20")
    assert EngineConfig().speculative == SpeculativeParams(num_tokens=4, draft_depth=20)

    path = tmp_path / "app.yaml"  # the file adept serve --config and serve run read
    path.write_text("engine:\n  speculative:\n    num_tokens: 3\n    draft_depth: 10\n")
    assert AppConfig.from_yaml(path).engine.speculative == SpeculativeParams(num_tokens=3, draft_depth=10)
    path.write_text("engine:\n  speculative:\n    num_tokens: 17\n")
    with pytest.raises(ValidationError, match=r"engine\.speculative\.num_tokens"):
        AppConfig.from_yaml(path)


def test_bad_config_names_the_field(tmp_path):
    with pytest.raises(ValidationError, match="max_num_seqs"):
        EngineConfig(max_num_seqs=0)
    with pytest.raises(ValidationError, match="max_num_sequences"):  # typos are not silently ignored
        EngineConfig(max_num_sequences=4)
    with pytest.raises(ValidationError, match="layer_boundaries needs 2 entries"):
        EngineConfig(num_layer_groups=3, layer_boundaries=[10])


def test_default_plan_splits_layers_evenly_with_exit_points_per_group():
    plan = plan_pipeline(EngineConfig(num_layer_groups=3, max_model_len=4096), ARCH)
    assert [(g.start, g.end) for g in plan.groups] == [(0, 10), (10, 20), (20, 30)]
    assert plan.exit_points == (8, 12, 16, 20, 24, 28, 30)
    assert [g.exit_points for g in plan.groups] == [(8,), (12, 16, 20), (24, 28, 30)]
    assert plan.min_exit_depth == 7
    assert all(g.max_len == 4096 and g.block_size == 16 and g.kv_cache_memory is None for g in plan.groups)


def test_explicit_boundaries_and_exit_points_always_include_the_last_layer():
    config = EngineConfig(num_layer_groups=2, layer_boundaries=[5], exit_points=[3, 5, 9], min_exit_depth=2)
    plan = plan_pipeline(config, ARCH)
    assert [(g.start, g.end) for g in plan.groups] == [(0, 5), (5, 30)]
    assert plan.exit_points == (3, 5, 9, 30)
    assert [g.exit_points for g in plan.groups] == [(3, 5), (9, 30)]
    assert default_exit_points(12, 1) == [2, 4, 6, 8, 10, 12]


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (EngineConfig(num_layer_groups=31), "exceeds the model's 30 layers"),
        (EngineConfig(num_layer_groups=3, layer_boundaries=[20, 10]), "must increase strictly"),
        (EngineConfig(exit_points=[0, 10]), r"exit points must be depths in \[1, 30\]"),
        (EngineConfig(max_model_len=10_000), "exceeds the model's 8192 positions"),
    ],
)
def test_impossible_plans_are_refused(config, message):
    with pytest.raises(ValueError, match=message):
        plan_pipeline(config, ARCH)
