"""The `adept` command line."""

from __future__ import annotations

import argparse
import asyncio
import errno
import itertools
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from typing import get_args

from serving.config import GRPC_SERVICE, AppConfig
from serving.engine.config import EngineConfig
from serving.engine.exceptions import RequestError
from serving.engine.params import BackfillName, PolicyName
from serving.engine.plan import plan_pipeline
from serving.engine.speculative import SpeculativeParams, check_default
from serving.quality import calibrate
from serving.quality.continuations import Traffic
from serving.quality.evaluation import CHAT_PROMPTS, LEARNED_THRESHOLDS
from workers.arch import ModelArch
from workers.calibration import HEAD_KINDS, CalibrationSettings
from workers.corpus import CorpusPart, chat_prompts, text_windows
from workers.exit_pack import ExitPack, resolve_pack
from workers.kv_cache import kv_bytes_per_token
from workers.model_store import DEFAULT_MODEL, load_config, load_tokenizer, resolve_model

log = logging.getLogger("adept")

CALIBRATION_FLAGS = (
    "max_tokens", "adapter_rank", "mlp_hidden", "adapter_dtype", "map_rank", "steps", "batch_size", "lr",
    "router_steps", "cost_weight", "seed", "default_backfill", "device",
)  # fmt: skip
ENGINE_FLAGS = ("model", "num_layer_groups", "exit_pack", "max_model_len", "device", "dtype")


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adept", description="ADEPT Serve: token-level early-exit LLM serving")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_generate(commands)
    _add_serve(commands)
    _add_calibrate(commands)
    _add_eval(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except (RequestError, ValueError) as e:  # configuration and request errors the user can fix
        print(f"adept: error: {e}", file=sys.stderr)
        return 2


def _engine_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--config", help="configuration YAML (the fields of serving.config.AppConfig); flags override it")
    g.add_argument("--model", help="'smollm2-135m' (default) or a local Hugging Face model folder")
    g.add_argument("--layer-groups", type=int, dest="num_layer_groups", help="split the layers into N groups")
    g.add_argument("--exit-pack", help="'auto' (default: the pack shipped for the model), 'none', or a pack directory")
    g.add_argument("--max-model-len", type=int, help="context length per sequence")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"])
    g.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])


def _app_config(args: argparse.Namespace) -> AppConfig:
    """The configuration file (if any) with the command line's flags on top."""
    data = (AppConfig.from_yaml(args.config) if args.config else AppConfig()).model_dump()
    data["engine"] |= _given(args, *ENGINE_FLAGS)
    data["engine"]["speculative"] |= _speculative_flags(args, "engine_")
    data["http"] |= _given(args, host="http_host", port="http_port")
    data["grpc"] |= _given(args, host="grpc_host", port="grpc_port")
    data |= _given(args, "num_pipelines", "shutdown_grace_s")
    return AppConfig.model_validate(data)


def _speculative_options(p: argparse.ArgumentParser, dest: str, title: str, description: str) -> None:
    g = p.add_argument_group(title, description)
    g.add_argument("--speculative-tokens", type=int, metavar="N", dest=f"{dest}speculative_tokens",
                   help="tokens drafted per round at most, 0 to 16 (0: off)")  # fmt: skip
    g.add_argument("--draft-depth", metavar="D|auto", dest=f"{dest}draft_depth",
                   help="layers the drafts run (1 to the model's depth - 1), or 'auto' (the exit point where the "
                   "exit pack's agreement promises the most; default)")  # fmt: skip
    g.add_argument("--draft-min-confidence", type=float, metavar="P", dest=f"{dest}draft_min_confidence",
                   help="a round stops drafting at a draft its head gives less probability (0: never)")  # fmt: skip


