"""`adept generate` as a user runs it: a subprocess on the real default model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from tests.conftest import free_port
from workers.exit_pack import load_pack
from workers.model_store import DEFAULT_MODEL, resolve_model

pytestmark = pytest.mark.usefixtures("default_model_dir")  # converted once before the subprocesses start


def adept(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "serving.cli", *args], capture_output=True, text=True, timeout=300, env=env
    )


def test_json_output_is_deterministic_and_complete():
    args = ("generate", "The capital of France is", "--max-tokens", "8", "--json", "--layer-groups", "2")
    first, second = adept(*args, "--exit-policy", "none"), adept(*args, "--exit-policy", "none")
    assert first.returncode == 0, first.stderr
    out = json.loads(first.stdout)
    assert "Paris" in out["text"]
    assert len(out["token_ids"]) == len(out["exit_layers"]) == out["completion_tokens"] == 8
    assert out["num_layers"] == 30 and set(out["exit_layers"]) == {30}
    assert out["mean_exit_depth"] == 30.0 and out["tokens_per_second"] > 0
    assert out["layers_computed"] == out["layers_total"]
    assert json.loads(second.stdout)["token_ids"] == out["token_ids"]
    # by default the shipped exit pack's defaults decide, deterministically too
    default, again = adept(*args), adept(*args)
    assert default.returncode == 0, default.stderr
    out = json.loads(default.stdout)
    assert set(out["exit_layers"]) <= {8, 12, 16, 20, 24, 28, 30} and out["layers_computed"] <= out["layers_total"]
    assert json.loads(again.stdout)["exit_layers"] == out["exit_layers"]


def test_early_exit_flags_reach_the_engine():
    r = adept(
        "generate", "The capital of France is", "--max-tokens", "6", "--json",
        "--exit-policy", "static", "--max-depth", "12", "--backfill", "decoupled",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out["exit_layers"]) == {12} and out["mean_exit_depth"] == 12.0
    assert out["layers_computed"] < out["layers_total"]


def test_show_exits_and_chat():
    r = adept("generate", "What is 2+2?", "--chat", "--max-tokens", "4", "--show-exits", "--exit-policy", "none")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("[30]") == 4
    assert "4 tokens" in r.stderr and "tokens/s" in r.stderr


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--top-p", "1.5"], "top_p"),
        (["--max-tokens", "-3"], "max_tokens"),
        (["--threshold", "2"], "adept.threshold"),
        (["--model", "/nonexistent/model"], "unknown model"),
    ],
)
def test_bad_arguments_exit_2_with_a_message(flags, message):
    r = adept("generate", "hi", *flags)
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr


def test_adept_serve_starts_answers_and_stops_on_ctrl_c():
    """`adept serve` as a user runs it: its own local Ray, the addresses it prints, one request, Ctrl-C."""
    http, grpc = free_port(), free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled"}
    command = [sys.executable, "-m", "serving.cli", "serve", "--http-port", str(http), "--grpc-port", str(grpc)]
    proc = subprocess.Popen(
        [*command, "--max-model-len", "256"], stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    log: list[str] = []
    reader = threading.Thread(target=lambda: log.extend(proc.stderr), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 300
        while not any("Ctrl-C stops it" in line for line in log):
            assert proc.poll() is None, "".join(log)
            assert time.monotonic() < deadline, "adept serve did not come up:\n" + "".join(log)
            time.sleep(0.5)
        banner = "".join(log)
        assert f"http://127.0.0.1:{http}" in banner and f"127.0.0.1:{grpc}" in banner
        defaults = load_pack("auto", DEFAULT_MODEL, resolve_model(DEFAULT_MODEL)).defaults  # the shipped pack's
        assert "30 layers in 3 layer groups" in banner and f"default early exit: policy {defaults['policy']}" in banner
        assert "; prompt tokens: policy " + defaults["prefill"]["policy"] in banner
        assert f"KV cache: {(1 << 30) // (16 * 46_080) * 16} tokens per pipeline" in banner
        body = {"model": "smollm2-135m", "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0,
                "adept": {"policy": "none"}}  # fmt: skip
        r = httpx.post(f"http://127.0.0.1:{http}/v1/completions", json=body, timeout=120)
        assert r.status_code == 200 and "Paris" in r.json()["choices"][0]["text"]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 0, "".join(log)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
