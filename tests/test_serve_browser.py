"""`nano serve`'s page in a real headless Chromium (Debian's `chromium` + `chromium-driver`, driven by Selenium):
two tiny .litertlm bundles side by side, a prompt streamed into both panes and compared with `nano generate`, and a
too-long prompt's error on the page. Screenshots (desktop and phone width) are left in the test's temp dir."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from serve.app import create_app
from serve.engines import EngineModel
from serving import nano_generate_greedy, running

CHROMIUM, DRIVER = Path("/usr/bin/chromium"), shutil.which("chromedriver")
PROMPT, NEW = "Hello, world", 24

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists() or DRIVER is None,
                       reason="needs Debian's chromium and chromium-driver (apt-get install -y chromium "
                              "chromium-driver; .ci/run installs them)"),
]


@pytest.fixture(scope="module")
def page(tiny_pair):
    """(browser at the page, base URL): the page served with the tiny student and teacher, loaded and ready."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(flag)  # no sandbox: the tests may run as root
    app = create_app([EngineModel(path, name=name, threads=1) for name, (_, path) in tiny_pair.items()])
    with running(app) as base:
        browser = webdriver.Chrome(service=Service(DRIVER), options=options)
        try:
            browser.get(base + "/")
            _wait(browser, lambda b: b.find_element("tag name", "body").get_attribute("data-ready") == "true")
            yield browser
        finally:
            browser.quit()


def _wait(browser, condition, timeout=60):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, timeout).until(condition)


def _panes(browser) -> dict:
    return {p.get_attribute("data-slot"): p for p in browser.find_elements("css selector", ".pane")}


def _send(browser, prompt: str) -> None:
    box = browser.find_element("id", "prompt")
    browser.execute_script("arguments[0].value = arguments[1]", box, prompt)  # long prompts: faster than typing
    browser.find_element("id", "send").click()
    _wait(browser, lambda b: b.find_element("id", "send").is_enabled()
          and not b.find_elements("css selector", ".answer.streaming"))


def test_both_panes_stream_nano_generates_greedy_text(page, tiny_pair, tmp_path):
    browser = page
    from selenium.webdriver.support.ui import Select

    assert Select(browser.find_element("id", "model-a")).first_selected_option.text == "student"
    assert Select(browser.find_element("id", "model-b")).first_selected_option.text == "teacher"
    browser.find_element("css selector", ".settings summary").click()  # open "Sampling"
    tokens = browser.find_element("id", "max-new-tokens")
    tokens.clear()
    tokens.send_keys(str(NEW))
    browser.find_element("id", "prompt").send_keys(PROMPT)
    browser.find_element("id", "send").click()
    _wait(browser, lambda b: b.find_element("id", "send").is_enabled()
          and len(b.find_elements("css selector", ".answer")) == 2
          and not b.find_elements("css selector", ".answer.streaming"))
    panes = _panes(browser)
    for slot, name in (("a", "student"), ("b", "teacher")):
        pane = panes[slot]
        answer = pane.find_element("css selector", ".answer")
        assert pane.find_element("css selector", ".name").text == name
        assert int(answer.get_attribute("data-chunks")) > 1  # rendered chunk by chunk as the events came
        assert answer.get_attribute("textContent") == nano_generate_greedy(tiny_pair[name][0], PROMPT, NEW)
        stats = pane.find_element("css selector", ".stats").text
        assert f"{NEW} tokens" in stats and "tokens/s" in stats and "first token" in stats, stats
        meta = pane.find_element("css selector", ".meta").text
        assert "float32" in meta and "context 64" in meta and "MB" in meta, meta
        assert not pane.find_element("css selector", ".error").is_displayed()
    browser.save_screenshot(str(tmp_path / "page.png"))
    a, b = panes["a"].rect, panes["b"].rect
    assert a["y"] == b["y"] and a["x"] + a["width"] <= b["x"]  # side by side on a desktop window
    browser.set_window_size(390, 844)  # a phone
    try:
        a, b = panes["a"].rect, panes["b"].rect
        assert b["y"] >= a["y"] + a["height"] and a["width"] <= 390  # stacked, within the screen
        assert browser.execute_script("return document.documentElement.scrollWidth") <= 390  # no sideways scroll
        browser.save_screenshot(str(tmp_path / "phone.png"))
    finally:
        browser.set_window_size(1280, 900)
    print(f"screenshots: {tmp_path / 'page.png'}, {tmp_path / 'phone.png'}")


def test_a_too_long_prompt_shows_the_error_on_the_page(page, tmp_path):
    browser = page
    browser.find_element("id", "new").click()
    _send(browser, "Hello, world " * 20)
    for name, pane in zip(("student", "teacher"), _panes(browser).values()):
        error = pane.find_element("css selector", ".error")
        assert error.is_displayed(), name
        assert error.text.startswith(f"too long for {name}:") and "context of 64 tokens" in error.text, error.text
        assert "Traceback" not in pane.text
    browser.save_screenshot(str(tmp_path / "error.png"))
    print(f"screenshot: {tmp_path / 'error.png'}")
