"""What the live view (`/`) costs the server. The page loads three static files and `/v1/models` once, then
each run is one ordinary streamed chat completion (two with "compare with full depth"). This measures the
page load (bytes, server time) and, per request, the server's CPU time (every Ray process: proxy, ingress,
pipeline replica, workers) and response bytes of the page's request (streamed, with usage) against the same request
unstreamed, on the application as `adept serve` runs it.

    python benchmarks/live_view_cost.py --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time

import httpx
import psutil
from load import PROMPTS, log, ray_process_list  # benchmarks/ is on sys.path

PAGE = ["/", "/static/app.js", "/static/style.css", "/v1/models"]


def server_cpu() -> float:
    """CPU seconds used so far by every Ray process (this client excluded)."""
    total = 0.0
    for _, p in ray_process_list():
        if p.pid != os.getpid():
            with contextlib.suppress(psutil.NoSuchProcess):
                times = p.cpu_times()
                total += times.user + times.system
    return total


def page_request(client: httpx.Client, url: str, model: str, prompt: str, tokens: int, stream: bool) -> tuple[int, int]:
    """One request as the page makes it (stream) or as a plain API client would (no stream): (tokens, bytes)."""
    body = {
        "model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": tokens,
        "temperature": 0, "ignore_eos": True, "stream": stream,
    }  # fmt: skip
    if stream:
        body["stream_options"] = {"include_usage": True}
    size, usage = 0, None
    with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            size += len(line) + 1
            if line.startswith("data: {"):
                usage = json.loads(line[6:]).get("usage") or usage
            elif line.startswith("{"):
                usage = json.loads(line)["usage"]
    return usage["completion_tokens"], size


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="each prompt this many times per kind of request")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    from serving.app import build_app
    from serving.config import AppConfig
    from serving.deploy import server

    config = AppConfig()
    server.init_ray(config)
    server.start(config, build_app(config))
    url = f"http://{config.http.host}:{config.http.port}"
    model = config.served_name()
    result: dict = {"max_tokens": args.max_tokens, "page_load": {}}
    try:
        with httpx.Client(timeout=300) as client:
            page_request(client, url, model, PROMPTS[0], 8, True)  # warm-up
            log("page load: 20 times each file ...")
            for path in PAGE:
                seconds, size = [], 0
                for _ in range(20):
                    started = time.perf_counter()
                    r = client.get(url + path)
                    seconds.append(time.perf_counter() - started)
                    r.raise_for_status()
                    size = len(r.content)
                result["page_load"][path] = {"bytes": size, "median_ms": round(1000 * statistics.median(seconds), 2)}
            for kind, stream in [("page (streamed, with usage)", True), ("API (unstreamed)", False)]:
                log(f"{kind}: {len(PROMPTS)} prompts x {args.rounds} ...")
                cpu, wall, tokens, size = [], [], 0, 0
                for _ in range(args.rounds):
                    for prompt in PROMPTS:
                        before, started = server_cpu(), time.perf_counter()
                        n, b = page_request(client, url, model, prompt, args.max_tokens, stream)
                        wall.append(time.perf_counter() - started)
                        cpu.append(server_cpu() - before)
                        tokens, size = tokens + n, size + b
                result[kind] = {
                    "requests": len(cpu),
                    "server_cpu_s_per_request": round(statistics.mean(cpu), 3),
                    "seconds_per_request": round(statistics.mean(wall), 3),
                    "response_bytes_per_token": round(size / tokens, 1),
                }
            started, before = time.perf_counter(), server_cpu()
            time.sleep(10)
            result["idle_server_cpu_s_per_s"] = round((server_cpu() - before) / (time.perf_counter() - started), 3)
    finally:
        server.stop()
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
