"""Writes docs/ui/page.png and docs/ui/compare.png: `emokern ui` on the embedded SmolLM2-135M-Instruct and the
`make demo` bank, driven by headless Chromium (Playwright, /usr/bin/chromium). Run from the checkout's root after
`make demo`: `.venv/bin/python docs/ui/make_screenshots.py`."""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_ui import start_server, stop  # noqa: E402

PROMPT = "My landlord says the rent is due tomorrow and I lost my job today. What should I do?"


def main() -> None:
    from playwright.sync_api import sync_playwright

    proc, url, _ = start_server(8797, 1, "emokern_out/bank/smollm2-135m-instruct.json")
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=os.environ.get("EMOKERN_CHROMIUM", "/usr/bin/chromium"))
            page = browser.new_page(viewport={"width": 1400, "height": 940})
            page.goto(url)
            page.wait_for_selector("body[data-ready='1']")
            page.fill("#seed", "7")
            page.fill("#max-new", "48")
            page.fill("#prompt", PROMPT)
            page.click("#send")
            page.wait_for_function("document.querySelector('.pane .status').textContent.includes('ended')",
                                   timeout=300_000)
            page.locator(".pane .tok:not(.prompt)").nth(9).hover()
            page.screenshot(path=str(ROOT / "docs/ui/page.png"))
            page.mouse.move(5, 5)
            page.click("#new-chat")
            page.fill("#seed", "7")
            row = page.locator(".steer-row").first
            row.locator(".emotion").fill("calm")
            row.locator(".strength").fill("0.5")
            page.fill("#colour-emotion", "calm")
            page.dispatch_event("#colour-emotion", "change")
            page.fill("#prompt", PROMPT)
            page.click("#compare")
            page.wait_for_function("[...document.querySelectorAll('.pane .status')].length === 2 && [...document"
                                   ".querySelectorAll('.pane .status')].every(s => s.textContent.includes('ended'))",
                                   timeout=300_000)
            page.mouse.move(5, 5)  # off the tokens: the layout moved under the pointer, no hover panel here
            page.wait_for_selector("#hover", state="hidden")
            page.screenshot(path=str(ROOT / "docs/ui/compare.png"))
            browser.close()
    finally:
        stop(proc)


if __name__ == "__main__":
    main()
