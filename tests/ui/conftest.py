"""Fixtures of the dashboard's tests.

The views are read over HTTP from a real ``gyoza ui`` process in front of a real server
and scripted agent (see ui_stack.py); the runs are made with the Python client. The
browser tests drive Debian's Chromium (``/usr/bin/chromium`` with
``/usr/bin/chromedriver``) through Selenium, and fail rather than skip under CI when it
is missing.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# The tests import their helpers from ui_stack.py beside this file.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ui_stack import CHROMEDRIVER, CHROMIUM, Stack, service_unavailable


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One server, agent ``node-a`` (2 x 80 GB GPUs) and the dashboard, per module."""
    stack = Stack(tmp_path_factory.mktemp("ui"))
    try:
        stack.start_server()
        stack.add_agent("node-a")
        stack.start_ui()
        yield stack
    finally:
        stack.close()


# -- the browser ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Chromium through Selenium (no browser download: Debian's own)."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if shutil.which(p) is None]
    if missing:
        service_unavailable(
            f"the browser tests need {' and '.join(missing)} "
            "(apt-get install chromium chromium-driver; scripts/install-system.sh does)"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1280,1000",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()
