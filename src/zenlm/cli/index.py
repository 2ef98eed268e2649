"""`zenlm index DIR --out IDX`: build or update a retrieval index of a folder's text, Markdown
and code files. Re-running embeds only files whose content changed and drops deleted ones."""

from __future__ import annotations

import json


def add_parser(sub) -> None:
    p = sub.add_parser("index", help="index a folder's files for search (dense vectors + BM25)")
    p.add_argument("dir", metavar="DIR", help="the folder to index (hidden and tool folders are skipped)")
    p.add_argument("--out", required=True, metavar="IDX", help="the index folder (created, or updated)")
    p.add_argument("--model", default=None,
                   help="the embedding model for a new index (default minilm); an existing index "
                        "keeps the one it was built with")
    p.add_argument("--json", action="store_true", help="print the counts as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from zenlm.retrieval.embedder import ZenlmEmbedder
    from zenlm.retrieval.index import Index

    embedder = ZenlmEmbedder(args.model) if args.model else None
    with Index(args.out, embedder) as idx:
        stats = idx.sync(args.dir)
        total = len(idx)
    if args.json:
        print(json.dumps({**stats.to_json(), "chunks": total}))
    else:
        print(f"{args.out}: {stats.files_added} files added, {stats.files_changed} changed, "
              f"{stats.files_unchanged} unchanged, {stats.files_removed} removed; "
              f"{stats.chunks_added} chunks embedded, {total} in the index ({stats.seconds:.1f} s)")
    return 0
