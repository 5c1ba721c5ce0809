"""`eebench report` on stored real results, opened in a real headless browser (Debian's chromium + chromedriver,
driven by selenium): the page loads without console errors, a column sort reorders rows, a screenshot is taken."""

from __future__ import annotations

import os
import re
import shutil
import signal
from pathlib import Path

import pytest

from eebench.cli import main

RESULTS = Path(__file__).resolve().parents[1] / "results"
CLASSIFICATION = RESULTS / "quick"  # DeeBERT and PABEE on the graded task (tracked, real runs)
GENERATION = RESULTS / "generation-smollm2-38b4f7f"  # CALM's five measures on SmolLM2, Alpaca and Dolly
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.fail("the report test needs a headless browser: `apt-get install chromium chromium-driver` "
                    "(Debian; .ci/run installs them)", pytrace=False)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1600"):
        options.add_argument(flag)
    options.binary_location = CHROMIUM
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(CHROMEDRIVER)
    driver = webdriver.Chrome(service=service, options=options)
    pid = service.process.pid  # the driver we started; stopped by PID below if quit() leaves it running
    try:
        yield driver
    finally:
        driver.quit()
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    assert main(["report", "--results", str(CLASSIFICATION), "--out", str(out / "quick.html")]) == 0
    assert main(["report", "--results", str(GENERATION), "--out", str(out / "generation.html")]) == 0
    return out


def _column(driver, table, index: int) -> list[str]:
    return [row.find_elements("tag name", "td")[index].get_attribute("data-sort")
            for row in table.find_elements("css selector", "tbody tr")]


def test_the_page_is_self_contained(pages):
    html = (pages / "generation.html").read_text()
    assert not re.search(r"""(src|href)=["']https?://""", html), "no external resource: the page works offline"
    images = re.findall(r'<img src="([^"]{0,30})', html)
    assert images and all(src.startswith("data:image/png;base64,") for src in images)
    for section in ("Provenance", "Leaderboards", "Figures", "Operating points", "Training cost", "Generated text"):
        assert f">{section}</h2>" in html
    assert "Measured at commit 38b4f7f4bf61" in html and "torch: 2.13.0+cpu" in html
    for label in ("CALM (classifier)", "CALM (oracle)", "CALM (softmax)", "CALM (saturation)"):
        assert label in html
    from eebench.leaderboard import load_records

    tasks = load_records(GENERATION).task.nunique()
    assert html.count('class="sample"') == 3 * tasks  # three prompts per generation task


def test_page_loads_sorts_and_is_screenshotted(browser, pages, tmp_path):
    for name in ("quick.html", "generation.html"):
        browser.get((pages / name).as_uri())
        errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
        assert errors == [], errors
        assert browser.find_element("tag name", "h1").text.startswith("eebench report")
    # Sort the points table by saved-layer speed-up (a numeric column), both ways.
    table = browser.find_elements("css selector", "#points ~ div table.sortable")[0]
    headers = [th.text for th in table.find_elements("tag name", "th")]
    index = headers.index("saved-layer")
    before = [float(v) for v in _column(browser, table, index)]
    assert before != sorted(before), "the stored order is not already sorted, so the click must reorder it"
    table.find_elements("tag name", "th")[index].click()
    ascending = [float(v) for v in _column(browser, table, index)]
    assert ascending == sorted(before)
    table.find_elements("tag name", "th")[index].click()
    assert [float(v) for v in _column(browser, table, index)] == sorted(before, reverse=True)
    assert table.find_elements("tag name", "th")[index].get_attribute("aria-sort") == "descending"
    # A text column sorts alphabetically.
    method = headers.index("method")
    table.find_elements("tag name", "th")[method].click()
    names = _column(browser, table, method)
    assert names == sorted(names)
    shot = tmp_path / "report.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    assert browser.get_log("browser") == [] or all(e["level"] != "SEVERE" for e in browser.get_log("browser"))


def test_token_pieces_come_from_stored_token_texts_or_are_not_guessed():
    from eebench.plots.samples import token_pieces

    row = {"token_layers": [3, 30, 7], "text": "Hello world!", "token_texts": ["Hello", " world", "!"]}
    assert token_pieces(row, tokenizer=None) == [("Hello", 3), (" world", 30), ("!", 7)]
    # Older runs stored no token texts: without a tokenizer the output is shown unshaded rather than misaligned.
    assert token_pieces({**row, "token_texts": None}, tokenizer=None) is None
    assert token_pieces({**row, "token_texts": ["Hello", " world"]}, tokenizer=None) is None
