"""The plain path of ``attend`` (a few queries on the CPU) gives SDPA's result, with grouped
heads and masks; other shapes go to SDPA itself."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from zenlm.model import attend as attend_mod
from zenlm.model.attend import attend


CASES = [(h, kv, t, m) for h, kv in ((4, 4), (9, 3)) for t in (1, 2)
         for m in ("none", "bool_keys", "bool_full", "additive_keys")
         if not (m == "bool_full" and h != kv and t > 1)]  # that one goes to SDPA itself


@pytest.mark.parametrize("heads,kv_heads,t,mask", CASES)
def test_few_queries_equal_sdpa(heads, kv_heads, t, mask):
    g = torch.Generator().manual_seed(heads * 10 + t)
    b, s, d = 3, 11, 16
    q = torch.randn(b, heads, t, d, generator=g)
    k, v = (torch.randn(b, kv_heads, s, d, generator=g) for _ in range(2))
    m = None
    if mask == "bool_keys":
        m = torch.ones(b, 1, 1, s, dtype=torch.bool)
        m[0, ..., 7:] = False
    elif mask == "bool_full":
        m = torch.rand(b, 1, t, s, generator=g) > 0.3
        m[..., 0] = True
    elif mask == "additive_keys":
        m = torch.randn(b, 1, 1, s, generator=g)
    gqa = heads != kv_heads
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=gqa)
    torch.testing.assert_close(attend(q, k, v, attn_mask=m, enable_gqa=gqa), want, rtol=1e-5, atol=1e-6)


def test_only_few_queries_take_the_plain_path(monkeypatch):
    calls = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(attend_mod.F, "scaled_dot_product_attention",
                        lambda *a, **kw: calls.append(1) or real(*a, **kw))
    k = v = torch.randn(2, 4, 5, 8)
    attend(torch.randn(2, 4, 1, 8), k, v)
    assert calls == []  # one query: the plain path
    attend(torch.randn(2, 4, attend_mod.FEW_QUERIES + 1, 8), k, v)
    attend(torch.randn(2, 4, 3, 8), k, v, is_causal=True)
    assert len(calls) == 2
