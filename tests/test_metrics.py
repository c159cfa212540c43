"""Prometheus metrics at /metrics: the exposition parses, and the counters move with what was served (the
exit-layer histogram counts exactly the tokens generated; the speculative counters, exactly a speculative
response's drafts and kept drafts, under its draft depth)."""

from __future__ import annotations

import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.test_serve_http import PROMPTS


def scrape(served) -> dict[str, list]:
    """sample name -> [(labels, value)], for this application's series (and the workers')."""
    text = httpx.get(f"{served.http}/metrics", timeout=60).text
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.labels.get("application", "adept") == "adept":
                samples.setdefault(s.name, []).append((s.labels, s.value))
    return samples


def total(samples: dict, name: str, **labels: str) -> float:
    found = samples.get(f"ray_{name}", []) + samples.get(f"ray_{name}_total", [])
    return sum(v for got, v in found if all(got.get(k) == want for k, want in labels.items()))


SERVED_NAMES = ("adept_exit_layer_count", "adept_api_requests", "adept_request_latency_seconds_count")
SPEC_NAMES = ("adept_spec_decode_draft_tokens", "adept_spec_decode_accepted_tokens", "adept_spec_decode_rounds")


def settled(served, names: tuple[str, ...] = SERVED_NAMES) -> dict:
    """A scrape that no earlier test's late export changes any more (two scrapes, 2.5 export intervals apart,
    agree on the counters this test reads)."""
    last = scrape(served)
    for _ in range(30):
        time.sleep(2.5)
        now = scrape(served)
        if all(total(now, n) == total(last, n) for n in names):
            return now
        last = now
    raise AssertionError("the metrics never settled")


def test_metrics_parse_and_count_what_was_served(served):
    before = settled(served)
    generated = 0
    for prompt in PROMPTS[:3]:
        body = {"model": served.model, "prompt": prompt, "max_tokens": 5, "temperature": 0}
        generated += httpx.post(f"{served.http}/v1/completions", json=body, timeout=120).json()["usage"][
            "completion_tokens"
        ]
    body = {"model": served.model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{served.http}/v1/chat/completions", json=body, timeout=120) as r:
        generated += sum(1 for line in r.iter_lines() if '"exit_layers": [' in line and '"exit_layers": []' not in line)
    httpx.post(f"{served.http}/v1/completions", json={"model": served.model, "prompt": ""}, timeout=60)  # a 400

    assert generated == 3 * 5 + 4
    # (metric, labels) -> how much it must move. The ingress and the router export on their own schedules
    # (every second in tests, ten by default), and the stream's outcome is counted after its [DONE].
    expected = {
        ("adept_exit_layer_count", ()): generated,  # one observation per generated token
        ("adept_generated_tokens", ()): generated,
        ("adept_api_requests", (("protocol", "http"), ("outcome", "ok"))): 4,
        ("adept_api_requests", (("protocol", "http"), ("outcome", "invalid"))): 1,
        ("adept_time_to_first_token_seconds_count", ()): 4,
        ("adept_request_latency_seconds_count", ()): 4,
        ("adept_requests_finished", (("reason", "length"),)): 4,
    }

    def moved(after: dict) -> dict:
        return {k: total(after, k[0], **dict(k[1])) - total(before, k[0], **dict(k[1])) for k in expected}

    deadline = time.monotonic() + 60
    while True:
        after = scrape(served)
        if all(m >= expected[k] for k, m in moved(after).items()) or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert moved(after) == expected

    def delta(name: str) -> float:
        return total(after, name) - total(before, name)

    assert 0 < delta("adept_layers_computed") <= delta("adept_layers_full_depth")
    # every exit layer is within the model's 30 layers: the +Inf bucket adds nothing beyond le=30
    assert total(after, "adept_exit_layer_bucket", le="30.0") == total(after, "adept_exit_layer_bucket", le="+Inf")
    workers = {labels["layers"] for labels, _ in after["ray_adept_worker_kv_blocks_free"]}
    assert workers == {"0-10", "10-20", "20-30"}
    assert after["ray_adept_pipeline_kv_blocks_free"] and after["ray_adept_waiting_requests"]


def test_speculative_counters_count_a_responses_drafts(served):
    """A greedy speculative request: the draft and kept-draft counters under its draft depth move by exactly
    its usage's draft_tokens and accepted_tokens; the other depth's do not move."""
    before = settled(served, SPEC_NAMES)
    body = {
        "model": served.model,
        "prompt": "The capital of France is",  # the depth-20 head's drafts are kept now and then here
        "max_tokens": 12,
        "temperature": 0,
        "adept": {"speculative": {"num_tokens": 3, "draft_depth": 20}},
    }
    usage = httpx.post(f"{served.http}/v1/completions", json=body, timeout=120).json()["usage"]
    assert 0 < usage["accepted_tokens"] <= usage["draft_tokens"], usage  # both counters have something to count
    expected = {
        ("adept_spec_decode_draft_tokens", "20"): usage["draft_tokens"],
        ("adept_spec_decode_accepted_tokens", "20"): usage["accepted_tokens"],
        ("adept_spec_decode_draft_tokens", "10"): 0,
        ("adept_spec_decode_accepted_tokens", "10"): 0,
    }

    def moved(after: dict) -> dict:
        return {(n, d): total(after, n, draft_depth=d) - total(before, n, draft_depth=d) for n, d in expected}

    deadline = time.monotonic() + 30
    while True:
        after = scrape(served)
        if all(m >= expected[k] for k, m in moved(after).items()) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert moved(after) == expected
    # at most num_tokens drafts a round, at least one: the rounds lie between
    rounds = total(after, "adept_spec_decode_rounds", draft_depth="20") - total(
        before, "adept_spec_decode_rounds", draft_depth="20"
    )
    assert usage["draft_tokens"] / 3 <= rounds <= usage["draft_tokens"]
