"""What an index needs from a sentence encoder, and the default one (``zenlm.embed``).

An index stores its embedder's ``name`` and ``dim`` beside the vectors, so a query is always
embedded by the model the chunks were embedded by: cosines between two different models'
vectors mean nothing, and nothing else would catch the mix-up.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Embedder(Protocol):
    """``encode`` returns one L2-normalised float32 row per text."""

    name: str
    dim: int

    def encode(self, texts: list[str]) -> np.ndarray: ...


class ZenlmEmbedder:
    """``zenlm.embed`` with one model (a built-in name such as ``"minilm"`` or a folder)."""

    def __init__(self, model: str = "minilm", batch_size: int = 64):
        self.name = model
        self.batch_size = batch_size
        self._dim: int | None = None

    @property
    def dim(self) -> int:
        if self._dim is None:
            self._dim = int(self.encode(["dimension probe"]).shape[1])
        return self._dim

    def encode(self, texts: list[str]) -> np.ndarray:
        import zenlm

        if not texts:
            return np.zeros((0, self._dim or 0), dtype=np.float32)
        vectors = np.asarray(zenlm.embed(list(texts), model=self.name, batch_size=self.batch_size),
                             dtype=np.float32)
        self._dim = vectors.shape[1]
        return vectors


def as_unit_rows(vectors, n: int, dim: int) -> np.ndarray:
    """Check an embedder's output (the shape it promised; rows of length one) as float32."""
    from zenlm.errors import RetrievalError

    v = np.ascontiguousarray(vectors, dtype=np.float32)
    if v.shape != (n, dim):
        raise RetrievalError(f"the embedder returned shape {v.shape} for {n} texts; expected ({n}, {dim})")
    norms = np.linalg.norm(v, axis=1)
    if n and not np.allclose(norms, 1.0, atol=1e-3):
        v = v / np.maximum(norms, 1e-12)[:, None]  # an embedder that does not normalise
    return v
