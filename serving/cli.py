"""The `adept` command line."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
import threading
import time
from typing import get_args

from serving.app import GRPC_SERVICE, AppConfig
from serving.params import BackfillName, PolicyName, RequestError

log = logging.getLogger("adept")

ENGINE_FLAGS = ("model", "num_layer_groups", "exit_pack", "max_model_len", "device", "dtype")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="adept", description="ADEPT Serve: token-level early-exit LLM serving")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_generate(commands)
    _add_serve(commands)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except (RequestError, ValueError) as e:  # configuration and request errors the user can fix
        print(f"adept: error: {e}", file=sys.stderr)
        return 2


def _engine_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--config", help="configuration YAML (the fields of serving.app.AppConfig); flags override it")
    g.add_argument("--model", help="'smollm2-135m' (default) or a local Hugging Face model folder")
    g.add_argument("--layer-groups", type=int, dest="num_layer_groups", help="split the layers into N groups")
    g.add_argument("--exit-pack", help="calibrated exit pack directory")
    g.add_argument("--max-model-len", type=int, help="context length per sequence")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"])
    g.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])


def _app_config(args: argparse.Namespace) -> AppConfig:
    """The configuration file (if any) with the command line's flags on top."""
    data = (AppConfig.from_yaml(args.config) if args.config else AppConfig()).model_dump()
    data["engine"] |= _given(args, *ENGINE_FLAGS)
    data["http"] |= _given(args, host="http_host", port="http_port")
    data["grpc"] |= _given(args, host="grpc_host", port="grpc_port")
    data |= _given(args, "num_pipelines")
    return AppConfig.model_validate(data)


def _given(args: argparse.Namespace, *same: str, **renamed: str) -> dict:
    """Config fields from the flags that were given (field name -> attribute of args)."""
    names = {**{n: n for n in same}, **renamed}
    return {field: getattr(args, attr) for field, attr in names.items() if getattr(args, attr, None) is not None}


def _add_generate(commands) -> None:
    p = commands.add_parser("generate", help="generate a completion in-process", description="Generate text.")
    p.add_argument("prompt")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    e = p.add_argument_group("early exit")
    e.add_argument("--exit-policy", choices=get_args(PolicyName))
    e.add_argument("--threshold", type=float, help="confidence/learned threshold in [0, 1]")
    e.add_argument("--min-depth", type=int, help="no exit before this many layers")
    e.add_argument("--max-depth", type=int, help="exit by this depth (static: the fixed depth)")
    e.add_argument("--backfill", choices=get_args(BackfillName))
    out = p.add_argument_group("output")
    out.add_argument("--show-exits", action="store_true", help="print each token with its exit layer")
    out.add_argument("--json", action="store_true", help="print one JSON object with text, tokens and exits")
    _engine_options(p)
    p.set_defaults(run=_generate)


def _generate(args: argparse.Namespace) -> int:
    from serving.engine import Engine

    engine = Engine.local(_app_config(args).engine)
    return asyncio.run(_generate_with(engine, args))


async def _generate_with(engine, args: argparse.Namespace) -> int:
    prompt = engine.chat_prompt([{"role": "user", "content": args.prompt}]) if args.chat else args.prompt
    sampling = {
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "seed": args.seed,
        "stop": args.stop,
    }
    exit_keys = ("exit_policy", "threshold", "min_depth", "max_depth", "backfill")
    exit_params = {k.removeprefix("exit_"): getattr(args, k) for k in exit_keys if getattr(args, k) is not None}
    started = time.perf_counter()
    text, token_ids, exits, last = "", [], [], None
    stream = engine.submit(prompt, sampling, exit_params)
    async for out in stream:
        text += out.text
        token_ids += out.token_ids
        exits += out.exit_layers
        last = out
        if not args.json:
            piece = "".join(f"{out.text}[{d}]" for d in out.exit_layers) if args.show_exits else out.text
            print(piece, end="", flush=True)
    elapsed = time.perf_counter() - started
    await engine.shutdown()
    num_layers = engine.plan.num_layers
    mean_depth = sum(exits) / len(exits) if exits else 0.0
    if args.json:
        usage = last.usage
        print(
            json.dumps(
                {
                    "text": text,
                    "token_ids": token_ids,
                    "exit_layers": exits,
                    "num_layers": num_layers,
                    "tokens_per_second": len(token_ids) / elapsed,
                    "mean_exit_depth": mean_depth,
                    "finish_reason": last.finish_reason,
                    "prompt_tokens": usage.prompt_tokens,
                    "completion_tokens": usage.completion_tokens,
                    "layers_computed": usage.layers_computed,
                    "layers_total": usage.layers_total,
                }
            )
        )
    else:
        print()
        print(
            f"[{len(token_ids)} tokens, {len(token_ids) / elapsed:.1f} tokens/s, mean exit depth "
            f"{mean_depth:.1f} of {num_layers} layers, finish: {last.finish_reason}]",
            file=sys.stderr,
        )
    return 0


def _add_serve(commands) -> None:
    p = commands.add_parser(
        "serve",
        help="serve the model over HTTP (OpenAI API) and gRPC on Ray Serve",
        description="Start ADEPT Serve: layer-group workers on Ray, HTTP and gRPC on Ray Serve. Ctrl-C stops it.",
    )
    n = p.add_argument_group("network and cluster")
    n.add_argument("--http-host", help="HTTP bind address (default 127.0.0.1: this machine only)")
    n.add_argument("--http-port", type=int, help="HTTP port (default 8000)")
    n.add_argument("--grpc-host", help="gRPC bind address (default 127.0.0.1)")
    n.add_argument("--grpc-port", type=int, help="gRPC port (default 9000)")
    n.add_argument("--pipelines", type=int, dest="num_pipelines", help="pipelines (router replicas)")
    n.add_argument("--address", help="an existing Ray cluster (default: start one on this machine)")
    _engine_options(p)
    p.set_defaults(run=_serve)


def _serve(args: argparse.Namespace) -> int:
    from ray import serve

    from serving import server
    from serving.app import APP_NAME

    config = _app_config(args)
    server.init_ray(config, args.address)
    try:
        server.start(config)
        info = serve.get_deployment_handle("Router", APP_NAME).info.remote().result()
        log.warning(
            "ADEPT Serve is up: model %r, %d layers in %d layer groups, exit points %s, %d pipeline(s)\n"
            "  HTTP  http://%s:%d  (OpenAI API: /v1/completions, /v1/chat/completions, /v1/models; /health)\n"
            "  gRPC  %s:%d  (%s, server reflection on)\n"
            "Ctrl-C stops it.",
            info.name, info.num_layers, info.num_layer_groups, info.exit_points, config.num_pipelines,
            config.http.host, config.http.port, config.grpc.host, config.grpc.port, GRPC_SERVICE,
        )  # fmt: skip
        # Stop on Ctrl-C and on SIGTERM, even where the shell started us with SIGINT ignored (background).
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        threading.Event().wait()
    except KeyboardInterrupt:
        log.warning("stopping")
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
