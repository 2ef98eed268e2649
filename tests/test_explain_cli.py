"""`zenlm explain` as a user runs it, and its HTML pages in a real headless Chromium.

Attention maps written by the CLI equal the maps recorded in-process; the head view and the
attribution page load with no console errors and no request for any external asset.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from helpers import run_cli

TEXT = "def add(a, b):\n    return a + b"


def test_explain_attention_cli(trained_run, loaded, tmp_path):
    out = tmp_path / "att"
    p = run_cli("explain", "attention", "--model", trained_run, TEXT, "--out", out, "--layers", "0,-1",
                "--heads", "1,2", "--json")
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    assert res["layers"] == [0, 1] and len(res["pngs"]) == 2
    for png in res["pngs"]:
        assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "attention.json").read_text())
    ids = loaded.tokenizer.encode_prompt(TEXT)
    with torch.no_grad(), loaded.model.capture_attention(layers=[0, 1], heads=[1, 2]) as cap:
        loaded.model(torch.tensor([ids]))
    for layer in (0, 1):
        torch.testing.assert_close(torch.tensor(saved["maps"][str(layer)]), cap.maps[layer][0], atol=1e-6, rtol=0)
    html = (out / "head_view.html").read_text()
    assert "<script" in html and "src=" not in html and "http" not in html.lower().replace("http-equiv", "")


def test_explain_attribution_cli(trained_run, tmp_path):
    p = run_cli("explain", "--model", trained_run, TEXT, "--continuation", "\n", "--steps", "8",
                "--out", tmp_path / "attr", "--json")
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    assert set(res["methods"]) == {"ig", "gxi", "rollout"} and res["steps"] == 8
    assert abs(sum(res["methods"]["ig"]) - res["ig_gap"] - res["ig_delta"]) < 1e-4
    assert (tmp_path / "attr" / "attributions.html").is_file()
    p = run_cli("explain", "--model", trained_run, TEXT, "--label", "pos")
    assert p.returncode == 2 and "--label is for classifiers" in p.stderr
    p = run_cli("explain", "attention", "--model", trained_run, TEXT)
    assert p.returncode == 2 and "needs --out" in p.stderr


def _chromium():
    webdriver = pytest.importorskip("selenium.webdriver")
    binary, driver = shutil.which("chromium") or "/usr/bin/chromium", shutil.which("chromedriver") or "/usr/bin/chromedriver"
    if not (Path(binary).exists() and Path(driver).exists()):
        pytest.skip("chromium / chromedriver not installed")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver), options=opts)


def test_pages_render_in_chromium(loaded, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    from zenlm.explain.attention import write_attention
    from zenlm.explain.attribution import explain, lm_target, to_html

    res = write_attention(loaded.model, loaded.tokenizer, TEXT + " </script>", tmp_path / "att")
    attr = tmp_path / "attributions.html"
    attr.write_text(to_html(explain(loaded.model, loaded.tokenizer,
                                    lm_target(loaded.tokenizer, TEXT, " x"), steps=4)))
    browser = _chromium()
    try:
        browser.get(Path(res["html"]).as_uri())
        tokens = browser.find_elements(By.CSS_SELECTOR, "#tok .t")
        assert len(tokens) == len(res["tokens"])
        cells = browser.find_elements(By.CSS_SELECTOR, "#grid td")
        assert len(cells) == len(tokens) ** 2
        ActionChains(browser).move_to_element(tokens[2]).perform()
        assert "sel" in browser.find_elements(By.CSS_SELECTOR, "#tok .t")[2].get_attribute("class")
        browser.find_element(By.ID, "avg").click()
        browser.save_screenshot(str(tmp_path / "head_view.png"))
        browser.get(attr.as_uri())
        assert len(browser.find_elements(By.CSS_SELECTOR, ".line")) == 3
        logs = [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]
        assert logs == []
    finally:
        browser.quit()
    assert (tmp_path / "head_view.png").stat().st_size > 1000
