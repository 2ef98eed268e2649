"""`zenlm report RUN`: report cards of real tiny runs (a pretrain run, a LoRA classifier
fine-tuned from it, a tiny translation run), read back as a person and a browser would: the Markdown holds the run's
own figures, the HTML references nothing outside itself, and a real headless Chromium renders
it (a non-blank screenshot, every image decoded, no console errors)."""

from __future__ import annotations

import base64
import io
import json
import random
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest

import zenlm
from helpers import run_cli
from zenlm.explain.report import collect, write_report
from zenlm.privacy.card import check_signature, verify_card
from zenlm.train.finetune import finetune, resolve_finetune

WORDS = {"ret": "return", "imp": "import", "cls": "class"}
FILLER = "alpha beta gamma delta for while if else self value data".split()


def quiet(*a, **k):
    pass


def verify(card):
    return check_signature(card)["scheme"]


@pytest.fixture(scope="module")
def cls_run(tmp_path_factory, trained_run) -> Path:
    """A LoRA classifier of the keyword in a text, fine-tuned from the session's tiny run."""
    tmp = tmp_path_factory.mktemp("report-cls")
    rng = random.Random(0)
    rows = []
    for _ in range(300):
        label = rng.choice(sorted(WORDS))
        words = [rng.choice(FILLER) for _ in range(rng.randint(2, 6))]
        words.insert(rng.randrange(len(words) + 1), WORDS[label])
        rows.append(f"{' '.join(words)}\t{label}\n")
    data = tmp / "train.tsv"
    data.write_text("sentence\tlabel\n" + "".join(rows))
    cfg = resolve_finetune({"task": "classify", "base": str(trained_run),
                            "data": {"train": str(data), "text_col": "sentence"},
                            "lora": {"r": 4, "targets": ["all"]},
                            "train": {"out_dir": str(tmp / "run"), "batch_size": 16, "lr": 1e-2,
                                      "progress": False, "device": "cpu", "log_every": 1, "seed": 3,
                                      "max_steps": 30, "eval_every": 15}})
    finetune(cfg, zenlm.load(str(trained_run)), log=quiet)
    return tmp / "run"


def metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


class Refs(HTMLParser):
    """Every attribute that can make a browser fetch something, and every style text."""

    def __init__(self):
        super().__init__()
        self.refs: list[str] = []
        self.styles: list[str] = []
        self.tags: list[str] = []
        self._in_style = False

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self._in_style = tag == "style"
        for name, value in attrs:
            if name in ("src", "href", "srcset", "poster", "data", "action", "xlink:href", "background"):
                self.refs.append(value or "")
            if name == "style":
                self.styles.append(value or "")

    def handle_endtag(self, tag):
        self._in_style = False if tag == "style" else self._in_style

    def handle_data(self, data):
        if self._in_style:
            self.styles.append(data)


def assert_self_contained(page: str) -> Refs:
    p = Refs()
    p.feed(page)
    outside = [r for r in p.refs if not (r.startswith("data:") or r.startswith("#"))]
    assert outside == [], f"references outside the page: {outside[:5]}"
    for css in p.styles:
        assert "@import" not in css
        assert all(u.strip("'\" ").startswith("data:") for u in css.split("url(")[1:]), css
    assert "script" not in p.tags and "iframe" not in p.tags
    return p


def inlined_pngs(page: str) -> list[bytes]:
    out = []
    for part in page.split('src="data:image/png;base64,')[1:]:
        out.append(base64.b64decode(part.split('"', 1)[0], validate=True))
    return out


def assert_figures_in_md(md: str, run: Path) -> None:
    """Every evaluation the run logged, and its final summary, appear as numbers in the text."""
    summary = json.loads((run / "summary.json").read_text())
    for k, v in summary["val"].items():
        if k.startswith("val_"):
            assert f"| {k} | {v:.4g} |" in md, k
    assert f"| step | {summary['step']:,} |" in md and f"| tokens | {summary['tokens']:,} |" in md
    evals = [r for r in metrics(run) if "val_loss" in r]
    for r in evals if len(evals) > 1 else []:  # a single one is the summary's
        assert f"| {r['step']} | " in md and f"{r['val_loss']:.4g}" in md


@pytest.fixture(scope="module")
def pre_report(tmp_path_factory, trained_run):
    """The card of a copy of the session's pretrain run (that one stays as it was), made by the
    CLI into the run folder itself."""
    run = tmp_path_factory.mktemp("report-pre") / "tiny"
    shutil.copytree(trained_run, run)
    p = run_cli("report", run, "--json")
    assert p.returncode == 0, p.stderr
    return run, json.loads(p.stdout)


