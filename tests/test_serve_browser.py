"""The `retrac serve` page in a real browser: Debian's chromium driven by chromedriver through selenium.

A real `retrac serve` subprocess (one torch thread) serves the session's quick demo on a free
loopback port. The test uploads a digit through the page's file input, waits for the proponents
to render, and checks that the ids shown under every method equal the API's answer for the same
file; then it opens a training sample with the keyboard alone and closes it with Escape. It skips,
saying why, when chromium, chromedriver or selenium is missing. With RETRAC_SERVE_SCREENSHOT=PATH
it saves a screenshot of the page there (the README's docs/serve.png is made this way).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import free_port

K = 6


def _missing_browser() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[dev]')"
    for program, package in (("chromium", "chromium"), ("chromedriver", "chromium-driver")):
        if shutil.which(program) is None:
            return f"{program} is not installed (apt-get install {package})"
    return None


pytestmark = pytest.mark.skipif(_missing_browser() is not None, reason=f"no browser: {_missing_browser()}")


@pytest.fixture(scope="module")
def server(quick_demo, tmp_path_factory):
    """`retrac serve` on the quick demo, in its own process, on a free loopback port."""
    import httpx

    port = free_port()
    log = tmp_path_factory.mktemp("serve-log") / "serve.log"
    command = [
        sys.executable,
        "-m",
        "retrac.cli",
        "serve",
        "--index",
        str(quick_demo / "index-tracin"),
        "--index",
        str(quick_demo / "index-retrac"),
        "--examples",
        str(quick_demo / "heldout.npz"),
        "--audit",
        "memory",
        "--query-events",
        "fast",
        "--threads",
        "1",
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while True:
        if process.poll() is not None:
            pytest.fail(f"retrac serve exited with {process.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.time() > deadline:
            process.kill()
            pytest.fail(f"retrac serve did not answer within 300 s:\n{log.read_text()}")
        time.sleep(0.5)
    yield url
    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    options.add_argument("--window-size=1400,1000")
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _query_png(quick_demo, tmp_path) -> Path:
    from PIL import Image

    from retrac.data import load_dataset

    digit = load_dataset(quick_demo / "heldout.npz").images[5, 0].numpy()
    path = tmp_path / "held-out-digit.png"
    Image.fromarray(((digit + 1) * 127.5).round().clip(0, 255).astype(np.uint8)).save(path)
    return path


def _shown_ids(driver, method: str, kind: str) -> list[str]:
    from selenium.webdriver.common.by import By

    selector = f'ol[data-method="{method}"][data-kind="{kind}"] button.sample'
    return [b.get_attribute("data-id") for b in driver.find_elements(By.CSS_SELECTOR, selector)]


def test_page_shows_the_apis_proponents_and_is_keyboard_usable(server, browser, quick_demo, tmp_path):
    import httpx
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 180)
    browser.get(server)
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "ready")
    k_input = browser.find_element(By.ID, "k")
    k_input.clear()
    k_input.send_keys(str(K))
    png = _query_png(quick_demo, tmp_path)
    browser.find_element(By.ID, "file").send_keys(str(png))
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") in ("done", "error"))
    assert browser.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "done", (
        browser.find_element(By.ID, "status").text
    )

    files = {"files": (png.name, png.read_bytes(), "image/png")}
    api = {
        kind: httpx.post(
            f"{server}/attribute", files=files, data={"k": K, "opponents": kind == "opponents"}
        ).json()
        for kind in ("proponents", "opponents")
    }
    for kind, payload in api.items():
        for method, result in payload["results"].items():
            assert _shown_ids(browser, method, kind) == result["ids"][0], (method, kind)
    audit = httpx.post(f"{server}/audit", files=files, data={"k": K}).json()["records"][0]
    assert browser.find_element(By.ID, "audit").get_attribute("data-verdict") == audit["verdict"]

    screenshot = os.environ.get("RETRAC_SERVE_SCREENSHOT")
    browser.save_screenshot(screenshot or str(tmp_path / "serve.png"))

    # Keyboard only: Tab to the first ReTrac proponent, open it with Enter, close it with Escape.
    first = browser.find_element(
        By.CSS_SELECTOR, 'ol[data-method="retrac"][data-kind="proponents"] button.sample'
    )
    keys = ActionChains(browser)
    for _ in range(300):
        if browser.switch_to.active_element == first:
            break
        keys.send_keys(Keys.TAB).perform()
    assert browser.switch_to.active_element == first, "Tab never reached the first proponent"
    first.send_keys(Keys.ENTER)
    dialog = browser.find_element(By.ID, "sample")
    wait.until(lambda d: dialog.get_attribute("open") is not None)
    wait.until(
        lambda d: d.find_elements(By.CSS_SELECTOR, '#sample-influenced ol[data-method="retrac"] .sample')
    )
    assert first.get_attribute("data-id") in browser.find_element(By.ID, "sample-title").text
    influenced = browser.find_element(By.CSS_SELECTOR, '#sample-influenced ol[data-method="retrac"] .sample')
    assert png.name in influenced.text  # the query just answered is one it influences
    browser.switch_to.active_element.send_keys(Keys.ESCAPE)
    wait.until(lambda d: dialog.get_attribute("open") is None)

    # Switching a method off hides its column without a new query.
    browser.find_element(By.CSS_SELECTOR, '#methods input[value="tracin"]').send_keys(Keys.SPACE)
    column = browser.find_element(By.CSS_SELECTOR, '#results section.method[data-method="tracin"]')
    assert not column.is_displayed()
    assert browser.find_element(
        By.CSS_SELECTOR, '#results section.method[data-method="retrac"]'
    ).is_displayed()


def test_picking_an_example_with_the_keyboard(server, browser):
    import httpx
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 180)
    browser.get(server)
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "ready")
    buttons = browser.find_elements(By.CSS_SELECTOR, "#examples button")
    keys = ActionChains(browser)
    for _ in range(20):  # the gallery is one Tab stop ...
        if browser.switch_to.active_element == buttons[0]:
            break
        keys.send_keys(Keys.TAB).perform()
    assert browser.switch_to.active_element == buttons[0], "Tab never reached the example gallery"
    # ... and the arrow keys move within it
    keys.send_keys(Keys.ARROW_RIGHT, Keys.ARROW_RIGHT, Keys.ARROW_RIGHT).perform()
    button = buttons[3]
    assert browser.switch_to.active_element == button
    keys.send_keys(Keys.ENTER).perform()
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "done")
    example = button.get_attribute("data-example")
    k = int(browser.find_element(By.ID, "k").get_attribute("value"))
    api = httpx.post(f"{server}/attribute", data={"examples": example, "k": k, "method": "retrac"}).json()
    assert _shown_ids(browser, "retrac", "proponents") == api["results"]["retrac"]["ids"][0]
    assert button.get_attribute("aria-pressed") == "true"
    assert browser.find_element(By.ID, "query-name").text == example
