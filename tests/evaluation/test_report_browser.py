"""The HTML pages people open — the run report and the comparison — in a real headless Chromium:
they render, every plot is decoded and visible, and nothing is fetched from anywhere else (the
pages' Content-Security-Policy blocks even an injected remote image)."""

from __future__ import annotations

import http.server
import shutil
import threading

import pytest

from ragtune.cli import main

from .test_compare import _two_runs

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def browser():
    chromium, driver = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
    if not (chromium and driver):  # a missing browser is a failure, never a skip
        pytest.fail("Chromium and chromedriver are needed: `make browser` (localplatform/install_browser.sh)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,2000", "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"):
        options.add_argument(arg)
    b = webdriver.Chrome(service=Service(driver), options=options)
    b.set_page_load_timeout(120)
    yield b
    b.quit()


IMAGES = """return Array.from(document.images).map(i => {
  const r = i.getBoundingClientRect();
  return {complete: i.complete, natural: i.naturalWidth, width: r.width, height: r.height,
          shown: getComputedStyle(i).display !== 'none' && getComputedStyle(i).visibility !== 'hidden'};
});"""
FETCHED = "return performance.getEntriesByType('resource').map(e => e.name);"


def _check_page(browser, path, images: int, title: str) -> None:
    browser.get(path.as_uri())
    assert title in browser.title
    found = browser.execute_script(IMAGES)
    assert len(found) == images
    for img in found:  # decoded by the browser, laid out and on screen
        assert img["complete"] and img["natural"] > 300 and img["width"] > 300 and img["height"] > 150 and img["shown"]
    assert browser.execute_script(FETCHED) == []  # data: URIs only; nothing requested
    assert browser.execute_script("return document.querySelectorAll('table').length") >= 2


def test_run_report_and_comparison_render_in_chromium(browser, tmp_path):
    _two_runs(tmp_path)
    _check_page(browser, tmp_path / "a" / "eval" / "report.html", images=2, title="ragtune evaluation")
    out = tmp_path / "compare.html"
    assert main(["report", "compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)]) == 0
    _check_page(browser, out, images=1, title="ragtune comparison")
    text = browser.find_element("tag name", "body").text
    assert "changed verdict" in text and "A correct → B refused" in text


def test_the_pages_policy_blocks_remote_resources(browser, tmp_path):
    """The teeth of "no external resources": an image pointing at a live local server is injected
    into a copy of the report; Chromium must not request it."""
    hits = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            hits.append(self.path)
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        _two_runs(tmp_path)
        page = (tmp_path / "a" / "eval" / "report.html").read_text()
        url = f"http://127.0.0.1:{server.server_port}/tracker.png"
        hostile = tmp_path / "hostile.html"
        hostile.write_text(page.replace("<h2>Gates</h2>", f'<img src="{url}"><h2>Gates</h2>', 1))
        browser.get(hostile.as_uri())
        assert "ragtune evaluation" in browser.title
        unblocked = tmp_path / "unblocked.html"  # the same page without its policy does fetch it
        unblocked.write_text(hostile.read_text().replace('http-equiv="Content-Security-Policy"', 'name="x"', 1))
        assert hits == []
        browser.get(unblocked.as_uri())
        for _ in range(50):
            if hits:
                break
            threading.Event().wait(0.1)
        assert hits == ["/tracker.png"]
    finally:
        server.shutdown()
