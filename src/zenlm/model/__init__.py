"""Model building blocks; :class:`Transformer` is the one model class."""

from zenlm.model.kv_cache import KVCache
from zenlm.model.transformer import Transformer

__all__ = ["Transformer", "KVCache"]
