"""One Transformer block: pre-norm x + attn(norm(x)), then x + mlp(norm(x)); or BERT's post-norm
norm(x + attn(x)), then norm(x + mlp(x)).

Which norm, where it sits and which MLP are config switches, so GPT-2, Llama and BERT share
this class. With ``cross_attention`` (decoder blocks of an encoder-decoder) a cross-attention
sub-layer to the encoder's output sits between the two: x + cross(norm(x), memory), or
post-norm norm(x + cross(x, memory)).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from zenlm.config import TransformerConfig
from zenlm.model.attention import Attention
from zenlm.model.kv_cache import KVCache
from zenlm.model.linear import Linear
from zenlm.model.projections import Projections


def make_norm(config: TransformerConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.d_model, eps=config.norm_eps)
    return nn.LayerNorm(config.d_model, eps=config.norm_eps, bias=config.bias)


class MLP(nn.Module):
    """GELU MLP (GPT-2: tanh approximation; BERT: exact) or SwiGLU (Llama)."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.kind = config.mlp
        d, h = config.d_model, config.d_ff
        if self.kind == "swiglu":
            self.gate_proj = Linear(d, h, bias=config.bias)
            self.gate_up = Projections.of("gate_up_proj", config)
        self.up_proj = Linear(d, h, bias=config.bias)
        self.down_proj = Linear(h, d, bias=config.bias)
        self.down_proj.residual_init = True
        self.approximate = "tanh" if self.kind == "gelu" else "none"

    def fuse_projections(self) -> None:
        """SwiGLU's gate and up in one matrix ``gate_up_proj`` (see ``Attention.fuse_projections``)."""
        if self.kind == "swiglu":
            self.gate_up.fuse(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "swiglu":
            gate, up = self.gate_up(self, x)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.gelu(self.up_proj(x), approximate=self.approximate))


class Block(nn.Module):
    def __init__(self, config: TransformerConfig, layer: int):
        super().__init__()
        self.attn_norm = make_norm(config)
        self.attn = Attention(config, layer)
        self.cross_norm = make_norm(config) if config.cross_attention else None
        self.cross_attn = Attention(config, layer, cross=True) if config.cross_attention else None
        self.mlp_norm = make_norm(config)
        self.mlp = MLP(config)
        self.drop = nn.Dropout(config.dropout)
        self.post_norm = config.norm_position == "post"

    def forward(self, x: torch.Tensor, rope, cache: KVCache | None = None,
                attn_mask: torch.Tensor | None = None, memory: torch.Tensor | None = None,
                memory_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.post_norm:
            x = self.attn_norm(x + self._drop(self.attn(x, rope, cache, attn_mask)))
            if self.cross_attn is not None:
                x = self.cross_norm(x + self._drop(self.cross_attn(x, None, cache, memory_mask, kv=memory)))
            return self.mlp_norm(x + self._drop(self.mlp(x)))
        x = x + self._drop(self.attn(self.attn_norm(x), rope, cache, attn_mask))
        if self.cross_attn is not None:
            x = x + self._drop(self.cross_attn(self.cross_norm(x), None, cache, memory_mask, kv=memory))
        return x + self._drop(self.mlp(self.mlp_norm(x)))

    def _drop(self, h: torch.Tensor) -> torch.Tensor:
        # not even called when it would do nothing: a module call per use adds up when decoding
        return self.drop(h) if self.training and self.drop.p > 0 else h
