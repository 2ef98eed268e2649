"""The chat page in a real headless Chromium: key entry, a system prompt, a streamed reply,
the stop button, tokens/s, and model text that looks like HTML shown as text."""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time

import pytest

from serve_helpers import Served, load_smollm2, needs_smollm2

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
pytestmark = [needs_smollm2, pytest.mark.skipif(
    not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
    reason="Debian's chromium and chromedriver are not installed (/usr/bin/chromium, /usr/bin/chromedriver)")]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from zenlm.serve.app import create_app
    from zenlm.serve.keys import KeyStore

    state = tmp_path_factory.mktemp("page-state")
    store = KeyStore(state)
    key = store.create("page", ["generate"])[0]
    app = create_app(load_smollm2(), state_dir=state, max_batch=2, max_queue=4, model_name="smollm2",
                     audit_prompts=True)
    with Served(app) as s:
        s.key, s.state_dir = key, state
        yield s


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    yield driver
    driver.quit()


class HeldDecode:
    """Holds ``engine``'s decode steps until ``release()``: ``reached`` is set once the engine
    thread waits there with a row to decode (its prefill has emitted the first token)."""

    def __init__(self, engine):
        self.engine, self.reached, self.go = engine, threading.Event(), threading.Event()
        inner = engine._decode

        def held(chunks):
            if not self.go.is_set() and any(r is not None and r.pending is not None for r in engine._rows):
                self.reached.set()
                self.go.wait(60)
            inner(chunks)

        engine._decode = held

    def release(self) -> None:
        self.go.set()
        del self.engine._decode  # back to the class's own method


def until(pred, timeout=60.0, every=0.05):
    """``pred()`` once it is true; an element replaced by a navigation or re-render counts as
    not yet (the page is still changing)."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

    deadline = time.time() + timeout
    while True:
        try:
            got = pred()
        except (StaleElementReferenceException, NoSuchElementException):
            got = None
        if got or time.time() >= deadline:
            return got
        time.sleep(every)


def test_chat_page(served, browser):
    from selenium.webdriver.common.by import By

    d = browser
    find = d.find_element
    d.get(served.url + "/")
    assert "API key" in d.page_source and not d.find_elements(By.ID, "log")  # the page needs a key
    find(By.ID, "key").send_keys("zk_wrong")
    find(By.ID, "signin").click()
    assert until(lambda: "Refused" in find(By.ID, "note").text, 10)
    find(By.ID, "key").send_keys(served.key)
    find(By.ID, "signin").click()
    assert until(lambda: d.execute_script("return document.body.dataset.ready") == "1", 20)
    assert find(By.ID, "model").text == "smollm2"

    # a system prompt and a streamed reply that repeats HTML: shown as text, never as markup
    find(By.ID, "system").send_keys("You are a helpful assistant named Zed.")
    for box, value in (("temperature", "0"), ("max-tokens", "24")):
        find(By.ID, box).clear()
        find(By.ID, box).send_keys(value)
    payload = "<img src=x onerror=alert(1)>"
    find(By.ID, "input").send_keys(f"Repeat exactly: {payload}")
    find(By.ID, "send").click()
    reply = lambda: d.find_elements(By.CSS_SELECTOR, ".msg.assistant")  # noqa: E731
    assert until(lambda: reply() and reply()[-1].get_attribute("data-done") == "1", 120)
    out = reply()[-1]
    assert payload in out.get_attribute("textContent")
    assert d.execute_script("return document.querySelectorAll('#log img, #log *:not(.msg)').length") == 0
    assert "&lt;img" in out.get_attribute("innerHTML")
    assert re.search(r"\d+(\.\d+)? tokens/s", find(By.ID, "speed").text), find(By.ID, "speed").text
    audit = b"".join(p.read_bytes() for p in (served.state_dir / "audit").glob("*") if p.is_file())
    records = [json.loads(ln) for ln in audit.splitlines() if b'"/v1/chat/completions"' in ln]
    assert "You are a helpful assistant named Zed." in records[-1]["prompt"]  # the system prompt was sent

    # a long reply, stopped while it streams: the text stops growing and the row is freed. The
    # engine is held after its first token, so the row is still running when Stop is pressed
    # whatever the model would have said next (a short natural reply would end it first).
    engine = served.state.engine
    gate = HeldDecode(engine)
    find(By.ID, "max-tokens").clear()
    find(By.ID, "max-tokens").send_keys("400")
    find(By.ID, "input").send_keys("Count from 1 to 500, one number per line.")
    try:
        find(By.ID, "send").click()
        assert gate.reached.wait(60), "the engine never reached its decode step"
        assert until(lambda: len(reply()) == 2 and reply()[-1].get_attribute("textContent"), 30)
        assert engine.running == 1
        find(By.ID, "stop").click()
        out = reply()[-1]
        assert until(lambda: "stopped" in out.get_attribute("class"), 5)
    finally:
        gate.release()
    t0 = time.time()
    assert until(lambda: engine.running == 0, 1.0), f"row still running {time.time() - t0:.2f}s after stop"
    frozen = out.get_attribute("textContent")
    time.sleep(0.5)
    assert out.get_attribute("textContent") == frozen
    assert find(By.ID, "send").is_enabled() and not find(By.ID, "stop").is_enabled()

    # signing out forgets the key: the page is refused again
    find(By.ID, "signout").click()
    assert until(lambda: d.find_elements(By.ID, "signin"), 10)
    d.get(served.url + "/")
    assert d.find_elements(By.ID, "signin") and not d.find_elements(By.ID, "log")
