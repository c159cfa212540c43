"""Makes docs/live-view.png: the live view after a comparison, in headless chromium (Playwright), against a
running `adept serve`.

    adept serve &                                   # then, once it is up:
    python docs/make_screenshot.py [--url http://127.0.0.1:8000] [--threshold 0.3]
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from playwright.sync_api import sync_playwright

PROMPT = "Write a short paragraph about the history of Paris."


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--policy", default="learned")
    p.add_argument("--threshold", default="0.3")
    p.add_argument("--max-tokens", default="64")
    p.add_argument("--output", default=str(Path(__file__).parent / "live-view.png"))
    args = p.parse_args()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=shutil.which("chromium"), headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 820})
        page.goto(f"{args.url}/")
        page.wait_for_function("document.getElementById('model').textContent.length > 0")
        page.fill("#prompt", PROMPT)
        page.fill("#max-tokens", args.max_tokens)
        page.select_option("#policy", args.policy)
        page.fill("#threshold", args.threshold)
        page.dispatch_event("#threshold", "input")
        page.check("#compare")
        page.click("#run")
        page.wait_for_function("document.getElementById('status').textContent !== 'streaming…'", timeout=300_000)
        page.screenshot(path=args.output, full_page=True)
        browser.close()
    print(args.output)


if __name__ == "__main__":
    main()
