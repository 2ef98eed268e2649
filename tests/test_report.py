"""`zenlm report RUN`: the report card renders in a real headless Chromium (screenshot, no
console errors), is self-contained, and shows what the run recorded."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from helpers import run_cli


def test_report_card_of_a_pretrain_run(trained_run, tmp_path):
    out = tmp_path / "card"
    p = run_cli("report", trained_run, "--out", out, "--text", "def f(x):", "--json")
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    page = Path(res["html"]).read_text()
    md = Path(res["markdown"]).read_text()
    summary = json.loads((trained_run / "summary.json").read_text())
    assert f"{summary['val']['val_loss']:.6g}" in page and f"{summary['val']['val_loss']:.6g}" in md
    assert page.count("data:image/png;base64,") == 2  # loss curve and attention maps, inlined
    assert "src=\"http" not in page and "<link" not in page
    assert "integrated gradients" in page and "Differential privacy" not in page
    for name in ("loss.png", "attention.png"):
        assert f"report_files/{name}" in md and (out / "report_files" / name).is_file()

    webdriver = pytest.importorskip("selenium.webdriver")
    binary, driver = shutil.which("chromium") or "/usr/bin/chromium", shutil.which("chromedriver") or "/usr/bin/chromedriver"
    if not (Path(binary).exists() and Path(driver).exists()):
        pytest.skip("chromium / chromedriver not installed")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(service=Service(driver), options=opts)
    try:
        browser.get(Path(res["html"]).as_uri())
        imgs = browser.find_elements(By.TAG_NAME, "img")
        assert len(imgs) == 2 and all(browser.execute_script(
            "return arguments[0].complete && arguments[0].naturalWidth > 0", i) for i in imgs)
        headings = [h.text for h in browser.find_elements(By.TAG_NAME, "h2")]
        assert "Configuration" in headings and "Loss and validation" in headings
        browser.save_screenshot(str(tmp_path / "card.png"))
        assert [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "WARNING")] == []
    finally:
        browser.quit()
    assert (tmp_path / "card.png").stat().st_size > 5000


def test_report_refuses_a_folder_that_is_not_a_run(tmp_path):
    p = run_cli("report", tmp_path)
    assert p.returncode == 2 and "not a zenlm run folder" in p.stderr