@pytest.fixture(scope="module")
def cls_report(tmp_path_factory, cls_run):
    return write_report(cls_run, tmp_path_factory.mktemp("report-cls-card"), load=zenlm.load,
                        verify=verify, log=quiet)


def test_report_of_a_pretrain_run(pre_report):
    run, res = pre_report
    assert Path(res["html"]) == run / "report" / "report.html" and res["kind"] == "lm"
    page, md = Path(res["html"]).read_text(), Path(res["markdown"]).read_text()
    assert_self_contained(page)
    assert_figures_in_md(md, run)
    pngs = inlined_pngs(page)
    assert len(pngs) == len(res["figures"]) >= 2  # loss curve and attention heat map at least
    for png, path in zip(pngs, res["figures"]):
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and png == Path(path).read_bytes()
        assert f"](report_files/{Path(path).name})" in md
    assert Path(res["figures"][0]).name == "loss.png"
    # the examples: one attention heat map and one attribution of the model's next token
    assert "attention.png" in {Path(f).name for f in res["figures"]} and not res["notes"]
    assert "integrated gradients" in page and "convergence delta" in md and "log p(" in md
    assert "Confusion matrix" not in res["sections"]
    assert "Not trained with differential privacy" in md
    summary = json.loads((run / "summary.json").read_text())
    assert f"{summary['val']['val_bpb']:.4g}" in page
    manifest = json.loads(Path(collect(run).config["data"]["path"], "manifest.json").read_text())
    assert f"| train_tokens | {manifest['train_tokens']:,} |" in md
    # the lineage card: shown with its signature checked, and still verifying with the report in
    card = json.loads((run / "card.json").read_text())
    assert card["signature"]["key_id"] in md and "| signature check | valid" in md
    verify_card(run)


def test_report_of_a_classifier_shows_its_confusion_matrix(cls_run, cls_report, tmp_path):
    res = cls_report
    summary = json.loads((cls_run / "summary.json").read_text())
    assert res["kind"] == "classify" and res["confusion"] == summary["confusion"]
    md, page = Path(res["markdown"]).read_text(), Path(res["html"]).read_text()
    assert_figures_in_md(md, cls_run)
    assert_self_contained(page)
    labels = summary["labels"]
    for label, row in zip(labels, summary["confusion"]):
        assert f"| {label} | " + " | ".join(str(n) for n in row) + " |" in md
        assert f"| {label} | {sum(row)} | " in md  # support in the per-class table
    assert {Path(f).name for f in res["figures"]} >= {"loss.png", "confusion.png", "attention.png"}
    assert "log p(label" in md and "integrated gradients" in page  # the label it predicts, explained
    assert str(Path(collect(cls_run).config["base"])) in md  # the parent model, from the card

    # A run that did not record its matrix: the report scores the run's val rows itself, with
    # the run's model, and gets the matrix the run's own last evaluation got.
    bare = tmp_path / "bare"
    shutil.copytree(cls_run, bare, ignore=shutil.ignore_patterns("report"))
    s = json.loads((bare / "summary.json").read_text())
    del s["confusion"]
    (bare / "summary.json").write_text(json.dumps(s))
    res2 = write_report(bare, load=zenlm.load, with_examples=False, log=quiet)
    assert res2["confusion"] == summary["confusion"]
    assert "val.jsonl, scored now by the run's model" in Path(res2["markdown"]).read_text()
    assert "examples were not asked for" in res2["notes"]["examples"]


def test_report_of_a_chat_run(tmp_path, trained_run):
    from helpers import write_addition_pairs

    pairs = write_addition_pairs(tmp_path / "pairs.jsonl")
    cfg = resolve_finetune({"task": "chat", "base": str(trained_run),
                            "data": {"train": str(pairs), "prompt_field": "question", "response_field": "answer"},
                            "train": {"out_dir": str(tmp_path / "chat"), "batch_size": 8, "lr": 3e-3,
                                      "progress": False, "device": "cpu", "log_every": 1, "seed": 3,
                                      "max_steps": 12, "eval_every": 4}})
    finetune(cfg, zenlm.load(str(trained_run)), log=quiet)
    res = write_report(tmp_path / "chat", load=zenlm.load, verify=verify, log=quiet)
    md, page = Path(res["markdown"]).read_text(), Path(res["html"]).read_text()
    assert res["kind"] == "chat" and "fine-tuning: chat SFT" in md and not res["notes"]
    assert_figures_in_md(md, tmp_path / "chat")
    assert_self_contained(page)
    section = md.split("## Attention and attribution", 1)[1]
    assert "Add " in section and "log p('It is" in section  # its own question and reference reply
    assert "Confusion matrix" not in res["sections"]
    assert {Path(f).name for f in res["figures"]} == {"loss.png", "metrics.png", "attention.png"}


