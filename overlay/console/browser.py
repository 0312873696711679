"""Open the console in a headless Chromium (tests, ``benchmarks/bench_console.py``,
``scripts/screenshots``). Needs Debian's ``chromium`` and ``chromium-driver`` and
the ``selenium`` package; ``missing()`` says which of them is not there.

The browser is started with its background networking off, so the only
requests it makes are the page's own.
"""

from __future__ import annotations

import shutil

import httpx

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")


def chromium_binary() -> str | None:
    return next((p for p in map(shutil.which, CHROMIUM_NAMES) if p), None)


def missing() -> str | None:
    """What is missing to drive a headless Chromium, or None."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "the selenium package (pip install selenium)"
    if chromium_binary() is None:
        return "chromium (apt-get install chromium)"
    if shutil.which("chromedriver") is None:
        return "chromedriver (apt-get install chromium-driver)"
    return None


def chromium(width: int = 1400, height: int = 1100):
    """A headless Chromium driven by Selenium; its console log is kept (``get_log``)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium_binary()
    for arg in (
        "--headless=new",
        "--no-sandbox",  # runs as root in CI containers
        "--disable-gpu",
        "--disable-dev-shm-usage",
        f"--window-size={width},{height}",
        "--no-first-run",
        "--disable-extensions",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-default-apps",
        "--hide-scrollbars",
    ):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=opts, service=Service(shutil.which("chromedriver")))


def login_url(control_url: str, token: str, timeout: float = 5.0) -> str:
    """A one-time link that logs a browser into the console of the node at ``control_url``."""
    r = httpx.post(
        control_url + "/console/ticket",
        headers={"Authorization": f"Bearer {token}"},
        timeout=timeout,
        trust_env=False,
    )
    r.raise_for_status()
    return control_url + r.json()["path"]
