"""A real headless Chromium picks an image on the served page and reads the caption back.

Needs Debian's chromium (`apt-get install -y chromium`, which .ci/run installs) and the PyPI `playwright` package;
Playwright's own browser download is not used.
"""

from __future__ import annotations

import os

import pytest
from serve_fixtures import live_server, png_bytes, tiny_model_dir  # noqa: F401  (fixtures)

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                reason=f"{CHROMIUM} is absent: apt-get install -y chromium")


def test_page_uploads_an_image_and_shows_its_caption(live_server, tiny_model_dir, tmp_path):
    import httpx
    from playwright.sync_api import sync_playwright

    image = tmp_path / "red.png"
    image.write_bytes(png_bytes((210, 40, 40), (96, 72)))
    expected = httpx.post(f"{live_server.url}/v1/caption", timeout=60,
                          files=[("images", ("red.png", image.read_bytes(), "image/png"))],
                          data={"num_beams": "1", "max_new_tokens": "5"}).json()["captions"][0]["caption"]

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            failed_requests = []
            page.on("requestfailed", lambda request: failed_requests.append(request.url))
            page.goto(live_server.url + "/")
            assert page.input_value("#num_beams") == "1" and page.input_value("#max_new_tokens") == "5"
            page.set_input_files("#file", str(image))
            caption = page.locator("#results .caption:not(.pending)").first
            caption.wait_for(timeout=30_000)
            assert caption.text_content() == expected
            assert "red.png (96x72)" in page.locator("#results").text_content()
            assert "Done" in page.locator("#status").text_content()
            # The page names the model the server runs.
            model = page.locator("#model").text_content()
            assert str(tiny_model_dir) in model and "blip" in model and "not int8" in model and "cpu" in model

            # A drop mixing good and bad files: each good file keeps its caption, each bad one shows its error.
            bad = tmp_path / "notes.png"
            bad.write_text("not an image")
            text = tmp_path / "README.txt"
            text.write_text("read me")
            page.set_input_files("#file", [str(bad), str(image), str(text)])
            page.locator("#status", has_text="2 failed").wait_for(timeout=30_000)  # (the page's CSP forbids eval)
            rows = page.locator("#results li")
            assert rows.count() == 3
            assert "notes.png" in rows.nth(0).text_content() and "not a supported image" in rows.nth(0).text_content()
            assert rows.nth(1).locator(".caption").text_content() == expected
            assert "README.txt" in rows.nth(2).text_content() and "text/plain" in rows.nth(2).text_content()
            assert rows.nth(0).locator(".caption.error").is_visible() and rows.nth(2).locator(".caption.error").count() == 1
            status = page.locator("#status").text_content()
            assert "1 captioned, 2 failed" in status and "error" not in (page.locator("#status").get_attribute("class") or "")
            page.screenshot(path=str(tmp_path / "page.png"), full_page=True)

            # Every file bad: the status line turns into an error too.
            page.set_input_files("#file", str(bad))
            page.locator("#status.error").wait_for(timeout=30_000)
            assert "0 captioned, 1 failed" in page.locator("#status").text_content()
            assert failed_requests == []
        finally:
            browser.close()
