"""The dashboard in a real browser: headless Chromium, live updates, the cancel button."""

from __future__ import annotations

import re
from typing import Any

from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait
from ui_stack import Stack

from gyoza.models.resources import Constraints


def text_of(driver: Any, selector: str) -> str:
    """The element's text, read in one step (live updates replace elements)."""
    text = driver.execute_script(
        "const e = document.querySelector(arguments[0]); return e ? e.innerText : ''", selector
    )
    return str(text).strip()


def test_fleet_page_shows_the_agent_and_its_gpus(stack: Stack, browser: Any) -> None:
    run_id = stack.scripted_run(sleep_ms=60000, constraints=Constraints(vram_mb=40960, gpu_count=1))
    stack.wait_state(run_id, "RUNNING")
    try:
        browser.get(f"{stack.url}/fleet")
        card = browser.find_element(By.CSS_SELECTOR, '[data-agent="node-a"]')
        assert "CONNECTED" in card.text
        assert "pool=test" in card.text
        assert "40 GB of 80 GB" in card.text
        bars = card.find_elements(By.CSS_SELECTOR, "table.gpus .bar .fill")
        widths = sorted(b.get_attribute("style") for b in bars)
        assert widths == ["width: 0%;", "width: 50%;"]
        assert text_of(browser, "#connection .text") == "live"
    finally:
        stack.client.cancel_run(run_id)


def test_run_page_advances_live_and_cancels_by_the_button(stack: Stack, browser: Any) -> None:
    run_id = stack.scripted_run(sleep_ms=40000, steps=40)
    stack.wait_state(run_id, "RUNNING")
    browser.get(f"{stack.url}/runs/{run_id}")
    # A mark that a reload would wipe: the page must change without one.
    browser.execute_script("window.__sameDocument = true")
    wait = WebDriverWait(browser, 30, poll_frequency=0.1)

    def progress() -> int:
        found = re.match(r"(\d+) %", text_of(browser, '[data-role="run-progress"]'))
        return int(found.group(1)) if found else -1

    first = progress()
    wait.until(lambda _: progress() > max(first, 0))
    wait.until(lambda _: progress() > max(first, 0) + 2)
    wait.until(lambda _: browser.find_elements(By.CSS_SELECTOR, "#log .line"))
    assert browser.execute_script("return window.__sameDocument") is True
    assert text_of(browser, '[data-role="run-state"]') == "RUNNING"

    cancel = browser.find_element(By.CSS_SELECTOR, 'button[data-role="cancel"]')
    assert cancel.is_displayed()
    cancel.click()
    wait.until(lambda _: text_of(browser, '[data-role="run-state"]') == "CANCELLED")
    assert browser.execute_script("return window.__sameDocument") is True
    assert stack.client.get_run(run_id).state.value == "CANCELLED"
    # Once cancelled, the page offers a retry instead of a cancel.
    wait.until(lambda _: not cancel.is_displayed())
    retry = browser.find_element(By.CSS_SELECTOR, 'button[data-role="retry"]')
    assert retry.is_displayed()
    assert "CANCELLED" in text_of(browser, "#run-body")


def test_an_action_shows_the_apis_error(stack: Stack, browser: Any) -> None:
    run_id = stack.scripted_run(sleep_ms=30000)
    stack.wait_state(run_id, "RUNNING")
    try:
        browser.get(f"{stack.url}/runs/{run_id}")
        field = browser.find_element(By.CSS_SELECTOR, "form[data-api] input[name=priority]")
        field.clear()
        field.send_keys("-1")
        browser.find_element(By.CSS_SELECTOR, "form[data-api] button[type=submit]").click()
        wait = WebDriverWait(browser, 20, poll_frequency=0.1)
        wait.until(lambda _: browser.find_element(By.ID, "flash").is_displayed())
        message = browser.find_element(By.ID, "flash").text
        assert message.startswith("invalid argument:"), message
    finally:
        stack.client.cancel_run(run_id)
