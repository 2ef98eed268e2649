"""Scaled dot-product attention, with a plain path for a few queries on the CPU.

``F.scaled_dot_product_attention`` on the CPU picks its flash kernel, which tiles the queries:
for one query per row (a decoding step, a beam's step, a beam group's cross-attention) the
tiling is pure overhead, and matmul, softmax, matmul is faster (at 320 rows x 4 heads x 56
keys: 2.5 ms against 3.1 ms). Only that case takes the plain path; everything else, training
and prefill included, is SDPA's own.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

FEW_QUERIES = 8  # query positions per (row, kv-head) up to which the plain path is used


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
           is_causal: bool = False, dropout_p: float = 0.0, enable_gqa: bool = False) -> torch.Tensor:
    """SDPA's result for q (B, H, T, D) and k, v (B, Hkv, S, D); ``attn_mask`` boolean (True:
    attend) or additive, broadcastable to (B, H, T, S)."""
    b, h, t, d = q.shape
    g = h // k.shape[1] if enable_gqa else 1
    plain = (q.device.type == "cpu" and not is_causal and dropout_p == 0.0 and t * g <= FEW_QUERIES
             and (attn_mask is None or (g == 1 or attn_mask.shape[-2] == 1) and attn_mask.dim() == 4))
    if not plain:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                              dropout_p=dropout_p, enable_gqa=enable_gqa)
    hk = k.shape[1]
    qg = q.reshape(b, hk, g * t, d)  # the queries of a kv head's group share its keys
    s = torch.matmul(qg, k.transpose(-1, -2)).mul_(1.0 / math.sqrt(d))
    if attn_mask is not None:
        m = attn_mask if g == 1 else attn_mask[:, :1]  # (B, 1, 1, S) under grouped heads
        # the most negative float, not -inf: a row with nothing to attend to (a dead engine row)
        # gets finite values, not NaN; any other row's weights are the same
        s = s.masked_fill(~m, torch.finfo(s.dtype).min) if m.dtype == torch.bool else s + m
    return torch.matmul(s.softmax(-1), v).view(b, h, t, d)


__all__ = ["attend", "FEW_QUERIES"]