def _speculative_flags(args: argparse.Namespace, dest: str) -> dict:
    """The speculative fields the flags give (`dest`: their attributes' prefix)."""
    given = _given(
        args, num_tokens=f"{dest}speculative_tokens", draft_depth=f"{dest}draft_depth",
        min_confidence=f"{dest}draft_min_confidence",
    )  # fmt: skip
    depth = given.get("draft_depth")
    if depth is not None and depth != "auto":
        try:
            given["draft_depth"] = int(depth)
        except ValueError:
            raise ValueError(f"--draft-depth: {depth!r} is not a depth; give a number of layers or 'auto'") from None
    return given


def _request_speculative(args: argparse.Namespace, default: SpeculativeParams) -> dict | None:
    """`adept generate`'s speculative flags (the engine takes the rest from the configuration's default)."""
    given = _speculative_flags(args, "")
    for field, flag in (("draft_depth", "--draft-depth"), ("min_confidence", "--draft-min-confidence")):
        if field in given and not given.get("num_tokens", default.num_tokens):
            raise ValueError(f"{flag}: speculative decoding is off; give --speculative-tokens N (1 to 16) too")
    return given or None


def _check_speculative(engine: EngineConfig) -> None:
    """A default draft depth the model does not have would refuse every request: say so before anything
    starts."""
    if engine.speculative.num_tokens == 0:
        return
    check_default(
        engine.speculative,
        plan_pipeline(engine, ModelArch.from_config(load_config(resolve_model(engine.model)))).groups,
    )


def _check_ports(config: AppConfig) -> None:
    """Refuse a listener's port that anything holds before starting Ray. Serve's own proxy binds with
    SO_REUSEPORT, so another `adept serve` on the port would share it (requests landing on either server)
    rather than fail; a plain bind fails for any listener there."""
    for name, listener, flag in (("HTTP", config.http, "--http-port"), ("gRPC", config.grpc, "--grpc-port")):
        try:
            socket.create_server((listener.host, listener.port)).close()
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                raise ValueError(f"cannot listen on {listener.host}:{listener.port} ({name}): {e.strerror}") from None
            raise ValueError(
                f"{listener.host}:{listener.port} ({name}) is in use (another adept serve?): stop what holds it, "
                f"or choose another port with {flag}"
            ) from None


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
    _speculative_options(
        p, "", "speculative decoding", "this request's: the exit head at --draft-depth drafts, the deeper "
        "layers verify, the tokens are full depth's (sampled: plain decoding's for the seed); no early-exit flags "
        "with it",
    )  # fmt: skip
    out = p.add_argument_group("output")
    out.add_argument("--show-exits", action="store_true", help="print each token with its exit layer")
    out.add_argument("--json", action="store_true", help="print one JSON object with text, tokens and exits")
    _engine_options(p)
    p.set_defaults(run=_generate)


def _generate(args: argparse.Namespace) -> int:
    from serving.engine import Engine

    config = _app_config(args).engine
    _request_speculative(args, config.speculative)  # bad speculative flags fail before the model loads
    engine = Engine.local(config)

    async def run() -> int:
        try:
            return await generate_with(engine, args)
        finally:
            await engine.shutdown()

    return asyncio.run(run())


