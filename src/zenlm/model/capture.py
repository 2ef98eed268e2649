"""Attention maps while attention stays fused: chosen layers also recompute their weights.

SDPA never materialises the attention matrix, and switching the whole model to an eager path
to get it (as ``output_attentions`` does elsewhere) slows every layer and changes the code that
runs. Here each chosen :class:`~zenlm.model.attention.Attention` hands its own queries and keys
(after RoPE, the cache's past keys included) and the mask SDPA is given to a recorder, which
computes ``softmax(q k^T / sqrt(d) + mask)`` beside the fused call. SDPA still computes the
output, so outputs are unchanged; layers not chosen do nothing but one attribute check.

The recorder needs nothing but q, k and the mask, so any attention that calls the hook (a
bidirectional encoder, cross-attention with its own keys) is captured the same way. Self- and
cross-attention are chosen apart (``cross``), so a decoder block's two attentions never share a
layer number: layer ``i`` is block ``i``'s self-attention, or with ``cross=True`` its
cross-attention (rows: target positions, columns: source positions).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn


def attention_weights(q: torch.Tensor, k: torch.Tensor, attn_mask: torch.Tensor | None,
                      is_causal: bool, heads: list[int] | None = None) -> torch.Tensor:
    """The weights SDPA applies, in float32: q (B, H, T, d), k (B, Hkv, S, d) -> (B, h, T, S).

    Grouped-query keys are repeated as SDPA's ``enable_gqa`` does (query head i reads kv head
    ``i // (H / Hkv)``); a boolean mask keeps True, a float mask is added; ``is_causal`` is the
    top-left causal triangle SDPA uses. ``heads`` picks query heads before any work is done.
    """
    n_head, n_kv = q.shape[1], k.shape[1]
    if heads is not None:
        index = torch.tensor(heads, device=q.device)
        q = q.index_select(1, index)
        k = k.index_select(1, torch.div(index, n_head // n_kv, rounding_mode="floor"))
    elif n_kv != n_head:
        k = k.repeat_interleave(n_head // n_kv, dim=1)
    scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    t, s = scores.shape[-2:]
    if is_causal:
        keep = torch.ones(t, s, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask.float()
    return torch.softmax(scores, dim=-1)


class AttentionCapture:
    """Recorded attention maps of some layers; a context manager that removes its hooks on exit.

    ``maps[layer]`` is the (B, heads, T, S) map of the layer's last call; ``calls[layer]`` keeps
    every call (one per decoding step when a KV cache is used). Maps are detached float32 on
    the CPU: recording never joins the autograd graph or holds device memory.
    """

    def __init__(self, model: nn.Module, layers: Iterable[int] | None = None,
                 heads: Iterable[int] | None = None, cross: bool = False):
        from zenlm.model.attention import Attention

        found = [m for m in model.modules() if isinstance(m, Attention) and m.cross == cross]
        if not found:
            kind = "cross-attention" if cross else "self-attention"
            raise ValueError(f"this model has no zenlm {kind} layers to capture")
        chosen = None
        if layers is not None:
            layers = [int(i) for i in layers]
            bad = [i for i in layers if not -len(found) <= i < len(found)]
            if bad:
                raise ValueError(f"layers {bad} out of range: the model has {len(found)} attention layers")
            chosen = {i % len(found) for i in layers}
        self.heads = None if heads is None else [int(h) for h in heads]
        if self.heads is not None:
            n = found[0].n_head
            bad = [h for h in self.heads if not 0 <= h < n]
            if bad:
                raise ValueError(f"heads {bad} out of range: the model has {n} heads per layer")
        self.modules = {i: m for i, m in enumerate(found) if chosen is None or i in chosen}
        self.calls: dict[int, list[torch.Tensor]] = {i: [] for i in self.modules}
        for i, m in self.modules.items():
            if m.capture is not None:
                raise RuntimeError(f"layer {i} is already being captured")
            m.capture = self._recorder(i)

    def _recorder(self, layer: int):
        def record(q, k, attn_mask, is_causal):
            with torch.no_grad():
                w = attention_weights(q.detach(), k.detach(), attn_mask, is_causal, self.heads)
            self.calls[layer].append(w.cpu())
        return record

    @property
    def maps(self) -> dict[int, torch.Tensor]:
        return {i: c[-1] for i, c in self.calls.items() if c}

    def clear(self) -> None:
        for c in self.calls.values():
            c.clear()

    def remove(self) -> None:
        for m in self.modules.values():
            m.capture = None

    def __enter__(self) -> "AttentionCapture":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def capture_attention(model: nn.Module, layers: Iterable[int] | None = None,
                      heads: Iterable[int] | None = None, cross: bool = False) -> AttentionCapture:
    """Start recording the attention of ``layers`` (all by default; negative counts from the
    top) and ``heads`` (all by default) of ``model``: its self-attention, or with ``cross`` its
    cross-attention; use as ``with capture_attention(m) as c:`` or keep the handle and call
    ``remove()``."""
    return AttentionCapture(model, layers, heads, cross)


__all__ = ["attention_weights", "AttentionCapture", "capture_attention"]