def test_report_of_a_dp_run_shows_the_epsilon_spent(tmp_path, trained_run, cls_run):
    pytest.importorskip("opacus", reason="DP-SGD needs opacus")
    cfg = resolve_finetune({"task": "classify", "base": str(trained_run),
                            "data": {"train": collect(cls_run).config["data"]["train"], "text_col": "sentence"},
                            "lora": {"r": 4, "targets": ["all"]},
                            "train": {"out_dir": str(tmp_path / "dp"), "batch_size": 16, "grad_accum": 2,
                                      "lr": 1e-2, "progress": False, "device": "cpu", "log_every": 1,
                                      "seed": 3, "max_steps": 6, "eval_every": 3, "dp": {"epsilon": 8.0}}})
    finetune(cfg, zenlm.load(str(trained_run)), log=quiet)
    res = write_report(tmp_path / "dp", load=zenlm.load, with_examples=False, log=quiet)
    md = Path(res["markdown"]).read_text()
    privacy = json.loads((tmp_path / "dp" / "summary.json").read_text())["privacy"]
    assert "differentially private" in md.splitlines()[2]
    assert f"**ε spent** {privacy['epsilon']:.4g}" in md and f"| epsilon | {privacy['epsilon']:.4g} |" in md
    evals = [r for r in metrics(tmp_path / "dp") if "epsilon" in r]
    assert len(evals) == 2 and all(f"{r['epsilon']:.4g}" in md for r in evals)  # ε by evaluation
    assert "metrics.png" in {Path(f).name for f in res["figures"]}


@pytest.fixture(scope="module")
def s2s_report(tmp_path_factory):
    """The card of a tiny encoder-decoder trained for a few steps on number words (EN -> DE)."""
    from helpers import TINY_SEQ2SEQ, write_number_pairs
    from zenlm.data.pairs import PairsConfig, prepare_pairs
    from zenlm.train.config import resolve
    from zenlm.train.loop import pretrain

    root = tmp_path_factory.mktemp("report-s2s")
    src, tgt = write_number_pairs(root / "raw", n=200)
    prepare_pairs(PairsConfig(src=str(src), tgt=str(tgt), out=str(root / "d"), vocab_size=300), log=quiet)
    pretrain(resolve({"model": TINY_SEQ2SEQ, "data": {"path": str(root / "d")},
                      "train": {"out_dir": str(root / "run"), "max_steps": 30, "batch_tokens": 400, "lr": 3e-3,
                                "warmup_steps": 3, "eval_every": 15, "eval_bleu_sentences": 8,
                                "progress": False, "device": "cpu", "log_every": 5, "seed": 3}}), log=quiet)
    return root / "run", write_report(root / "run", load=zenlm.load, verify=verify, log=quiet)


def test_report_of_a_translation_run(s2s_report):
    from zenlm.data.pairs import PairShards
    from zenlm.explain.attention import pair_attention

    run, res = s2s_report
    md, page = Path(res["markdown"]).read_text(), Path(res["html"]).read_text()
    assert res["kind"] == "seq2seq" and "translation (encoder-decoder)" in md and not res["notes"]
    assert_figures_in_md(md, run)
    assert_self_contained(page)
    last = json.loads((run / "summary.json").read_text())["val"]
    assert f"**val_bleu** {last['val_bleu']:.4g}" in md and f"**val_chrf** {last['val_chrf']:.4g}" in md
    evals = [r for r in metrics(run) if "val_bleu" in r]
    assert len(evals) == 2 and "metrics.png" in {Path(f).name for f in res["figures"]}  # BLEU by step
    # the example: the first val source, its reference, the model's translation and the
    # cross-attention recorded while writing it (the same maps pair_attention gives)
    loaded = zenlm.load(str(run))
    pairs = PairShards(collect(run).config["data"]["path"])
    source, reference = (loaded.tokenizer.decode(pairs.sentence("val", side, 0), skip_special_tokens=True).strip()
                         for side in ("src", "tgt"))
    section = md.split("## Attention and attribution", 1)[1].split("\n## ", 1)[0]
    assert repr(source) in section and f"| reference | {reference} |" in section
    pair = pair_attention(loaded.model, loaded.tokenizer, source, layers=[1], heads=[0, 1])
    assert f"| the model's translation (greedy) | {pair['target']} |" in section
    assert pair["maps"][1].shape == (2, len(pair["queries"]), len(pair["keys"]))
    assert "cross-attention of decoder layer 1" in section and "attention.png" in section
    assert "Token attributions are computed for decoders and classifiers" in section


