"""Opacus per-sample gradient samplers for zenlm's own layers.

Opacus picks a layer's sampler by its exact type, so zenlm's ``Linear`` (an ``nn.Linear``
subclass whose product goes through oneDNN) and ``LoRALinear`` would silently fall back to the
functorch path (a vmap over the whole layer: slower, and more memory) unless registered. Both
compute ``x @ W.T + b``, so Opacus's own linear sampler is right for them: the per-sample weight
gradient of each example is the sum over its positions of outer(grad_out, input).

``nn.LayerNorm`` is re-registered with a sampler that also accepts ``bias=False`` (Opacus's
reads ``layer.bias.requires_grad`` unconditionally); ``nn.RMSNorm`` and ``nn.Embedding`` have
Opacus samplers that fit as they are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _layer_norm_grad_sample(layer: nn.LayerNorm, activations, backprops):
    x = activations[0]
    out = {}
    dims = list(range(1, x.dim() - layer.weight.dim())) if layer.weight is not None else []
    if layer.weight is not None and layer.weight.requires_grad:
        g = F.layer_norm(x, layer.normalized_shape, eps=layer.eps) * backprops
        out[layer.weight] = g.sum(dims) if dims else g
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = backprops.sum(dims) if dims else backprops
    return out


_registered = False


def register() -> None:
    """Register the samplers (once per process; idempotent)."""
    global _registered
    if _registered:
        return
    from opacus.grad_sample.linear import compute_linear_grad_sample
    from opacus.grad_sample.utils import register_grad_sampler

    from zenlm.model.linear import Linear
    from zenlm.model.lora import LoRALinear

    register_grad_sampler([Linear, LoRALinear])(compute_linear_grad_sample)
    register_grad_sampler(nn.LayerNorm)(_layer_norm_grad_sample)
    _registered = True


def slow_path_modules(gsm) -> list[str]:
    """The modules of a GradSampleModule whose per-sample gradients would come from the
    functorch fallback instead of a registered sampler (empty when every one is fast)."""
    from opacus.grad_sample.grad_sample_module import GradSampleModule

    samplers = GradSampleModule.GRAD_SAMPLERS
    names = {id(m): n for n, m in gsm._module.named_modules()}
    return [f"{names.get(id(m), '?')} ({type(m).__name__})" for m in gsm.iterate_submodules(gsm._module)
            if type(m) not in samplers or hasattr(m, "ft_compute_sample_grad")]


__all__ = ["register", "slow_path_modules"]
