"""Inference: sampling and streaming generation with a KV cache."""

from zenlm.infer.generate import generate, stream
from zenlm.infer.sampling import SamplingConfig

__all__ = ["generate", "stream", "SamplingConfig"]
