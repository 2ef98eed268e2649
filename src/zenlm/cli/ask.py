"""`zenlm ask IDX "question" [--model smollm2]`: a short answer from the sentences of the index's
best chunks that are most like the question, citing the chunk it comes from as [n] -> file:lines
with the supporting sentence quoted; it says so when nothing relevant was found."""

from __future__ import annotations

import json

from zenlm.cli.common import add_model_arg


def add_parser(sub) -> None:
    p = sub.add_parser("ask", help="answer a question from an index, with citations")
    p.add_argument("index", metavar="IDX")
    p.add_argument("question")
    add_model_arg(p, required=False, default="smollm2",
                  help="the chat model that answers: 'smollm2' (default), a run or HF folder, .gguf")
    p.add_argument("-k", type=int, default=3, help="how many chunks are retrieved (default 3)")
    p.add_argument("--sentences", type=int, default=1,
                   help="how many of their sentences (the most like the question) the model reads")
    p.add_argument("--mode", choices=["hybrid", "dense", "bm25"], default="hybrid")
    p.add_argument("--min-cosine", type=float, default=0.3,
                   help="below this best dense cosine (and with no chunk sharing most of the "
                        "question's words) the answer is that nothing was found")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--free", action="store_true",
                   help="let the model word its answer freely (default: it copies a span of the sentences it read)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    from zenlm.retrieval.index import Index
    from zenlm.retrieval.rag import ask

    with Index(args.index, create=False) as idx:
        answer = ask(idx, args.question, args.model, k=args.k, mode=args.mode,
                     min_cosine=args.min_cosine, max_new_tokens=args.max_new_tokens,
                     sentences=args.sentences, copy=not args.free)
    print(json.dumps(answer.to_json(), ensure_ascii=False) if args.json else answer.render())
    return 0
