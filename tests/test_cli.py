"""`adept generate` as a user runs it: a subprocess on the real default model (speculative flags: on a tiny
model, and through the CLI's own parser and request path in-process, as tests/test_golden.py replays it)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import psutil
import pytest

from serving import cli
from serving.engine import Engine
from serving.engine.messages import ModelInfo
from serving.engine.speculative import SpeculativeParams
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


def test_speculative_flags_keep_the_tokens_and_count_the_drafts(tiny_chat_dir):
    base = ["generate", "The quick brown fox", "--max-tokens", "12", "--model", str(tiny_chat_dir), "--exit-pack",
            "none", "--layer-groups", "3"]  # fmt: skip
    spec = ["--speculative-tokens", "2", "--draft-depth", "4"]  # the tiny model's 6 layers: boundaries 2 and 4
    parsed = [cli.parser().parse_args(argv) for argv in ([*base, "--json"], [*base, "--json", *spec], base + spec)]
    engine = Engine.local(cli._app_config(parsed[0]).engine)

    async def run() -> list[tuple[str, str]]:
        outs = []
        try:
            for args in parsed:
                out, err = io.StringIO(), io.StringIO()
                with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                    assert await cli.generate_with(engine, args) == 0
                outs.append((out.getvalue(), err.getvalue()))
        finally:
            await engine.shutdown()
        return outs

    (plain, _), (fast, _), (printed, summary) = asyncio.run(run())
    plain, fast = json.loads(plain), json.loads(fast)
    assert fast["token_ids"] == plain["token_ids"] and fast["text"] == plain["text"] == printed.removesuffix("\n")
    assert fast["exit_layers"] == [6] * 12 and plain["draft_tokens"] == plain["accepted_tokens"] == 0
    assert fast["draft_tokens"] > 0 and fast["accepted_tokens"] <= fast["draft_tokens"]
    assert " drafts accepted, " in summary and "12 tokens" in summary


def test_speculative_flags_set_the_servers_default_or_one_requests():
    serve = cli.parser().parse_args(["serve", "--speculative-tokens", "3", "--draft-depth", "10"])
    assert cli._app_config(serve).engine.speculative == SpeculativeParams(num_tokens=3, draft_depth=10)
    generate = cli.parser().parse_args(["generate", "hi", "--speculative-tokens", "3", "--draft-depth", "auto"])
    assert cli._app_config(generate).engine.speculative == SpeculativeParams()  # the request's, not the engine's
    # adept serve's start-up line about it (none while it is off)
    info = ModelInfo("m", 30, [8, 30], 3, 1024, {}, 0, {"num_tokens": 3, "draft_depth": "auto"}, [8], 8)
    assert "default speculative decoding: up to 3 drafts a round from depth 8 (auto)" in cli._speculative_line(info)
    info.default_speculative = {"num_tokens": 0, "draft_depth": "auto"}
    assert cli._speculative_line(info) == ""


SPECULATE = "--speculative-tokens 2 --draft-depth "
NOT_A_DEPTH = "speculative.draft_depth: 6 is not a depth a draft can stop at: pick one from 1 to 5 or 'auto'"


@pytest.mark.parametrize(
    ("command", "flags", "message", "as_user"),
    [
        ("generate", SPECULATE + "6", "adept." + NOT_A_DEPTH, True),
        ("serve", SPECULATE + "6", "engine." + NOT_A_DEPTH, True),
        ("generate", SPECULATE + "deep", "--draft-depth: 'deep' is not a depth", False),
        ("generate", "--draft-depth 2", "--draft-depth: speculative decoding is off", False),
    ],
    ids=["generate-not-a-depth", "serve-not-a-depth", "malformed-depth", "depth-without-tokens"],
)
def test_bad_speculative_flags_exit_2_with_one_line(tiny_chat_dir, capsys, command, flags, message, as_user):
    """A draft depth the model does not have, as a user meets it (a subprocess; `adept serve` refuses it
    before starting anything); malformed flags, refused before the model loads (in-process)."""
    argv = [command, *(["hi"] if command == "generate" else []), "--model", str(tiny_chat_dir), "--exit-pack", "none"]
    if as_user:
        r = adept(*argv, *flags.split())
        code, err = r.returncode, r.stderr
    else:
        code, err = cli.main([*argv, *flags.split()]), capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith(f"adept: error: {message}"), err


@contextlib.contextmanager
def adept_serve(*flags: str):
    """`adept serve` as a user runs it (its own local Ray, a process group of its own as a shell gives it),
    up and printing its banner; yields (process, log lines, HTTP port, gRPC port, every process it started,
    noted now). Afterwards whatever is left of them is killed."""
    http, grpc = free_port(), free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled"}
    command = [sys.executable, "-m", "serving.cli", "serve", "--http-port", str(http), "--grpc-port", str(grpc)]
    proc = subprocess.Popen(
        [*command, "--max-model-len", "256", *flags], stderr=subprocess.PIPE, text=True, env=env,
        start_new_session=True,
    )  # fmt: skip
    log: list[str] = []
    threading.Thread(target=lambda: log.extend(proc.stderr), daemon=True).start()
    started: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 300
        while not any("Ctrl-C stops it" in line for line in log):
            assert proc.poll() is None, "".join(log)
            assert time.monotonic() < deadline, "adept serve did not come up:\n" + "".join(log)
            time.sleep(0.5)
        started = psutil.Process(proc.pid).children(recursive=True)
        yield proc, log, http, grpc, started
    finally:
        for p in [psutil.Process(proc.pid), *started] if proc.poll() is None else started:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()


def left_running(started: list[psutil.Process], http: int, grpc: int) -> list[str]:
    """What of `started` still runs, and who listens on the two ports."""
    alive = [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    listening = [c.laddr.port for c in psutil.net_connections("tcp") if c.status == "LISTEN"]
    return [f"{p.pid} {p.name()}" for p in alive] + [f"port {port}" for port in (http, grpc) if port in listening]


def long_stream(http: int, result: dict) -> None:
    """A streamed completion too long to end by itself before the server stops; its last event in `result`."""
    body = {"model": "smollm2-135m", "prompt": "Once upon a time", "max_tokens": 200, "temperature": 0,
            "ignore_eos": True, "stream": True, "adept": {"policy": "none"}}  # fmt: skip
    try:
        with httpx.stream("POST", f"http://127.0.0.1:{http}/v1/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    result["chunks"] = result.get("chunks", 0) + 1
                    result["finish_reason"] = (json.loads(line[6:])["choices"] or [{}])[0].get("finish_reason")
                result["done"] = result.get("done", False) or line == "data: [DONE]"
    except httpx.HTTPError as e:
        result["error"] = repr(e)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_adept_serve_answers_then_stops_on_a_signal_to_its_process_group(signum):
    """Ctrl-C in a terminal (SIGINT) or a supervisor's SIGTERM reaches the whole process group: the server
    stops in order within 30 s, a stream in flight ends with finish_reason set (cut after --shutdown-grace),
    and nothing it started is left running or listening."""
    with adept_serve("--shutdown-grace", "1") as (proc, log, http, grpc, started):
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
        stream: dict = {}
        streaming = threading.Thread(target=long_stream, args=(http, stream))
        streaming.start()
        while not stream.get("chunks"):
            assert streaming.is_alive(), stream
            time.sleep(0.1)
        signalled = time.monotonic()
        os.killpg(proc.pid, signum)
        assert proc.wait(timeout=60) == 0, "".join(log)
        assert time.monotonic() - signalled < 30
        streaming.join(timeout=30)
        assert stream["finish_reason"] == "abort" and stream["done"] and "error" not in stream, stream
        time.sleep(2)  # the workers' last exits
        assert left_running(started, http, grpc) == []


def test_adept_serve_killed_leaves_nothing_running():
    """SIGKILL of `adept serve` (the OOM killer, say): 20 s later nothing it started runs or holds a port."""
    with adept_serve() as (proc, _, http, grpc, started):
        assert any(p.name() == "raylet" for p in started)
        proc.kill()
        deadline = time.monotonic() + 20
        while left_running(started, http, grpc) and time.monotonic() < deadline:
            time.sleep(1)
        assert left_running(started, http, grpc) == []


@pytest.mark.parametrize("held", ["http", "grpc"])
def test_adept_serve_refuses_a_port_in_use_at_once_with_one_line(held):
    """A plain listener on the port: refused before Ray starts, exit 2, one line naming the address and flag."""
    ports = {"http": free_port(), "grpc": free_port()}
    with socket.create_server(("127.0.0.1", ports[held])):
        started = time.monotonic()
        proc = adept("serve", "--http-port", str(ports["http"]), "--grpc-port", str(ports["grpc"]))
    flag = {"http": "--http-port", "grpc": "--grpc-port"}[held]
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert f"127.0.0.1:{ports[held]}" in proc.stderr and flag in proc.stderr and "in use" in proc.stderr
    assert time.monotonic() - started < 60  # imports only: nothing was started


def test_adept_serve_refuses_the_port_of_a_running_server(served):
    """Serve's proxy binds with SO_REUSEPORT; a second server must not share its port but be refused."""
    proc = adept("serve", "--http-port", str(served.config.http.port), "--grpc-port", str(free_port()))
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert f"127.0.0.1:{served.config.http.port} (HTTP) is in use" in proc.stderr
    assert httpx.get(f"{served.http}/health", timeout=30).status_code == 200
