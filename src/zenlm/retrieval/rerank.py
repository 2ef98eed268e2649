"""Rerankers: a second, slower look at the first-stage hits of a search.

A reranker is anything callable as ``reranker(query, texts) -> scores`` (higher is better); the
index applies it to its top ``rerank_depth`` hits. A model path names a cross-encoder folder
(a BERT-family sequence classifier over ``[CLS] query [SEP] text [SEP]``).
"""

from __future__ import annotations

from zenlm.errors import RetrievalError


def load_reranker(path):
    """A cross-encoder from a model folder, as a reranker callable."""
    raise RetrievalError(f"cannot load a cross-encoder from {path}: this zenlm has no cross-encoder "
                         f"loader yet; pass a callable (query, texts) -> scores instead")