async def generate_with(engine, args: argparse.Namespace) -> int:
    """`adept generate`'s request on an engine: prints the tokens (or one JSON object)."""
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
    speculative = _request_speculative(args, engine.config.speculative)
    started = time.perf_counter()
    text, token_ids, exits, last, speculated = "", [], [], None, False
    stream = engine.submit(prompt, sampling, exit_params, speculative=speculative)
    async for out in stream:
        text += out.text
        token_ids += out.token_ids
        exits += out.exit_layers
        speculated |= out.accepted is not None
        last = out
        if not args.json:
            piece = "".join(f"{out.text}[{d}]" for d in out.exit_layers) if args.show_exits else out.text
            print(piece, end="", flush=True)
    elapsed = time.perf_counter() - started
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
                    "draft_tokens": usage.draft_tokens,
                    "accepted_tokens": usage.accepted_tokens,
                }
            )
        )
    else:
        usage = last.usage
        drafts = f", {usage.accepted_tokens} of {usage.draft_tokens} drafts accepted" if speculated else ""
        print()
        print(
            f"[{len(token_ids)} tokens, {len(token_ids) / elapsed:.1f} tokens/s, mean exit depth "
            f"{mean_depth:.1f} of {num_layers} layers{drafts}, finish: {last.finish_reason}]",
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
    n.add_argument("--pipelines", type=int, dest="num_pipelines", help="pipelines (pipeline replicas)")
    n.add_argument("--address", help="an existing Ray cluster (default: start one on this machine)")
    n.add_argument("--shutdown-grace", type=float, dest="shutdown_grace_s", metavar="SECONDS",
                   help="on Ctrl-C or SIGTERM, seconds running requests get to finish (default 10)")  # fmt: skip
    _engine_options(p)
    _speculative_options(
        p, "engine_", "speculative decoding", "the default of requests that leave adept.speculative unset "
        "(engine.speculative in the configuration)",
    )  # fmt: skip
    p.set_defaults(run=_serve)


def _serve(args: argparse.Namespace) -> int:
    from serving.deploy import local_ray

    config = _app_config(args)
    _check_speculative(config.engine)
    parent = local_ray.supervisor()
    if args.address is None and parent is None:  # our own local Ray: its proxies bind on this machine
        _check_ports(config)
        return local_ray.supervise(args.argv)  # the server in a child, apart from our process group

    from ray import serve

    from serving.app import build_app
    from serving.config import APP_NAME
    from serving.deploy import server

    grace = [config.shutdown_grace_s]

    def orphaned() -> None:  # the supervisor was killed (SIGKILL, say): stop at once
        grace[0] = 0.0
        os.kill(os.getpid(), signal.SIGTERM)

    if parent is not None:
        local_ray.watch_parent(parent, orphaned)
    server.init_ray(config, args.address)
    if args.address is None:
        local_ray.start_reaper(os.getpid())
    stopping = False
    try:
        server.start(config, build_app(config))
        info = serve.get_deployment_handle("PipelineReplica", APP_NAME).info.remote().result()
        own = {k: v for k, v in info.default_exit.items() if k != "prefill"}
        default_exit = ", ".join(f"{k} {v}" for k, v in own.items()) or "policy none (full depth)"
        if info.default_exit.get("prefill"):
            default_exit += "; prompt tokens: " + ", ".join(f"{k} {v}" for k, v in info.default_exit["prefill"].items())
        log.warning(
            "ADEPT Serve is up: model %r, %d layers in %d layer groups, exit points %s, %d pipeline(s)\n"
            "  default early exit: %s\n%s"
            "  KV cache: %d tokens per pipeline (all sequences together; engine.kv_cache_memory sets it)\n"
            "  Live view of early exit: http://%s:%d/\n"
            "  HTTP  http://%s:%d  (OpenAI API: /v1/completions, /v1/chat/completions, /v1/models; /health, /metrics)\n"
            "  gRPC  %s:%d  (%s, server reflection on)\n"
            "Ctrl-C stops it.",
            info.name, info.num_layers, info.num_layer_groups, info.exit_points, config.num_pipelines,
            default_exit, _speculative_line(info), info.kv_cache_tokens, config.http.host, config.http.port,
            config.http.host, config.http.port,
            config.grpc.host, config.grpc.port, GRPC_SERVICE,
        )  # fmt: skip
        # Stop on Ctrl-C and on SIGTERM, even where the shell started us with SIGINT ignored (background).
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        threading.Event().wait()
    except (KeyboardInterrupt, SystemExit):
        stopping = True
        log.warning("stopping: running requests get %.0f s to finish (Ctrl-C again: at once)", grace[0])
    finally:
        try:
            server.stop(grace[0] if stopping else None)
        except KeyboardInterrupt:  # what we started dies with this process (the reaper)
            log.warning("stopped at once")
    return 0


def _speculative_line(info) -> str:
    """`adept serve`'s line about the default speculative decoding (none while it is off)."""
    spec = info.default_speculative
    if not spec["num_tokens"]:
        return ""
    auto = spec["draft_depth"] == "auto"
    depth = info.auto_draft_depth if auto else spec["draft_depth"]
    return (
        f"  default speculative decoding: up to {spec['num_tokens']} drafts a round from depth {depth}"
        f"{' (auto)' if auto else ''} (exit heads at {info.draft_depths}); full depth's tokens\n"
    )


def _add_calibrate(commands) -> None:
    p = commands.add_parser(
        "calibrate",
        help="train an exit pack (adapters, routers, back-fill maps) from a corpus",
        description="Train exit-head adapters, learned routers and mapped back-fill maps from the model's own "
        "hidden states on a corpus, and write an exit pack (serve it with --exit-pack DIR).",
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help="'smollm2-135m' (default) or a local Hugging Face folder")
    p.add_argument("--corpus", help="text file, or JSONL with text, prompt or messages per line (or only --prompts)")
    p.add_argument(
        "--holdout", type=float, default=0.5, help="last fraction of the corpus's lines kept out for adept eval"
    )
    g = p.add_argument_group(
        "served-like data", "--prompts: chat prompts (JSONL with prompt or messages per line) that the engine "
        "continues at full depth, greedy and sampled, chat template applied; calibration reads them before --corpus",
    )  # fmt: skip
    g.add_argument("--prompts", help="JSONL chat prompts, e.g. ../shared/data/chat/instructions.jsonl")
    g.add_argument("--prompts-part", default="0,0.5", help="fractions of --prompts' lines read (default 0,0.5: the "
                   "first half; adept eval --chats reports on the second)")  # fmt: skip
    traffic = Traffic()
    g.add_argument("--generate-tokens", type=int, default=traffic.max_tokens, help="tokens per continuation at most")
    g.add_argument("--samples", type=int, default=traffic.samples, help="sampled continuations per prompt, beside "
                   f"the greedy one (default {traffic.samples}; request seeds from --seed)")  # fmt: skip
    g.add_argument("--sample-temperature", type=float, default=traffic.temperature,
                   help=f"temperature of the sampled continuations (default {traffic.temperature})")  # fmt: skip
    p.add_argument("--exit-points", help="comma-separated depths (default: the engine's default exit points)")
    p.add_argument("--window", type=int, default=256, help="tokens per training window")
    defaults = CalibrationSettings(exit_points=[])
    for name in CALIBRATION_FLAGS:
        value = getattr(defaults, name)
        p.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value, help=f"default {value}")
    p.add_argument("--heads", default=",".join(defaults.heads), help="exit-head kinds to train, of "
                   f"{', '.join(HEAD_KINDS)}; each exit point keeps the one that saves the most on validation "
                   f"after its own cost (default {','.join(defaults.heads)})")  # fmt: skip
    p.add_argument("--prompt-heads", default=",".join(defaults.prompt_heads), help="kinds of the prompt tokens' "
                   "own heads and routers, trained on the prompts' positions (and --labelled's); '' for none: prompt "
                   f"tokens take the generated tokens' (default {','.join(defaults.prompt_heads)})")  # fmt: skip
    p.add_argument("--router-features", default="hidden", help="'hidden' (default) or 'hidden,confidence'")
    p.add_argument("--output", "-o", required=True, help="pack directory to write")
    t = p.add_argument_group(
        "defaults", "the pack's default exits are chosen on data training did not read: held-out corpus text, "
        "then the first half of --tune-chats and of --labelled (the second halves are left for adept eval)",
    )  # fmt: skip
    t.add_argument("--retune", action="store_true", help="no training: choose the defaults of the pack at --output")
    t.add_argument("--tune-chats", help="JSONL chat prompts: greedy continuations keep the free-running target")
    t.add_argument("--chat-tokens", type=int, default=64, help="greedy tokens per chat prompt (default 64)")
    t.add_argument("--labelled", help="labelled texts (TSV with text and label columns, or JSONL): prompt defaults")
    t.add_argument("--template", default="{text}", help="prompt of a labelled text ({text}; \\n is a newline)")
    t.add_argument("--choices", help="comma-separated answers, one per label index, e.g. ' negative, positive'")
    targets = calibrate.TuneTargets()
    for name in ("max_perplexity_increase", "max_free_running_increase", "max_accuracy_drop", "min_compute_saved"):
        value = getattr(targets, name)
        t.add_argument(f"--{name.replace('_', '-')}", type=float, default=value, help=f"default {value}")
    t.add_argument("--target-agreement", type=float, help="also keep this teacher-forced agreement (default: none)")
    p.set_defaults(run=_calibrate)


