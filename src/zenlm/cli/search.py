"""`zenlm search IDX "query"`: the best chunks of an index, hybrid (dense + BM25, reciprocal rank
fusion) by default. ``--queries FILE.jsonl`` answers many queries in one run (the model loads
once): one JSON line of hits per query line, in the same order."""

from __future__ import annotations

import json
import sys


def add_parser(sub) -> None:
    p = sub.add_parser("search", help="search an index built by `zenlm index`")
    p.add_argument("index", metavar="IDX")
    p.add_argument("query", nargs="?", help="the query (or --queries)")
    p.add_argument("--queries", metavar="FILE.jsonl",
                   help="one query per line: a JSON string or an object with a 'query' field")
    p.add_argument("--mode", choices=["hybrid", "dense", "bm25"], default="hybrid")
    p.add_argument("-k", type=int, default=10, help="how many hits (default 10)")
    p.add_argument("--json", action="store_true", help="hits as JSON (always so with --queries)")
    p.add_argument("--int8", action="store_true",
                   help="scan an int8 copy of the vectors (a quarter of the bytes), rescoring the "
                        "best candidates in float32 (the default from 20,000 chunks up)")
    p.set_defaults(func=run)


def read_queries(path: str) -> list[str]:
    from zenlm.errors import DataError

    queries = []
    try:
        lines = open(path, encoding="utf-8").read().splitlines()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror}") from None
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            raise DataError(f"{path}:{n} is not JSON (a string or an object with 'query')") from None
        q = item.get("query") if isinstance(item, dict) else item
        if not isinstance(q, str):
            raise DataError(f"{path}:{n} has no 'query' string")
        queries.append(q)
    return queries


def run(args) -> int:
    from zenlm.errors import RetrievalError
    from zenlm.retrieval.index import Index

    if (args.query is None) == (args.queries is None):
        raise RetrievalError("give one query, or --queries FILE.jsonl")
    with Index(args.index, create=False, int8=True if args.int8 else None) as idx:
        queries = read_queries(args.queries) if args.queries else [args.query]
        results = idx.search_many(queries, args.mode, args.k)
    if args.queries or args.json:
        for q, hits in zip(queries, results):
            sys.stdout.write(json.dumps({"query": q, "hits": [h.to_json() for h in hits]},
                                        ensure_ascii=False) + "\n")
        return 0
    hits = results[0]
    if not hits:
        print("no hits")
    for n, h in enumerate(hits, start=1):
        first = h.text.strip().splitlines()[0] if h.text.strip() else ""
        print(f"{n:>2}. {h.span}  {h.score:.4f}\n    {first[:160]}")
    return 0
