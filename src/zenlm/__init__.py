"""zenlm: the whole life of a Transformer language model, readable and fast on a laptop CPU.

``import zenlm`` stays cheap: heavy modules (torch, tokenizers) load when first used.
"""

from __future__ import annotations

__version__ = "0.1.0"


def load(path: str, device: str = "cpu"):
    """A ready model and tokenizer from a run folder (more sources come with interop)."""
    from zenlm.checkpoint import load_run

    return load_run(path, device=device)


def generate(loaded, prompt: str, **sampling) -> str:
    """Complete ``prompt`` with a model from :func:`load`; keywords as in SamplingConfig."""
    from zenlm.infer import generate as _generate

    return _generate(loaded.model, loaded.tokenizer, prompt, **sampling)


__all__ = ["load", "generate", "__version__"]