def _calibrate(args: argparse.Namespace) -> int:
    same = ("model", "corpus", "output", "holdout", "window", "prompts", "retune", "tune_chats", "chat_tokens",
            "labelled")  # fmt: skip
    if args.labelled and not args.choices:
        raise ValueError("--labelled needs --choices: the answer of each label, e.g. ' negative, positive'")
    job = calibrate.CalibrationJob(
        **{k: getattr(args, k) for k in same},
        exit_points=[int(d) for d in args.exit_points.split(",")] if args.exit_points else None,
        router_features=args.router_features.split(","),
        settings={k: getattr(args, k) for k in CALIBRATION_FLAGS}
        | {"heads": args.heads.split(","), "prompt_heads": [k for k in args.prompt_heads.split(",") if k]},
        prompts_part=tuple(float(x) for x in args.prompts_part.split(",")),
        traffic=Traffic(args.generate_tokens, args.samples, args.sample_temperature, args.seed),
        choices=args.choices.split(",") if args.choices else [],
        template=args.template.replace("\\n", "\n"),
        targets=calibrate.TuneTargets(
            args.max_perplexity_increase,
            args.max_free_running_increase,
            args.max_accuracy_drop,
            args.target_agreement,
            args.min_compute_saved,
        ),
    )
    calibrate.run(job, lambda line: print(line, file=sys.stderr))
    return 0


