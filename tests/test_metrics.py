"""Prometheus metrics at /metrics: the exposition parses, and the counters move with what was served (the
exit-layer histogram counts exactly the tokens generated)."""

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


def test_metrics_parse_and_count_what_was_served(served):
    before = scrape(served)
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

    deadline = time.monotonic() + 60
    while True:  # Ray exports every second (tests) to ten (default)
        after = scrape(served)
        moved = total(after, "adept_exit_layer_count") - total(before, "adept_exit_layer_count")
        if moved >= generated or time.monotonic() > deadline:
            break
        time.sleep(1)

    def delta(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    assert generated == 3 * 5 + 4
    assert delta("adept_exit_layer_count") == generated  # one observation per generated token
    assert delta("adept_generated_tokens") == generated
    assert delta("adept_api_requests", protocol="http", outcome="ok") == 4
    assert delta("adept_api_requests", protocol="http", outcome="invalid") == 1
    assert delta("adept_time_to_first_token_seconds_count") == 4
    assert delta("adept_request_latency_seconds_count") == 4
    assert delta("adept_requests_finished", reason="length") == 4
    assert 0 < delta("adept_layers_computed") <= delta("adept_layers_full_depth")
    # every exit layer is within the model's 30 layers: the +Inf bucket adds nothing beyond le=30
    assert total(after, "adept_exit_layer_bucket", le="30.0") == total(after, "adept_exit_layer_bucket", le="+Inf")
    workers = {labels["layers"] for labels, _ in after["ray_adept_worker_kv_slots_free"]}
    assert workers == {"0-10", "10-20", "20-30"}
    assert after["ray_adept_pipeline_kv_slots_free"] and after["ray_adept_waiting_requests"]
