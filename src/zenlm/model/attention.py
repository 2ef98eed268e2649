"""Multi-head attention: Q/K/V projections, rotary positions, grouped-query heads, a KV cache;
self-attention, or (``cross=True``) cross-attention to another sequence (an encoder's output).

The one attention of zenlm. Every family goes through
:func:`torch.nn.functional.scaled_dot_product_attention`, which picks a fused kernel where the
hardware has one (through :func:`~zenlm.model.attend.attend`, which takes a plain path for the
few queries of a decoding step on the CPU). q, k and v come from one
:class:`~zenlm.model.projections.Projections`: separate ``q_proj``/``k_proj``/``v_proj`` layers,
named as Hugging Face names them (checkpoint interop and LoRA on q/k/v are direct), or, once
fused for inference, one ``qkv_proj`` matrix and one product.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from zenlm.config import TransformerConfig
from zenlm.model.attend import attend
from zenlm.model.kv_cache import KVCache
from zenlm.model.linear import Linear
from zenlm.model.projections import Projections


def rope_inv_freq(head_dim: int, base: float, scaling: dict | None = None) -> torch.Tensor:
    """The rotation frequency of each pair of channels, optionally rescaled for long contexts."""
    # computed on the CPU even when modules are built on the meta device (real values needed)
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device="cpu") / head_dim))
    if scaling is None:
        return inv_freq
    kind, factor = scaling["rope_type"], float(scaling["factor"])
    if kind == "linear":  # positions divided by factor
        return inv_freq / factor
    # llama3: wavelengths longer than the original context / low_freq_factor are stretched by
    # factor, those shorter than context / high_freq_factor kept, the band between interpolated.
    old = float(scaling["original_max_position_embeddings"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old / low, inv_freq / factor, inv_freq)
    smooth = (old / wavelen - low) / (high - low)
    between = (wavelen >= old / high) & (wavelen <= old / low)
    return torch.where(between, (1 - smooth) * scaled / factor + smooth * scaled, scaled)


def rope_tables(head_dim: int, max_len: int, base: float,
                scaling: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin tables (max_len, head_dim) for :func:`apply_rope`, in the "rotate half"
    layout Llama uses: channel i pairs with i + head_dim/2, and sin's first half is negated."""
    inv_freq = rope_inv_freq(head_dim, base, scaling)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64, device="cpu"), inv_freq)
    sin = angles.sin()
    return torch.cat([angles, angles], dim=-1).cos().float(), torch.cat([-sin, sin], dim=-1).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each channel pair of ``x`` (..., head_dim): ``x * cos + rotate_half(x) * sin``,
    where rotating half is swapping the halves (a roll) and negating the first (in ``sin``).
    Three ops, not six: q and k are rotated separately, and per token each op is mostly
    call overhead."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), sin)