def _add_eval(commands) -> None:
    p = commands.add_parser(
        "eval",
        help="quality against compute of early exit on held-out text (Pareto curves)",
        description="Sweep exit policies, back-fill modes and thresholds through the real engine on held-out "
        "text: mean exit depth, layer compute saved, teacher-forced agreement with the full model, perplexity, "
        "and free-running agreement on chat prompts.",
    )
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--exit-pack", default="auto", help="'auto' (the shipped pack), or a pack directory")
    p.add_argument(
        "--corpus",
        help="held-out text (default: the part of the pack's calibration corpus it did not train on; when it "
        "is the pack's corpus, only that part is used)",
    )
    p.add_argument("--max-tokens", type=int, default=4096, help="held-out tokens (default 4096)")
    p.add_argument("--window", type=int, default=512, help="tokens per teacher-forced window")
    p.add_argument("--chat-tokens", type=int, default=32, help="greedy tokens per chat prompt; 0 skips")
    p.add_argument("--chats", help="JSONL chat prompts for the free-running figures (default: 5 built-in prompts)")
    p.add_argument(
        "--chat-part", default="0.5,1", help="fractions of --chats' lines to use (default 0.5,1: the second half, "
        "which calibration's --tune-chats does not tune on)",
    )  # fmt: skip
    p.add_argument("--max-chats", type=int, default=32, help="chat prompts at most (those that fit the context)")
    p.add_argument(
        "--continuation-tokens", type=int, default=128, help="with --chats: full depth's greedy continuation of "
        "each prompt, at most this long (generated once, cached), scores every exit head and setting on the "
        "generated tokens teacher-forced (default 128; 0 skips)",
    )  # fmt: skip
    p.add_argument(
        "--policies",
        default="static,confidence-untrained,confidence,learned",
        help="comma-separated: static, confidence-untrained, confidence (adapted heads), learned",
    )
    p.add_argument("--backfills", default="exact,decoupled,mapped")
    p.add_argument("--thresholds", default="0.3,0.5,0.7,0.8,0.9,0.95,0.99", help="confidence thresholds")
    p.add_argument("--learned-thresholds", default=",".join(map(str, LEARNED_THRESHOLDS)), help="router thresholds")
    p.add_argument("--json", action="store_true", help="print one JSON object (rows, reference, summary)")
    p.add_argument("--plot", help="write a PNG of the Pareto curves here")
    p.set_defaults(run=_eval)