def test_explain_attention_cli_on_an_encoder_decoder(s2s_report, tmp_path):
    run, _ = s2s_report
    p = run_cli("explain", "attention", "--model", run, "Three one four.", "--out", tmp_path, "--json")
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    rec = json.loads(Path(res["json"]).read_text())
    assert res["side"] == "cross" and rec["keys"][-1] == "<|endoftext|>" and len(res["pngs"]) == 2
    for m in rec["maps"].values():  # (heads, target tokens, source tokens), rows summing to one
        assert [len(m), len(m[0]), len(m[0][0])] == [2, len(rec["tokens"]), len(rec["keys"])]
        assert all(abs(sum(row) - 1) < 1e-5 for head in m for row in head)
    bad = run_cli("explain", "--model", run, "Three one four.")
    assert bad.returncode == 2 and "use zenlm explain attention" in bad.stderr
    # the head view: a row of target tokens (hover picks the query), a row of source tokens
    # shaded by that query's weights, and the target x source grid
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    browser = _browser()
    try:
        browser.get(Path(res["html"]).as_uri())
        queries = browser.find_elements(By.CSS_SELECTOR, "#qtok .t")
        assert len(queries) == len(rec["tokens"])
        assert len(browser.find_elements(By.CSS_SELECTOR, "#tok .t")) == len(rec["keys"])
        assert len(browser.find_elements(By.CSS_SELECTOR, "#grid td")) == len(rec["tokens"]) * len(rec["keys"])
        ActionChains(browser).move_to_element(queries[1]).perform()
        assert "sel" in browser.find_elements(By.CSS_SELECTOR, "#qtok .t")[1].get_attribute("class")
        shown = [float(k.get_attribute("title").split()[-1]) for k in browser.find_elements(By.CSS_SELECTOR, "#tok .t")]
        first = rec["maps"][str(min(map(int, rec["maps"])))][0][1]  # first layer, head 0, query 1
        assert shown == pytest.approx(first, abs=1e-4)
        logs = browser.get_log("browser")
        assert [e for e in logs if e["level"] in ("SEVERE", "WARNING")] == [], logs
    finally:
        browser.quit()


def test_report_without_a_model_says_what_is_missing(cls_run, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(cls_run, bare, ignore=shutil.ignore_patterns("report"))
    s = json.loads((bare / "summary.json").read_text())
    del s["confusion"]
    (bare / "summary.json").write_text(json.dumps(s))
    res = write_report(bare, log=quiet)  # no load: nothing can be scored or explained
    md = Path(res["markdown"]).read_text()
    assert res["confusion"] is None and "no confusion matrix recorded" in md
    assert "examples need the run's model" in md
    assert [Path(f).name for f in res["figures"]] == ["loss.png", "metrics.png"]


def test_report_refuses_a_folder_that_is_not_a_run(tmp_path):
    p = run_cli("report", tmp_path)
    assert p.returncode == 2 and "not a zenlm run folder" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def _browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    binary = shutil.which("chromium") or "/usr/bin/chromium"
    driver = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    if not (Path(binary).exists() and Path(driver).exists()):
        pytest.skip(f"no headless browser: needs {binary} and {driver} (Debian's chromium, chromium-driver)")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              "--window-size=1200,1600"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver), options=opts)


def test_reports_render_in_headless_chromium(pre_report, cls_report, s2s_report, tmp_path):
    import numpy as np
    from matplotlib.image import imread
    from selenium.webdriver.common.by import By

    pages = [pre_report[1], cls_report, s2s_report[1]]
    browser = _browser()
    try:
        for res in pages:
            browser.get(Path(res["html"]).as_uri())
            imgs = browser.find_elements(By.TAG_NAME, "img")
            assert len(imgs) == len(res["figures"])
            for img in imgs:
                assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", img)
            headings = [h.text for h in browser.find_elements(By.TAG_NAME, "h2")]
            assert headings == res["sections"]
            shot = browser.get_screenshot_as_png()
            pixels = imread(io.BytesIO(shot), format="png")
            assert pixels.shape[0] > 100 and pixels.shape[1] > 100
            rgb = (pixels[..., :3] * 255).astype(np.uint32)
            colours = np.unique((rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2])
            assert len(colours) > 50 and (pixels[..., :3] < 0.8).mean() > 0.01  # not blank
            (tmp_path / f"{res['kind']}.png").write_bytes(shot)
            logs = browser.get_log("browser")
            assert [e for e in logs if e["level"] in ("SEVERE", "WARNING")] == [], logs
    finally:
        browser.quit()
