"""Retrieval: files cut into line-spanned chunks, one on-disk index (dense vectors + FTS5 BM25),
dense, BM25 and hybrid (reciprocal rank fusion) search, and answers grounded in what was found.

Nothing heavy is imported here; ``from zenlm.retrieval import Index`` loads numpy and sqlite3.
"""

from __future__ import annotations


def __getattr__(name):
    if name in ("Index", "Hit", "AddStats", "rrf", "fts_query"):
        from zenlm.retrieval import index

        return getattr(index, name)
    if name in ("Chunk", "chunk_text", "chunk_file"):
        from zenlm.retrieval import chunk

        return getattr(chunk, name)
    if name in ("ask", "Answer"):
        from zenlm.retrieval import rag

        return getattr(rag, name)
    raise AttributeError(f"module 'zenlm.retrieval' has no attribute {name!r}")


__all__ = ["Index", "Hit", "AddStats", "rrf", "fts_query", "Chunk", "chunk_text", "chunk_file",
           "ask", "Answer"]