def _eval(args: argparse.Namespace) -> int:
    from serving.engine.config import EngineConfig
    from serving.quality import sweep

    path = resolve_model(args.model)
    tokenizer = load_tokenizer(path)
    where = resolve_pack(args.exit_pack, args.model)
    pack = ExitPack.load(where) if where else None
    trained_on = pack.manifest.get("training", {}).get("data", {}).get("corpus") if pack else None
    part = _held_out(args.corpus, trained_on)
    windows = list(itertools.islice(text_windows(part, tokenizer, args.window), -(-args.max_tokens // args.window)))
    arch = ModelArch.from_config(load_config(path))
    served = args.continuation_tokens if args.chats else 0
    max_len = max(args.window + 1, 512)
    chats = _chats(args, tokenizer, max_len - max(args.chat_tokens, served)) if args.chat_tokens or served else []
    seqs = max(len(windows), len(chats))
    config = EngineConfig(
        model=args.model,
        num_layer_groups=1,
        exit_pack=args.exit_pack,
        max_num_seqs=seqs,
        max_model_len=max_len,
        # every window at once (teacher forcing reserves whole sequences); float32's size is the most it takes
        kv_cache_memory=seqs * max_len * kv_bytes_per_token(arch.num_layers, arch.num_kv_heads, arch.head_dim),
    )
    policies = args.policies.split(",")
    points = pack.exit_points if pack else config.exit_points or []
    settings = sweep.settings(
        points, arch.num_layers, policies, args.backfills.split(","),
        [float(t) for t in args.thresholds.split(",")], [float(t) for t in args.learned_thresholds.split(",")],
    )  # fmt: skip
    if not settings:
        raise ValueError("nothing to evaluate: check --policies and --backfills")

    def progress(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    report = asyncio.run(sweep.evaluate(config, windows, chats, args.chat_tokens, settings, progress, served))
    report = {"model": args.model, "exit_pack": str(where), "corpus": part.describe(), **report}
    if args.plot:
        sweep.plot(report, args.plot)
        progress(f"wrote {args.plot}")
    if args.json:
        print(json.dumps(report))
    else:
        print(sweep.table(report))
    return 0


def _chats(args: argparse.Namespace, tokenizer, max_prompt: int) -> list[list[dict[str, str]]]:
    """The chat prompts of `adept eval`'s free-running figures: --chats' part, those that fit."""
    if args.chats is None:
        return [[{"role": "user", "content": c}] for c in CHAT_PROMPTS]
    lo, hi = (float(x) for x in args.chat_part.split(","))
    fits = (
        m for m in chat_prompts(CorpusPart.of(args.chats, (lo, hi)))
        if len(tokenizer.encode(tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False),
                                add_special_tokens=False)) <= max_prompt
    )  # fmt: skip
    chats = list(itertools.islice(fits, args.max_chats))
    if not chats:
        raise ValueError(f"no chat prompt of {args.chats} (part {args.chat_part}) fits {max_prompt} tokens")
    return chats


def _held_out(corpus: str | None, trained_on: dict | None):
    """The evaluation text: never the part of the corpus the pack was calibrated on."""
    if corpus is None:
        if trained_on is None:
            raise ValueError("give --corpus: there is no exit pack whose calibration corpus could be held out")
        corpus = trained_on["path"]
    whole = CorpusPart.of(corpus)
    if trained_on is not None and whole.sha256 == trained_on["sha256"]:
        first, last = trained_on["lines"]
        return CorpusPart(whole.path, whole.sha256, first, last, whole.total).after()
    return whole


if __name__ == "__main__":
    sys.exit(main())