class Attention(nn.Module):
    """``cross``: queries from ``x``, keys and values from ``kv`` (a decoder reading its encoder,
    masked by the source's padding), with no positions of their own to rotate and no causality.
    Under a cache their keys and values are computed on the first step and kept (the source
    does not change while decoding); the same class, so one kernel call and one set of names."""

    def __init__(self, config: TransformerConfig, layer: int, cross: bool = False):
        super().__init__()
        self.layer = layer
        self.cross = cross
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        qkv_bias = config.bias or config.qkv_bias
        d = config.d_model
        self.q_proj = Linear(d, self.n_head * self.head_dim, bias=qkv_bias)
        self.k_proj = Linear(d, self.n_kv_head * self.head_dim, bias=qkv_bias)
        self.v_proj = Linear(d, self.n_kv_head * self.head_dim, bias=qkv_bias)
        self.o_proj = Linear(self.n_head * self.head_dim, d, bias=config.bias)
        self.o_proj.residual_init = True  # GPT-2's scaled init for projections into the residual
        self.dropout = config.dropout
        self.causal = config.causal and not cross
        self.use_rope = config.pos == "rope" and not cross
        self.qkv = Projections.of("qkv_proj", config)
        # Opt-in attention capture (zenlm.model.capture): a callable given this layer's q, k and
        # the mask SDPA uses; None (the default) costs one attribute check per call.
        self.capture = None

    def fuse_projections(self) -> None:
        """q/k/v in one matrix ``qkv_proj``, for inference (see :class:`Projections`);
        exporters split it back (``transformer.unfused_state``). Cross-attention reads two
        inputs: nothing to fuse."""
        if not self.cross:
            self.qkv.fuse(self)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                cache: KVCache | None = None, attn_mask: torch.Tensor | None = None,
                kv: torch.Tensor | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        nh, nkv, hd = self.n_head, self.n_kv_head, self.head_dim
        if self.cross:
            q = self.q_proj(x).view(b, t, nh, hd).transpose(1, 2)
            k, v = self._memory_kv(kv, cache)
            q, past = q.to(k.dtype), 0
        else:
            q, k, v = self.qkv(self, x)
            q = q.view(b, t, nh, hd).transpose(1, 2)
            k = k.view(b, t, nkv, hd).transpose(1, 2)
            v = v.view(b, t, nkv, hd).transpose(1, 2)
            if self.use_rope:
                cos, sin = rope
                q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            past = cache.pos if cache is not None else 0
            if cache is not None:
                k, v = cache.update(self.layer, k, v)  # in the cache's dtype
                if q.dtype != k.dtype:  # attention runs in the wider of the two (an fp16 cache
                    wide = torch.promote_types(q.dtype, k.dtype)  # of an fp32 model: fp32)
                    q, k, v = q.to(wide), k.to(wide), v.to(wide)
        # Causality: a fresh sequence uses the fused causal kernel; a single new token sees the
        # whole cache; a chunk appended to a cache needs an explicit mask (passed in).
        # (t > 1 first: under torch.compile a one-token step then never looks at the dynamic past)
        is_causal = self.causal and attn_mask is None and t > 1 and past == 0
        if self.cross and b > k.shape[0]:  # several rows per source (beam search's beams)
            return self._grouped_cross(q, k, v, attn_mask, b // k.shape[0], x.dtype)
        if self.capture is not None:
            self.capture(q, k, attn_mask, is_causal)
        y = attend(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                   dropout_p=self.dropout if self.training else 0.0,
                   enable_gqa=self.n_kv_head != self.n_head)
        y = y.transpose(1, 2).reshape(b, t, nh * hd).to(x.dtype)
        return self.o_proj(y)

    def _grouped_cross(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       attn_mask: torch.Tensor | None, group: int, dtype: torch.dtype) -> torch.Tensor:
        """Cross-attention where each ``group`` consecutive query rows read one source (the
        beams of a sentence): their queries become more query positions of that source's row,
        so its keys and values are stored, read and (never) reordered once, not once per beam.
        Cross-attention has no causality, so extra query positions change nothing else."""
        b, nh, t, hd = q.shape
        src = b // group
        if self.capture is not None:
            raise ValueError("attention capture reads one row per source: capture with beam 1")
        q = q.view(src, group, nh, t, hd).transpose(1, 2).reshape(src, nh, group * t, hd)
        y = attend(q, k, v, attn_mask=attn_mask, enable_gqa=self.n_kv_head != self.n_head)
        y = y.view(src, nh, group, t, hd).permute(0, 2, 3, 1, 4).reshape(b, t, nh * hd).to(dtype)
        return self.o_proj(y)

    def _memory_kv(self, kv: torch.Tensor | None, cache: KVCache | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention keys and values of the encoder output ``kv`` (B, S, d): from the
        cache once stored there, else projected (and stored)."""
        stored = cache.cross.get(self.layer) if cache is not None else None
        if stored is not None:
            return stored
        if kv is None:
            raise ValueError("cross-attention needs the encoder's output (memory)")
        b, s, _ = kv.shape
        k = self.k_proj(kv).view(b, s, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(kv).view(b, s, self.n_kv_head, self.head_dim).transpose(1, 2)
        if cache is not None:
            k, v = cache.store_cross(self.layer, k, v)
        return k, v
