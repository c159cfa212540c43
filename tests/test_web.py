"""The live view at /, in a real headless browser (Debian's chromium driven by Playwright) against the real
server: a comparison streams to the end, the rendered tokens join to the text the API returns for the same
request, every token carries an exit layer of the model, the figures are filled, a speculative run marks the
drafts the full model kept and gives full depth's text, and a bad input shows the server's error. Screenshots
are saved in test-artifacts/."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import pytest
from ray import serve

from serving.app import build_app
from serving.config import AppConfig
from serving.engine.config import EngineConfig

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
PROMPT = "Explain in one sentence why the sky is blue."


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise RuntimeError("chromium is needed (Debian: apt-get install chromium; .ci/run installs it)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser, served):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(f"{served.http}/")
    page.wait_for_function("document.getElementById('model').textContent.length > 0")
    yield page
    page.close()


def test_page_streams_a_comparison_coloured_by_exit_layer(page, served):
    page.fill("#prompt", PROMPT)
    page.fill("#max-tokens", "24")
    page.check("#compare")
    page.click("#run")
    page.wait_for_function("document.getElementById('status').textContent === 'done'", timeout=120_000)
    assert page.locator("#error").is_hidden()

    early = page.locator("#panel-early")
    shown = early.locator("[data-text]").text_content()
    layers = [int(x) for x in early.locator(".tok").evaluate_all("els => els.map(e => e.dataset.exitLayer)")]
    assert layers and all(1 <= d <= 30 for d in layers)
    # The same request through the API (greedy, the server's default exit controls) gives the same text.
    body = {
        "model": served.model,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": 24,
        "temperature": 0,
    }
    api = httpx.post(f"{served.http}/v1/chat/completions", json=body, timeout=120).json()
    assert shown == api["choices"][0]["message"]["content"]
    assert layers == api["adept"]["exit_layers"][: len(layers)] and len(layers) == len(api["adept"]["exit_layers"])
    for figure in ("tps", "ttft", "depth", "saved", "tokens"):
        assert early.locator(f'[data-figure="{figure}"]').text_content() not in ("", "–"), figure
    assert early.locator('[data-figure="tokens"]').text_content() == "24"
    assert early.locator("[data-histogram] .b").count() == 30
    info = httpx.get(f"{served.http}/v1/models", timeout=60).json()["data"][0]["adept"]
    labels = early.locator("[data-axis] span").evaluate_all("els => els.map(e => e.textContent).filter(Boolean)")
    assert labels == [str(d) for d in info["exit_points"]]  # the histogram's axis names the exit points
    # the threshold slider starts at the server's default (the shipped pack's tuned threshold)
    assert float(page.locator("#threshold").input_value()) == info["default_exit"]["threshold"]

    full = page.locator("#panel-full")
    full_layers = full.locator(".tok").evaluate_all("els => els.map(e => Number(e.dataset.exitLayer))")
    assert full_layers and set(full_layers) == {30}
    assert full.locator('[data-figure="saved"]').text_content() == "0.0%"
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "live-view.png"), full_page=True)


def test_page_marks_the_kept_drafts_of_a_speculative_run(page, served):
    """Speculative decoding on, drafting at depth 20 (of the default model's exit heads): the request
    carries adept.speculative, the page underlines the drafts the full model kept and not its own tokens, and
    its text is the full-depth run's beside it (greedy: lossless)."""
    sent = []
    page.on("request", lambda r: sent.append(json.loads(r.post_data)) if r.method == "POST" else None)
    depths = page.locator("#draft-depth option").evaluate_all("els => els.map(e => e.value)")
    assert depths == ["8", "12", "16", "20", "24", "28"]  # the exit heads below the last layer
    assert page.locator("#legend-speculative").is_hidden()
    page.select_option("#mode", "completion")
    page.fill("#prompt", "The capital of France is")  # the depth-20 head agrees with full depth now and then
    page.fill("#max-tokens", "12")
    page.check("#compare")
    page.check("#speculative")
    assert page.locator("#policy").is_disabled() and page.locator("#legend-speculative").is_visible()
    page.select_option("#draft-depth", "20")
    page.fill("#draft-tokens", "3")
    page.click("#run")
    page.wait_for_function("document.getElementById('status').textContent === 'done'", timeout=120_000)
    assert page.locator("#error").is_hidden()
    assert {"num_tokens": 3, "draft_depth": 20} in [body["adept"].get("speculative") for body in sent]

    early, full = page.locator("#panel-early"), page.locator("#panel-full")
    flags = early.locator(".tok").evaluate_all("els => els.map(e => e.dataset.accepted)")
    assert len(flags) == 12 and set(flags) == {"true", "false"}  # one span a token, some kept drafts, some not
    assert early.locator(".tok.draft").count() == flags.count("true")
    layers = early.locator(".tok").evaluate_all("els => els.map(e => Number(e.dataset.exitLayer))")
    assert set(layers) == {30}  # every output token is full depth's
    shown = early.locator("[data-text]").text_content()
    assert shown and shown == full.locator("[data-text]").text_content()
    assert early.locator('[data-figure="kept"]').text_content().startswith(f"{flags.count('true')} of ")
    assert full.locator("[data-speculative]").is_hidden() and full.locator(".tok[data-accepted]").count() == 0
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "live-view-speculative.png"), full_page=True)


def test_page_shows_the_servers_error(page):
    page.fill("#max-tokens", "0")
    page.uncheck("#compare")
    page.click("#run")
    page.wait_for_function("document.getElementById('status').textContent === 'failed'", timeout=60_000)
    message = page.locator("#error").text_content()
    assert "HTTP 400" in message and "max_tokens" in message


def test_page_works_with_an_api_key(browser, served):
    """Under a route prefix, on an application that needs a key: refused without it, served with it."""
    serve.run(
        build_app(AppConfig(engine=EngineConfig(max_num_seqs=2), api_keys=["sk-page"])),
        name="keyed",
        route_prefix="/keyed",
    )
    page = browser.new_page()
    try:
        page.goto(f"{served.http}/keyed/")
        page.wait_for_function("!document.getElementById('error').hidden")
        assert "HTTP 401" in page.locator("#error").text_content()
        page.fill("#api-key", "sk-page")
        page.dispatch_event("#api-key", "change")
        page.wait_for_function("document.getElementById('model').textContent.length > 0")
        page.fill("#max-tokens", "4")
        page.uncheck("#compare")
        page.click("#run")
        page.wait_for_function("document.getElementById('status').textContent === 'done'", timeout=60_000)
        assert page.locator("#panel-early .tok").count() == 4
        assert page.locator("#error").is_hidden()
    finally:
        page.close()
        serve.delete("keyed")
