"""The web chat page in a real headless Chromium: load it, send a message, see a streamed reply.

Needs Debian's `chromium` and `chromium-driver` (`.ci/run` installs them) and `selenium`; skips
cleanly without them. Set LUCA_SCREENSHOT=path.png to keep a screenshot of the page.
"""
from __future__ import annotations

import os
import shutil
import tempfile

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
webdriver = pytest.importorskip("selenium.webdriver")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="needs chromium and chromium-driver (apt)")


@pytest.fixture()
def browser():
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager fetch a browser or driver
    profile = tempfile.mkdtemp(prefix="luca-chromium-")
    opts = Options()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1280,800", f"--user-data-dir={profile}"):
        opts.add_argument(flag)
    drv = webdriver.Chrome(service=Service(executable_path=DRIVER), options=opts)
    try:
        yield drv
    finally:
        drv.quit()
        shutil.rmtree(profile, ignore_errors=True)


def test_page_streams_a_reply(tiny_run, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    from luca.serve import ServerThread, build
    app, served = build(str(tiny_run))
    try:
        with ServerThread(app) as srv:
            browser.get(srv.url + "/")
            wait = WebDriverWait(browser, 60)
            wait.until(lambda d: served.model_id in d.find_element(By.ID, "model").text)
            seed = browser.find_element(By.ID, "seed")
            seed.send_keys("3")
            box = browser.find_element(By.ID, "input")
            box.send_keys("def fib_1(n):")
            box.send_keys(Keys.ENTER)
            done = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-done='1']"))
            reply = done[-1]
            assert "error" not in reply.get_attribute("class"), reply.text
            assert int(reply.get_attribute("data-pieces")) > 1  # arrived in several streamed pieces
            text = browser.execute_script("return arguments[0].querySelector('.body').textContent", reply)
            assert text
            stats = browser.find_element(By.ID, "stats").text
            assert "tok/s" in stats and int(stats.split()[0]) > 1
            user = browser.find_elements(By.CSS_SELECTOR, ".msg.user .body")
            assert [u.text for u in user] == ["def fib_1(n):"]
            shot = os.environ.get("LUCA_SCREENSHOT") or str(tmp_path / "page.png")
            browser.save_screenshot(shot)
            assert os.path.getsize(shot) > 10_000
            # The conversation survives a reload (kept in the browser).
            browser.refresh()
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg")) == 2)
    finally:
        served.scheduler.close()
