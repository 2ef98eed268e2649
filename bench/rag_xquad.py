"""Retrieval-augmented answers on XQuAD (English) with SmolLM2: how often an answer carries a
valid citation, how often the first cited chunk holds the gold answer, how often the answer
contains it.

    python bench/rag_xquad.py [--sample 100 --seed 0] [--k 3] [--embedder zenlm|st] [--model smollm2]

The 240 paragraphs are indexed as in ``bench/retrieval_xquad.py``; ``--sample N`` takes N
questions drawn at random with ``--seed`` (``--limit N``: N spread evenly over the 1,190).
A gold answer counts as contained when any of the question's reference answers occurs,
case-insensitively. The gold answers are used only here, to score; ``ask`` never sees them.

An answer is ``<short answer> [n]`` plus a quoted supporting sentence of chunk n
(``Source [n]: "..."``, the chunk's words, not the model's). Reported apart:
"answer_has_gold" is the model's own answer text (citation numbers removed);
"answer_or_quote_has_gold" is the answer shown together with its quoted evidence. Where no
chunk supports the model's answer, the best sentence it read is shown instead ("fallback";
"answer_has_gold" still scores the model's own text, "shown_answer_has_gold" what is shown). "model_cited"
counts answers where the model's own ``[n]`` survived the overlap check; the others carry the
checker's citation (the chunk the answer's words come from) or are flagged unsupported.
"context_has_gold" is whether the sentences the model read held the gold answer.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from retrieval_xquad import DATA, load_xquad, make_embedder  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--xquad", default=str(DATA / "xquad" / "xquad.en.json"))
    ap.add_argument("--embedder", choices=["zenlm", "st"], default="zenlm")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--mode", default="hybrid")
    ap.add_argument("--limit", type=int, help="N questions spread evenly over the set")
    ap.add_argument("--sample", type=int, help="N questions drawn at random (with --seed)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--context-chunks", type=int, default=2)
    ap.add_argument("--sentences", type=int, default=1)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--repetition-penalty", type=float, default=0.8)
    ap.add_argument("--free", action="store_true", help="let the model write freely (default: its answer is held to spans of what it read)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: on a shared CPU two threads decode several times slower)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "rag_xquad.json"))
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from zenlm.io import atomic_write_json, atomic_write_text
    from zenlm.retrieval import Index
    from zenlm.retrieval.rag import ask, load_chat_model

    paragraphs, names, questions = load_xquad(Path(args.xquad))
    if args.limit and args.limit < len(questions):
        step = len(questions) / args.limit
        questions = [questions[int(i * step)] for i in range(args.limit)]
    elif args.sample and args.sample < len(questions):
        import random

        questions = random.Random(args.seed).sample(questions, args.sample)
    tmp = Path(tempfile.mkdtemp(prefix="zenlm-rag-"))
    idx = Index(tmp / "idx", make_embedder(args.embedder))
    idx.add(texts=paragraphs, names=names)
    load_chat_model(args.model)
    records, t0 = [], time.perf_counter()
    for n, (q, gold_file, golds) in enumerate(questions, start=1):
        a = ask(idx, q, args.model, k=args.k, copy=not args.free, mode=args.mode, max_new_tokens=args.max_new_tokens,
                context_chunks=args.context_chunks, sentences=args.sentences,
                repetition_penalty=args.repetition_penalty)
        first = next(iter(a.citations.values()), None)

        def has(text, golds=golds):
            return any(g.lower() in text.lower() for g in golds)

        records.append({
            "question": q, "gold": golds, "gold_file": gold_file, "answer": a.text, "raw": a.raw,
            "found": a.found, "sources": a.sources(), "invalid": a.invalid,
            "valid_citation": bool(a.citations), "model_cited": bool(a.citations) and not a.attributed,
            "attributed": a.attributed, "unsupported": a.unsupported,
            "retrieved_gold": gold_file in [h.path for h in a.hits],
            "context_has_gold": has(" ".join(x for _, x in a.context)),
            "first_cited_has_gold": bool(first and any(g in first.text for g in golds)),
            "model_answer": a.model_text, "fallback": a.fallback,
            "answer_has_gold": has(a.model_text), "shown_answer_has_gold": has(a.plain),
            "quote": a.quote, "quote_has_gold": has(a.quote),
            "answer_or_quote_has_gold": has(a.plain) or has(a.quote)})
        if n % 10 == 0:
            print(f"{n}/{len(questions)} ({(time.perf_counter() - t0) / n:.1f} s per question)", flush=True)
    secs = time.perf_counter() - t0
    m = len(records)
    idx.close()
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)

    def share(key):
        return sum(r[key] for r in records) / m

    result = {"model": args.model, "embedder": idx.embedder.name, "k": args.k, "mode": args.mode,
              "context_chunks": args.context_chunks, "sentences": args.sentences,
              "max_new_tokens": args.max_new_tokens, "repetition_penalty": args.repetition_penalty,
              "questions": m,
              "sample": {"n": args.sample, "seed": args.seed} if args.sample else None, "threads": torch.get_num_threads(), "seconds_per_question": secs / m,
              "valid_citation": share("valid_citation"), "model_cited": share("model_cited"),
              "attributed": share("attributed"), "unsupported": share("unsupported"),
              "found_nothing": 1 - share("found"), "gold_in_retrieved": share("retrieved_gold"),
              "first_cited_has_gold": share("first_cited_has_gold"),
              "context_has_gold": share("context_has_gold"),
              "fallback": share("fallback"), "answer_has_gold": share("answer_has_gold"),
              "shown_answer_has_gold": share("shown_answer_has_gold"), "quote_has_gold": share("quote_has_gold"),
              "answer_or_quote_has_gold": share("answer_or_quote_has_gold")}
    out = Path(args.out)
    atomic_write_json(out, result)
    atomic_write_text(out.with_suffix(".jsonl"), "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                                         for r in records))
    for key, value in result.items():
        print(f"{key}: {value:.3f}" if isinstance(value, float) else f"{key}: {value}")
    print(f"wrote {out} and {out.with_suffix('.jsonl')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
