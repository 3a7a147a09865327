"""The web page of ``w2v2 serve`` in a real browser (headless Chromium driven by selenium):
upload real speech, wait for the transcript, check the word buttons and a seek, save a screenshot
(to ``$W2V2_SCREENSHOT`` when set: docs/img/serve_page.png is made that way).

Skips, saying why, only where no Chromium and chromedriver can be found (``.ci/run`` installs
Debian's ``chromium`` and ``chromium-driver``).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from .conftest import longest_clip
from .test_serve import Server

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")

def _browser():
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    binary = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    if not binary or not driver:
        pytest.skip("no Chromium/chromedriver on this machine (Debian: apt-get install chromium chromium-driver)")
    options = Options()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-quic", "--autoplay-policy=no-user-gesture-required", "--window-size=1100,1250"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=options)


@pytest.fixture(scope="module")
def browser():
    b = _browser()
    yield b
    b.quit()


def test_upload_transcript_words_seek_and_downloads(browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    clip, _ = longest_clip("ljspeech-amateur")
    server = Server(tmp_path / "srv")
    try:
        browser.get(server.url + "/")
        assert browser.find_element(By.CSS_SELECTOR, "label[for=file]").text  # every control has a label
        browser.find_element(By.ID, "file").send_keys(str(clip))
        browser.find_element(By.ID, "submit").click()
        wait = WebDriverWait(browser, 120)
        wait.until(ec.visibility_of_element_located((By.ID, "transcript")))
        words = browser.find_elements(By.CSS_SELECTOR, "#transcript .word")
        assert len(words) >= 3, browser.find_element(By.ID, "status").text
        starts = [float(w.get_attribute("data-start")) for w in words]
        ends = [float(w.get_attribute("data-end")) for w in words]
        assert starts == sorted(starts) and all(s < e for s, e in zip(starts, ends))
        assert "Done:" in browser.find_element(By.ID, "status").text
        # seek with the keyboard: focus the third word's button and press Enter
        target = words[2]
        target.send_keys(Keys.ENTER)
        wait.until(lambda b: abs(b.execute_script("return document.getElementById('player').currentTime")
                                 - starts[2]) < 0.3)
        wait.until(lambda b: "current" in target.get_attribute("class"))
        links = browser.find_elements(By.CSS_SELECTOR, "#downloads a")
        assert [a.get_attribute("download").rsplit(".", 1)[1] for a in links] == ["txt", "srt", "vtt", "json", "tsv"]
        srt = browser.execute_script("return fetch(arguments[0]).then(r => r.text())",
                                     links[1].get_attribute("href"))
        assert srt.startswith("1\n") and " --> " in srt
        browser.execute_script("document.getElementById('player').pause()")
        browser.save_screenshot(os.environ.get("W2V2_SCREENSHOT") or str(tmp_path / "page.png"))
    finally:
        assert server.stop() == 0


def test_page_reports_a_bad_file(browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    bad = Path(tmp_path / "broken.wav")
    bad.write_bytes(b"RIFF0000WAVEnot really")
    server = Server(tmp_path / "srv")
    try:
        browser.get(server.url + "/")
        browser.find_element(By.ID, "file").send_keys(str(bad))
        browser.find_element(By.ID, "submit").click()
        status = browser.find_element(By.ID, "status")
        WebDriverWait(browser, 60).until(lambda b: "Failed" in status.text)
        assert "broken.wav" in status.text and "error" in status.get_attribute("class")
    finally:
        assert server.stop() == 0
