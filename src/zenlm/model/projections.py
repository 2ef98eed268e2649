"""Linear layers that read the same input, asked for as one: attention's q/k/v, SwiGLU's gate/up.

Attention and the MLP get their parts from a :class:`Projections` as a tuple, whether the parts
are separate layers or fused into one matrix, so each has one forward path. Unfused, every part
is its own layer under the checkpoint's name (``q_proj``, ``k_proj``, ``v_proj``: Hugging Face's
and PEFT's names, and what LoRA wraps), a child of the module that owns it; fused
(:meth:`Projections.fuse`, for inference), one layer under the fused name holds the parts' rows
stacked, and its one product is split. Decoding a token is a chain of small ops whose per-call
overhead rivals their work, so one product instead of three is faster.

The split sizes live here, not in the layer: a quantizer replaces the fused layer with its own
kind (``infer/quantize.py``) and the parts still come out. Nor is this a module: it holds no
weights, adds no name to the state dict and costs no module call per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from zenlm.config import TransformerConfig
from zenlm.model.linear import Linear, is_plain_linear

# The fused layers and their parts, in row order.
FUSED_PARTS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def part_sizes(config: TransformerConfig) -> dict[str, tuple[int, ...]]:
    """Each fused layer's parts' output sizes, in row order."""
    q, kv = config.n_head * config.head_dim, config.n_kv_head * config.head_dim
    return {"qkv_proj": (q, kv, kv), "gate_up_proj": (config.d_ff, config.d_ff)}


def fuse_linears(lins: list[nn.Module]) -> Linear:
    """One frozen ``Linear`` whose output is the given layers' outputs side by side."""
    w = lins[0].weight
    bias = lins[0].bias is not None
    with torch.device("meta"):
        fused = Linear(w.shape[1], sum(lin.out_features for lin in lins), bias=bias)
    fused.weight = nn.Parameter(torch.cat([lin.weight.detach() for lin in lins]), requires_grad=False)
    if bias:
        fused.bias = nn.Parameter(torch.cat([lin.bias.detach() for lin in lins]), requires_grad=False)
    return fused


@dataclass(frozen=True)
class Projections:
    """The parts of fused layer ``fused`` (a name of :data:`FUSED_PARTS`), of ``sizes`` outputs."""

    fused: str
    sizes: tuple[int, ...]

    @classmethod
    def of(cls, fused: str, config: TransformerConfig) -> "Projections":
        return cls(fused, part_sizes(config)[fused])

    @property
    def parts(self) -> tuple[str, ...]:
        return FUSED_PARTS[self.fused]

    def __call__(self, owner: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Every part's output for input ``x``, from the layers ``owner`` holds now."""
        layers = owner._modules
        fused = layers.get(self.fused)
        if fused is not None:
            return fused(x).split(self.sizes, dim=-1)
        return tuple(layers[name](x) for name in self.parts)

    def layers(self, owner: nn.Module) -> list[nn.Module]:
        """The layers computing the parts: the fused one, or each part's."""
        fused = owner._modules.get(self.fused)
        return [fused] if fused is not None else [owner._modules[name] for name in self.parts]

    def fuse(self, owner: nn.Module) -> None:
        """Replace ``owner``'s part layers by one fused layer (frozen; for inference). Parts that
        are not plain linear layers (LoRA, quantized) are left as they are."""
        lins = self.layers(owner)
        if len(lins) > 1 and all(is_plain_linear(lin) for lin in lins):
            setattr(owner, self.fused, fuse_linears(lins))
            for name in self.parts:
                delattr(owner, name)


__all__ = ["FUSED_PARTS", "Projections", "fuse_linears", "part_sizes"]
