"""The playground page streams tokens in a real headless Chromium (Debian's `chromium`, driven by Playwright)."""

from __future__ import annotations

import os
import shutil

import pytest

from tests.service.conftest import slow_down

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

if CHROMIUM is None and not os.environ.get("CI"):
    pytest.skip("chromium is not installed (apt-get install chromium); required in CI", allow_module_level=True)


def test_playground_streams_in_chromium(live):
    from playwright.sync_api import sync_playwright

    assert CHROMIUM is not None, "CI needs Debian's chromium package"
    slow_down(live.engine, 0.02)  # tokens arrive over about a second, as from a real model
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(live.url + "/")
            for slider, lo, hi in (("temperature", "0.1", "2.0"), ("max-tokens", "10", "500"), ("top-k", "1", "100")):
                assert page.get_attribute(f"#{slider}", "min") == lo and page.get_attribute(f"#{slider}", "max") == hi
            # Count how many times the output grows before the stream ends: streamed, not one final blob.
            page.evaluate("""() => {
                window.__updates = 0;
                new MutationObserver(() => { window.__updates += 1; })
                    .observe(document.getElementById('output'), {childList: true, characterData: true, subtree: true});
            }""")
            page.fill("#prompt", "Once upon a time")
            page.check("#mode-completion")
            page.evaluate(
                "() => { const s = document.getElementById('max-tokens'); s.value = '60'; "
                "s.dispatchEvent(new Event('input')); }"
            )
            page.click("#generate")
            page.wait_for_selector("#output[data-done='true']", timeout=30_000)
            text = page.inner_text("#output")
            status = page.inner_text("#status")
            updates = page.evaluate("() => window.__updates")
            assert text.strip(), status
            assert "done" in status and "60 tokens" in status, status
            assert updates > 5, updates
            page.check("#mode-chat")  # chat mode goes through the chat template and still streams
            page.click("#generate")
            page.wait_for_selector("#output[data-done='true']", timeout=30_000)
            assert "done" in page.inner_text("#status")
            assert not errors, errors
        finally:
            browser.close()
